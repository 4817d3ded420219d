"""``python -m fastfair``: the same as the ``fastfair`` console script."""
import sys

from .cli import main

sys.exit(main())
