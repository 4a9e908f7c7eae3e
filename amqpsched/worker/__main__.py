import sys

from amqpsched.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
