"""Helpers shared by the tests, the benchmarks and ``moewire check``.

- ``data``: activations to measure on (``gaussian``, ``heavy_tailed``) and ``sqnr_db``.
- ``spawn``: the one process-spawn harness: ``run_distributed``, one function on every rank
  of a fresh gloo group on CPU; ``spawn``, the same returning how each rank ended (NCCL too,
  no run limit, a grace after a failure); ``init_group``, the group set-up (also torchrun's).
- ``reference``: ``dispatch_reference``, the rows a rank must receive, built on one process.

Its place in the layer order (DESIGN.md, "Where things live"): above the library
(``formats`` ... ``integrations``), below ``bench``, ``check`` and ``cli``. It imports only
torch and ``formats``, so anything above may use it.
"""
