"""``python -m ptycho_runtime.cli``: the ``ptycho-runtime`` command."""

import sys

from .main import main

sys.exit(main())
