"""``python -m gfnet_edge``: the ``gfnet-edge`` command."""
import sys

from .cli import main

sys.exit(main())
