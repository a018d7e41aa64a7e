"""``python -m gfnet_edge.cli``: the ``gfnet-edge`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
