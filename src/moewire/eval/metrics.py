"""The figures of one configuration against the unquantized model, llama.cpp's set:
perplexity, PPL ratio, mean and 99th-percentile KL divergence of the next-token
distributions, and how often the top-1 token is the same.

Every rank accumulates over its own tokens; :meth:`Metrics.summary` combines the ranks
(sums all-reduced in float64, per-token KL values all-gathered for the percentile), so
every rank returns the same figures.

Shape legend: ``T`` tokens of a batch, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def log_probs(logits_TV: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, V]`` log-softmax of ``logits_TV`` (any float dtype)."""
    return F.log_softmax(logits_TV.float(), dim=-1)


class Metrics:
    """Accumulates one configuration's figures over batches of tokens."""

    def __init__(self, device: torch.device) -> None:
        #: [sum of NLL, tokens, tokens whose top-1 matches the reference, sum and sum of
        #: squares of the per-token NLL difference to the reference], float64.
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)
        self._kl: list[torch.Tensor] = []

    def add(self, ref_TV: torch.Tensor, logp_TV: torch.Tensor, target_T: torch.Tensor) -> None:
        """One batch.

        Args:
            ref_TV: fp32 ``[T, V]`` log-probabilities of the unquantized model.
            logp_TV: fp32 ``[T, V]`` log-probabilities of this configuration.
            target_T: int64 ``[T]`` the actual next tokens.
        """
        nll_T = -logp_TV.gather(1, target_T[:, None]).squeeze(1).double()
        d_T = nll_T + ref_TV.gather(1, target_T[:, None]).squeeze(1).double()
        same = (ref_TV.argmax(-1) == logp_TV.argmax(-1)).sum(dtype=torch.float64)
        count = nll_T.new_tensor(target_T.numel())
        self._sums += torch.stack([nll_T.sum(), count, same, d_T.sum(), (d_T * d_T).sum()])
        self._kl.append((ref_TV.exp() * (ref_TV - logp_TV)).sum(-1))

    def summary(self, group: dist.ProcessGroup | None, reference_ppl: float | None) -> dict:
        """The figures over every rank's tokens (a collective: every rank calls it).

        Returns:
            ``{"ppl", "ppl_ratio", "ln_ppl_ratio_se", "kl_mean", "kl_p99", "top1_same_pct",
            "tokens"}``; ``ppl_ratio`` is 1 when ``reference_ppl`` is None (the reference
            itself); ``ln_ppl_ratio_se`` is the standard error of ``ln(ppl_ratio)``, the mean
            per-token NLL difference to the reference (its sample std / sqrt(tokens)).
        """
        sums = self._sums.clone()
        kl_T = torch.cat(self._kl) if self._kl else sums.new_zeros(0, dtype=torch.float32)
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
            parts = [torch.empty_like(kl_T) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, kl_T.contiguous(), group=group)  # equal sizes by design
            kl_T = torch.cat(parts)
        nll, count, same, d_sum, d_sq = (float(v) for v in sums.cpu())
        ppl = math.exp(nll / count)
        d_var = max(d_sq / count - (d_sum / count) ** 2, 0.0)
        kl = kl_T.double().cpu().numpy()
        return {
            "ppl": ppl,
            "ppl_ratio": 1.0 if reference_ppl is None else ppl / reference_ppl,
            "ln_ppl_ratio_se": math.sqrt(d_var / max(count - 1, 1)),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99.0)),
            "top1_same_pct": 100.0 * same / count,
            "tokens": int(count),
        }
