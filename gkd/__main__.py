"""``python -m gkd``: the same as the ``gkd`` command."""
import sys

from gkd.cli import main

sys.exit(main())
