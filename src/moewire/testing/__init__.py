"""Helpers shared by the tests, the benchmarks and ``moewire check``.

- ``data``: activations to measure on (``gaussian``, ``heavy_tailed``) and ``sqnr_db``.
- ``spawn``: ``run_distributed``, one function on every rank of a fresh gloo group on CPU.
- ``reference``: ``dispatch_reference``, the rows a rank must receive, built on one process.

Its place in the layer order (DESIGN.md, "Where things live"): above the library
(``formats`` ... ``integrations``), below ``bench``, ``check`` and ``cli``. It imports only
torch and ``formats``, so anything above may use it.
"""
