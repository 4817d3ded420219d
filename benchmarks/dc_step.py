"""Per-group gradients of one DC outer step (reference loop vs one pass): a
thin wrapper of fastfair.bench.dc_step, so that ``python benchmarks/dc_step.py
...`` works from a checkout (``fastfair bench dc`` runs the same code after
``pip install .``). See ``--help``."""
import os
import sys

if __name__ == "__main__":
    # From a checkout where fastfair is not installed, import the repository's copy.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastfair.bench.dc_step import main

    main()
