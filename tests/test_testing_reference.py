"""Tier a: the shared single-process dispatch reference (moewire.testing.reference)."""

from __future__ import annotations

import torch

from moewire.formats import WireSpec
from moewire.testing.reference import dispatch_reference, hosts


def test_hosts_contiguous_expert_ranges():
    ids = torch.tensor([[0, 1], [2, 3], [1, 6], [7, 4]])  # E=8, W=4: rank r hosts 2r, 2r+1
    assert hosts(ids, 0, 4, 8).tolist() == [True, False, True, False]
    assert hosts(ids, 3, 4, 8).tolist() == [False, False, True, True]
    assert hosts(ids, 2, 4, 8).tolist() == [False, False, False, True]


def test_dispatch_reference_is_pack_of_the_gathered_tokens():
    spec = WireSpec("fp8", 32, extras={"gid": (torch.int32, 1)})
    gen = torch.Generator().manual_seed(0)
    inputs, ids = [], []
    for src, t in enumerate((3, 0, 4)):
        gid = torch.arange(10 * src, 10 * src + t, dtype=torch.int32)[:, None]
        inputs.append((torch.randn(t, 32, generator=gen), {"gid": gid}))
        ids.append(torch.randint(0, 6, (t, 2), generator=gen))
    every = dispatch_reference(spec, inputs, "allgather", rank=1)
    x_all = torch.cat([x for x, _ in inputs])
    gid_all = torch.cat([e["gid"] for _, e in inputs])
    assert torch.equal(every, spec.pack(x_all, gid=gid_all))
    for rank in range(3):
        got = dispatch_reference(spec, inputs, "alltoall", rank=rank, ids=ids, num_experts=6)
        keep = (torch.cat(ids) // 2 == rank).any(-1)
        assert torch.equal(got, spec.pack(x_all[keep], gid=gid_all[keep])), rank
