import sys

from bottle.cli import main

sys.exit(main())
