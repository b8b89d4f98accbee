"""`python -m forestall` runs the console script."""

import sys

from forestall import cli

sys.exit(cli.main())
