"""The input copy of a CUDA-graph step, as the graph's first node.

A replayed decode step starts with its inputs (the activations and the router logits)
copied into the graph's static buffers. A launch of its own before the replay would cost
host time on every step, where the host's time is the step's latency; this kernel is
captured in the graph instead and reads where its sources are from a small pinned table
the host writes before each replay (``moewire.graphs``). Program ``(b, j)`` copies pair
``j`` (0: ``a``, 1: ``b``) as int32 words, striding over them.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    """``a_dst[:na] = a_src[:na]`` and ``b_dst[:nb] = b_src[:nb]`` (int32 words), the
    sources read from a table at run time: ``table`` (int64) holds ``a_src, b_src`` (4-byte
    aligned addresses), ``na, nb`` (int32 words) and the addresses of ``a_dst, b_dst``, so a
    CUDA graph that captured this launch copies whatever the table names when it replays.
    Programs stride over the words (``grid[0]`` programs per pair). A source is addressed
    from its (16-byte aligned) destination, so that one whose address and word count are
    multiples of 16 bytes is read 16 bytes at a time."""
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
