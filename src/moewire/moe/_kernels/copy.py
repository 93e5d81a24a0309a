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


@triton.jit
def _copy_words(src, dst, n, BLOCK: tl.constexpr):
    """Words ``[0, n)`` of ``src`` into ``dst``, program ``i`` of ``grid[0]`` taking every
    ``grid[0]``-th block of ``BLOCK``."""
    step = tl.num_programs(0) * BLOCK
    for start in range(tl.program_id(0) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def copy_table_kernel(table_ptr, a_dst, b_dst, BLOCK: tl.constexpr):
    """The copy of :func:`copy_pair_kernel` with its sources read from a table at run time:
    ``table`` (int64) holds ``a_src, b_src`` (4-byte aligned addresses), ``na, nb`` (int32
    words) and the addresses of ``a_dst, b_dst``, so a CUDA graph that captured this launch
    copies whatever the table names when it replays. Programs stride over the words
    (``grid[0]`` programs per pair). A source is addressed from its (16-byte aligned)
    destination, so that one whose address and word count are multiples of 16 bytes is
    read 16 bytes at a time."""
    j = tl.program_id(1)
    addr = tl.load(table_ptr + j)
    n = tl.load(table_ptr + 2 + j)
    delta = (addr - tl.load(table_ptr + 4 + j)) // 4  # exact: both are 4-byte aligned
    if j == 0:  # noqa: SIM108 (a run-time branch in @jit: no conditional expression)
        dst = a_dst.to(tl.pointer_type(tl.int32))
    else:
        dst = b_dst.to(tl.pointer_type(tl.int32))
    if (addr % 16 == 0) & (n % 4 == 0):
        _copy_words(dst + tl.multiple_of(delta, 4), dst, tl.multiple_of(n, 4), BLOCK)
    else:
        _copy_words(dst + delta, dst, n, BLOCK)
