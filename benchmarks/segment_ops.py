"""Group-count scaling of per-segment means: a thin wrapper of
fastfair.bench.segment, so that ``python benchmarks/segment_ops.py ...`` works
from a checkout (``fastfair bench segment`` runs the same code after
``pip install .``). See ``--help``."""
import os
import sys

if __name__ == "__main__":
    # From a checkout where fastfair is not installed, import the repository's copy.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastfair.bench.segment import main

    main()
