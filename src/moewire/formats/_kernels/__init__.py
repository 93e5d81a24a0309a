"""Private ``@triton.jit`` code of the wire formats; launched only from ``formats/_triton.py``."""
