"""`python -m pilothouse.fleet`: wiring only."""

import sys

from pilothouse.fleet.cli import main

sys.exit(main())
