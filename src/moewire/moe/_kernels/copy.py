"""One launch that copies two contiguous buffers: the inputs of a CUDA-graph step.

A replayed decode step starts with its inputs copied into the graph's static buffers (the
activations and the router logits). Two ``copy_`` calls cost two launches of host time
before the replay; this kernel moves both in one (launcher: ``moewire.graphs``).

Program ``(b, j)`` copies words ``[b*BLOCK, (b+1)*BLOCK)`` of pair ``j`` (0: ``a``, 1:
``b``); buffers are passed as int32 words.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_pair_kernel(a_src, a_dst, na, b_src, b_dst, nb, BLOCK: tl.constexpr):
    """``a_dst[:na] = a_src[:na]`` and ``b_dst[:nb] = b_src[:nb]`` (int32 words)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(1) == 0:
        m = offs < na
        tl.store(a_dst + offs, tl.load(a_src + offs, mask=m), mask=m)
    else:
        m = offs < nb
        tl.store(b_dst + offs, tl.load(b_src + offs, mask=m), mask=m)
