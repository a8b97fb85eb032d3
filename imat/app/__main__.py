"""``python -m imat.app``: the `imat` command."""

import sys

from imat.app.cli import main

sys.exit(main())
