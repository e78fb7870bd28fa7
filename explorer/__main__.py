"""``python -m explorer``: the headless command line (see explorer/cli.py)."""
import sys

from explorer.cli import main

sys.exit(main())
