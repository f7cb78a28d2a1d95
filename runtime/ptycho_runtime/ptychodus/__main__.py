"""``python -m ptycho_runtime.ptychodus``: the old spelling of ``python -m ptycho_runtime.hosts.ptychodus``."""

import sys

from ..hosts.ptychodus.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
