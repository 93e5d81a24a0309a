"""Keep the ranks of an expert-parallel group in step when their work differs in length.

**The rule.** Every ``EPMoE`` forward is a collective: every rank of the group must call
each MoE layer the same number of times, in the same order, each with its own tokens
(possibly none). Data-parallel serving engines keep this rule by stepping idle ranks with
zero tokens. A plain ``model.generate()`` does not: a rank whose generation ends first
stops calling the model, and the ranks still generating fail in their next dispatch's
count exchange (``CommError``) or wait until the group's timeout.

:class:`in_step` (a context manager) and :func:`generate` keep the rule for you. Each model
forward inside the context first takes part in one small all-reduce, "how many ranks are
still working". When this rank's work is done, leaving the context steps every MoE layer
of the model with zero tokens, once per forward the other ranks still make, until every
rank is done. So different prompt lengths, batch sizes and ``max_new_tokens`` per rank
just work::

    from moewire.integrations.in_step import generate
    out = generate(model, input_ids, max_new_tokens=n_this_rank)   # on every rank

Assumption (true of transformers' decoder stacks): one model forward calls each MoE layer
once, in the order of ``model.modules()``. Cost per forward: one all-reduce of one int32.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moewire.moe.layer import EPMoE


def moe_layers(model: nn.Module) -> list[EPMoE]:
    """The model's sharded ``EPMoE`` layers (those with a process group), in module order."""
    return [m for m in model.modules() if isinstance(m, EPMoE) and m.comm_name != "local"]


class in_step:
    """Context manager: inside it, ``model``'s forwards count the working ranks; on a
    clean exit this rank steps the MoE layers with zero tokens until every rank is done.

    Args:
        model: a model whose MoE blocks are ``EPMoE`` layers over ``group`` (e.g. after
            :func:`moewire.integrations.transformers.expert_parallel`); every rank of the
            group enters the context with its own inputs.
        group: the expert-parallel process group (None: the default group).

    Raises:
        ValueError: ``model`` has no sharded ``EPMoE`` layer.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError(
                f"in_step: {type(model).__name__} has no EPMoE layer with a process group "
                "(call moewire.integrations.transformers.expert_parallel first)"
            )
        self.model, self.group = model, group
        self.steps = 0  # forwards this rank made inside the context
        self.idle_steps = 0  # zero-token steps after this rank's work ended
        self._hook: Any = None

    def _working(self, mine: int) -> int:
        """All-reduce of "this rank is still working" (1 or 0): ranks still working."""
        device = self.layers[0].local_experts.w13_L2IH.device
        flag = torch.tensor([mine], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        return int(flag.item())

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self.steps += 1
        self._working(1)

    def __enter__(self) -> in_step:
        self._hook = self.model.register_forward_pre_hook(self._pre_forward)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hook.remove()
        if exc_type is None:  # after an error the group is not in step any more
            self.finish()

    @torch.no_grad()
    def finish(self) -> None:
        """Step every MoE layer with zero tokens, once per forward of the ranks still
        working, until none is."""
        while self._working(0):
            for layer in self.layers:
                c = layer.config
                device = layer.local_experts.w13_L2IH.device
                x_0H = torch.empty(0, c.hidden, dtype=torch.bfloat16, device=device)
                layer(x_0H, torch.empty(0, c.num_experts, device=device))
            self.idle_steps += 1


def generate(
    model: nn.Module, *args: Any, group: dist.ProcessGroup | None = None, **kwargs: Any
) -> Any:
    """``model.generate(*args, **kwargs)`` inside :class:`in_step`: every rank of ``group``
    calls it with its own inputs and lengths and gets its own output."""
    with in_step(model, group):
        return model.generate(*args, **kwargs)
