"""Activations to measure on, and the accuracy metric.

``heavy_tailed`` imitates the hidden states entering a transformer's MoE layer: a
Student-t body (3 degrees of freedom: most values small, a fat tail) plus a few outlier
channels 50-200x larger, the pattern reported for LLM activations (LLM.int8(), SmoothQuant).
"""

from __future__ import annotations

import math

import torch


def gaussian(t: int, h: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[t, h]`` fp32 standard normal values."""
    return torch.randn(t, h, generator=generator)


def heavy_tailed(t: int, h: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[t, h]`` fp32 Student-t(3) values with ``max(1, h // 256)`` outlier channels
    scaled by 50-200x."""
    z = torch.randn(t, h, generator=generator)
    chi2 = torch.randn(t, h, 3, generator=generator).pow(2).sum(-1)
    x = z / torch.sqrt(chi2 / 3)
    channels = torch.randperm(h, generator=generator)[: max(1, h // 256)]
    x[:, channels] *= torch.empty(len(channels)).uniform_(50, 200, generator=generator)
    return x


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10*log10(sum(x^2) / sum((x - x_hat)^2))`` in dB,
    computed in float64; ``inf`` when ``x_hat == x``."""
    x = x.double()
    err = (x - x_hat.double()).pow(2).sum().item()
    sig = x.pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(sig / err)
