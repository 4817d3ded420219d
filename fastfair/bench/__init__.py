"""Benchmarks that ship with the package, so they run after a plain
``pip install .`` (``fastfair bench segment|dc|step|all``) as well as from a
checkout (``python benchmarks/<script>.py``).

- :mod:`fastfair.bench.segment`: group-count scaling of segment means
  (fastfair vs the reference loop, index_add_, scatter_reduce, torch_scatter);
- :mod:`fastfair.bench.dc_step`: the real-gradient side of one DC outer step,
  per-group gradients by the reference loop vs one pass of
  :func:`fastfair.pergroup.segment_gradients`;
- :mod:`fastfair.bench.step_time`: end-to-end step time and peak memory (its
  pieces: ``step_config`` sizes and datasets, ``step_loops`` the
  reference-style loops, ``step_memory`` the peak meter, ``step_report``
  target ratios and plots);
- :mod:`fastfair.bench.timing`: the shared timing method.

Each module has ``main(argv) -> list[dict]`` (the result rows) and writes a
JSON file and a log-log PNG beside it, by default under
``benchmarks/results/`` of the current directory.
"""
