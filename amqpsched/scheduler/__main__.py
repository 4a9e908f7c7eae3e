import sys

from amqpsched.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
