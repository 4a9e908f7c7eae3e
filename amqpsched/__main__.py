import sys

from amqpsched.cli import main

sys.exit(main())
