"""Adversarial test activations: rounding ties, zeros, subnormals, huge and non-finite blocks.

Fresh random values on every call (no fixed seed) unless a generator is passed. Gaussian and
heavy-tailed data come from ``moewire.testing.data``.
"""

from __future__ import annotations

import torch

# e2m1 rounding ties and the codes themselves; scaled by a power of two so that every
# format's block scale is exact and these values reach the element encoder unchanged.
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
E4M3_TIES = (1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 104.0, 120.0 + 4.0, 448.0)


def adversarial(t: int, h: int, block: int = 16, gen: torch.Generator | None = None):
    """Blocks of ``block`` values, each one of: exact ties at amax = 6 * 2**e, e4m3 ties at
    amax = 448, all +0 / -0, subnormals, huge magnitudes, a NaN, a +-Inf, one non-zero."""
    x = torch.randn(t, h // block, block, generator=gen)
    kind = torch.randint(0, 10, (t, h // block), generator=gen)
    e2 = torch.tensor(E2M1_TIES)
    e4 = torch.tensor(E4M3_TIES)
    for k in range(10):
        m = kind == k
        n = int(m.sum())
        if not n:
            continue
        if k == 0:  # e2m1 ties with amax exactly 6 * 2**e
            v = e2[torch.randint(0, len(e2), (n, block), generator=gen)]
            v[:, 0] = 6.0
            sign = torch.randint(0, 2, (n, block), generator=gen) * 2 - 1
            p = 2.0 ** torch.randint(-8, 8, (n, 1), generator=gen).float()
            x[m] = v * sign * p
        elif k == 1:  # e4m3 ties with amax exactly 448
            v = e4[torch.randint(0, len(e4), (n, block), generator=gen)]
            v[:, 0] = 448.0
            x[m] = v
        elif k == 2:
            x[m] = 0.0
        elif k == 3:
            x[m] = -0.0
        elif k == 4:
            x[m] = torch.randn(n, block, generator=gen) * 1e-40  # fp32 subnormals
        elif k == 5:
            x[m] = torch.randn(n, block, generator=gen) * 1e37
        elif k == 6:
            b = x[m]
            b[:, int(torch.randint(0, block, (1,), generator=gen))] = float("nan")
            x[m] = b
        elif k == 7:
            b = x[m]
            b[:, 0] = (
                float("inf") if int(torch.randint(0, 2, (1,), generator=gen)) else -float("inf")
            )
            x[m] = b
        elif k == 8:
            b = torch.zeros(n, block)
            b[:, -1] = torch.randn(n, generator=gen)
            x[m] = b
    return x.reshape(t, h)
