"""The light launch path's key (``moewire.formats._launch``): it must refine Triton's
specialization of every argument (tensors on dtype and 16-byte alignment, ints on being 1,
divisibility by 16 and width), or a kernel compiled for one call would run another's."""

from __future__ import annotations

import pytest
import torch

from moewire.formats._launch import arg_key, int_key


def test_int_key_classes():
    assert int_key(1) != int_key(2) != int_key(16)
    assert int_key(16) == int_key(32) == int_key(0) == int_key(-16)
    assert int_key(17) == int_key(3) == int_key(-3)
    assert int_key(1 << 31) != int_key(1 << 30)  # 64-bit vs 32-bit
    assert int_key((1 << 31) - 16) == int_key(16)
    assert int_key(-(1 << 31)) == int_key(16) and int_key(-(1 << 31) - 16) != int_key(16)


def test_arg_key_tensors_and_nesting():
    buf = torch.zeros(64, dtype=torch.uint8)
    a16 = buf[16:]
    a1 = buf[1:]
    assert arg_key(buf) == arg_key(a16)  # both 16-byte aligned (allocations are)
    assert arg_key(buf) != arg_key(a1)
    assert arg_key(buf) != arg_key(buf.view(torch.int8))
    assert arg_key(buf, 7, 2.5, True, None) == arg_key(a16, 9, 0.5, True, None)
    assert arg_key(buf, 7) != arg_key(buf, 1)
    assert arg_key((buf, 16), 3) == arg_key((a16, 48), 5)
    assert arg_key((buf, 16), 3) != arg_key((a1, 16), 3)
    with pytest.raises(TypeError, match="unsupported argument type str"):
        arg_key("x")


def test_launch_hooks_send_launches_through_triton():
    """An installed launch hook (a profiler's) must see every launch: the light path is
    taken only while Triton's hook chains are empty."""
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        pytest.skip("this Triton has no knobs")
    from moewire.formats import _launch

    assert _launch._load_knobs()
    assert not _launch._hooked()
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hook is not a HookChain")

    def hook(*args):
        pass

    chain.add(hook)
    try:
        assert _launch._hooked()
    finally:
        chain.remove(hook)
    assert not _launch._hooked()
