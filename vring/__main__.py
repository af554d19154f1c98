import sys

from vring.cli import main

sys.exit(main())
