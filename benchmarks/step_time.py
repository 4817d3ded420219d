"""End-to-end DM / DC step time and peak memory against the group count: a
thin wrapper of fastfair.bench.step_time, so that ``python
benchmarks/step_time.py ...`` works from a checkout (``fastfair bench step``
runs the same code after ``pip install .``). See ``--help``."""
import os
import sys

if __name__ == "__main__":
    # From a checkout where fastfair is not installed, import the repository's copy.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastfair.bench.step_time import main

    main()
