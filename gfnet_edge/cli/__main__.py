"""``python -m gfnet_edge.cli``: the ``gfnet-edge`` command."""
import sys

from . import main

sys.exit(main())
