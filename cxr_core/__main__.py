"""``python -m cxr_core``: see :mod:`cxr_core.cli`."""

import sys

from cxr_core.cli import main

sys.exit(main())
