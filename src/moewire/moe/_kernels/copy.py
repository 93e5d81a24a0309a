"""One launch that copies two contiguous buffers: the inputs of a CUDA-graph step.

A replayed decode step starts with its inputs copied into the graph's static buffers (the
activations and the router logits). Two ``copy_`` calls cost two launches of host time
before the replay; this kernel moves both in one (launcher: ``moewire.graphs``).

Program ``(b, j)`` copies words ``[b*BLOCK, (b+1)*BLOCK)`` of pair ``j`` (0: ``a``, 1:
``b``). The buffers come with their own dtypes (no int32 views to build on the host: each
costs host time on every step) and are read and written as int32 words.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_pair_kernel(a_src, a_dst, na, b_src, b_dst, nb, BLOCK: tl.constexpr):
    """The first ``na`` int32 words of ``a_src`` into ``a_dst``, and ``nb`` of ``b_src``
    into ``b_dst`` (pointers of any dtype, 4-byte aligned)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if tl.program_id(1) == 0:
        m = offs < na
        v = tl.load(a_src.to(tl.pointer_type(tl.int32)) + offs, mask=m)
        tl.store(a_dst.to(tl.pointer_type(tl.int32)) + offs, v, mask=m)
    else:
        m = offs < nb
        v = tl.load(b_src.to(tl.pointer_type(tl.int32)) + offs, mask=m)
        tl.store(b_dst.to(tl.pointer_type(tl.int32)) + offs, v, mask=m)
