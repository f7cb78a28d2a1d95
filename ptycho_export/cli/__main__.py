"""``python -m ptycho_export.cli``: the ``ptycho-export`` console script."""

import sys

from .main import main

sys.exit(main())
