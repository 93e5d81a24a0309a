"""``EPMoE``: the expert-parallel MoE layer. Rank-local tokens in, rank-local outputs out.

    x_TH ─pack─▶ rows_TR ─dispatch─▶ rows_NR ─route, local experts─▶ partial_NH ─combine─▶ y_TH

Rank ``r`` of ``W`` hosts experts ``[r*E/W, (r+1)*E/W)``. Rows carry the quantized tokens
plus either the fp32 router logits (``routing="logits"``: every rank routes every row it
receives, as vLLM PR 30014 does) or the top-k ids (int32) and weights (fp32) (``routing="topk"``:
each rank routes its own tokens before the dispatch). Routing is deterministic
(``routing.py``), so both modes pick the same experts with the same weights.

**Activation dtype.** The layer rounds ``x`` to bf16 at its boundary (a no-op for bf16
models, vLLM PR 30014's case) and returns ``y`` in ``x``'s dtype. So the wire always quantizes
bf16 values, and ``quantize="after"`` (bf16 rows travel, the receiver quantizes them: the
path PR 30014 replaced) is bitwise identical to ``quantize="before"`` for every input dtype:
bf16 rows hold ``x`` exactly, quantization is row-local, so the receiver quantizes the same
values to the same bytes (WIRE_FORMATS.md, last section). Without the cast, an fp32 ``x``
would be quantized directly in "before" but through bf16 in "after".

**Summation.** Each rank sums its local experts' weighted outputs per row in fp32 in ``k``
order; ``combine`` then sums the ranks' partial rows (fp32 by default). With one rank
(``comm="local"``) that is exactly the unsharded layer's sum; with ``W`` ranks only the
association of those ``K`` fp32 terms differs.

Shape legend: ``T`` tokens on this rank, ``N`` rows received, ``H`` hidden, ``E`` experts,
``K`` top-k, ``R`` row bytes, ``I`` intermediate, ``L`` local experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moewire.comm import make_comm
from moewire.comm.expert_ids import check_topk_ids
from moewire.comm.local import LocalComm
from moewire.formats import WireSpec, format_class, nvfp4_global_scale
from moewire.moe.config import MoEConfig
from moewire.moe.experts import FP8_IMPLS, LocalExperts, resolve_impl
from moewire.moe.layer_checks import (
    check_fp8_device,
    check_padding,
    check_process_group,
    reload_global_scale,
)
from moewire.moe.options import LayerOptions, layer_options
from moewire.moe.routing import check_router_bias, route, routing_extras
from moewire.moe.weights import check_expert_weights, check_finite

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _option(name: str) -> property:
    return property(lambda self: getattr(self.options, name), doc=f"``options.{name}``.")


class EPMoE(nn.Module):
    """An MoE layer whose experts are sharded over ``group``, with quantized rows on the wire.

    ``EPMoE(config, group, options)`` or, the same layer, ``EPMoE(config, group, wire=...,
    comm=..., ...)`` with the fields of :class:`~moewire.LayerOptions` as keywords (not
    both: ``TypeError``).

    Args:
        config: the layer's shapes and router.
        group: the expert-parallel process group (None: the default group). Unused with
            ``comm="local"``.
        options: a :class:`~moewire.LayerOptions`: wire format, comm backend, routing mode,
            nvfp4 global scale, where to quantize, expert path, combine dtype and wire.
            None: built from ``**option_kwargs`` (defaults where not given).
        shared_expert: optional module ``[T, H] -> [T, H]`` run on this rank's unquantized
            ``x`` and added to the output (DeepSeek-V3's shared experts).
        **option_kwargs: the fields of :class:`~moewire.LayerOptions` (``wire="nvfp4"``,
            ``comm="allgather"``, ``routing``, ``global_scale``, ``quantize``, ``experts``,
            ``combine_dtype``, ``combine_wire``, ``check``).

    Call :meth:`load_experts` before the first forward.
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup | None = None,
        options: LayerOptions | None = None,
        *,
        shared_expert: nn.Module | None = None,
        **option_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        options = layer_options(options, option_kwargs)
        if options.experts == "fp8":
            check_fp8_device(None)
        if shared_expert is not None and not callable(shared_expert):
            raise TypeError(f"shared_expert must be callable, got {type(shared_expert).__name__}")
        self.config, self.options, self.shared_expert = config, options, shared_expert
        self._group = group
        self._extras = routing_extras(options.routing, config.num_experts, config.top_k)
        self.world_size, self.rank = self._place_in_group()
        self._init_wire()
        self.num_local, self.first_expert = self._expert_shard()
        self.local_experts: LocalExperts | None = None
        self.router_bias_E: torch.Tensor | None = None
        #: Optional ``stage -> context manager`` hook around the stages "pack", "dispatch",
        #: "experts" (routing included) and "combine" of each forward (``moewire bench``).
        self.stage_timer: Callable[[str], AbstractContextManager] | None = None

    # The options under the names the layer always had (read-only: see ``options``).
    comm_name = _option("comm")
    routing = _option("routing")
    quantize = _option("quantize")
    experts_impl = _option("experts")
    combine_dtype = _option("combine_dtype")
    combine_wire = _option("combine_wire")

    def _place_in_group(self) -> tuple[int, int]:
        """``(world size, rank)``: ``(1, 0)`` with ``comm="local"``, else the group's."""
        if self.comm_name == "local":
            return 1, 0
        check_process_group(self.comm_name)
        return dist.get_world_size(self._group), dist.get_rank(self._group)

    def _init_wire(self) -> None:
        """The row layouts and the comm now, or (nvfp4 without a global scale) the checks
        now and the rest at the first forward's calibration."""
        self.spec: WireSpec | None = None
        self.travel_spec: WireSpec | None = None
        self.comm: Any = None
        wire, g = self.options.wire, self.options.global_scale
        needs_g = format_class(wire).needs_global_scale
        if needs_g:
            # The fp32 bits of g (0: not calibrated yet), so that state_dict() holds the
            # calibrated scale and model.to(dtype) cannot round it.
            self.register_buffer("global_scale_bits", torch.zeros((), dtype=torch.int32))
            self.register_load_state_dict_post_hook(reload_global_scale)
        if needs_g and g is None:
            WireSpec(wire, self.config.hidden, global_scale=1.0, extras=self._extras)  # validate
        else:
            self._build_wire(g)

    def _expert_shard(self) -> tuple[int, int]:
        """``(E/W, rank*E/W)``: this rank's expert count and first expert."""
        e = self.config.num_experts
        if e % self.world_size:
            raise ValueError(
                f"num_experts={e} must be a multiple of the group size {self.world_size}"
            )
        num_local = e // self.world_size
        return num_local, self.rank * num_local

    def _build_wire(self, global_scale: float | torch.Tensor | None) -> None:
        """The row layouts and the comm, once the wire format's parameters are known."""
        hidden, extras, wire = self.config.hidden, self._extras, self.options.wire
        self.spec = WireSpec(wire, hidden, global_scale=global_scale, extras=extras)
        if self.spec.wire_format.needs_global_scale:
            g = torch.tensor(self.spec.global_scale, dtype=torch.float32)
            self.global_scale_bits.copy_(g.view(torch.int32))
        self.travel_spec = (
            self.spec if self.quantize == "before" else WireSpec("bf16", hidden, extras=extras)
        )
        if self.comm_name == "local":
            self.comm = LocalComm(self.combine_wire)
        else:
            # spec and E make every dispatch check that all ranks agree on the format,
            # hidden size, global scale, extras and expert count (in the count exchange).
            self.comm = make_comm(
                self.comm_name,
                self._group,
                num_experts=self.config.num_experts,
                spec=self.travel_spec,
                combine_wire=self.combine_wire,
                check=self.options.check,
            )

    def _calibrate(self, x16_TH: torch.Tensor) -> None:
        """nvfp4 without a global scale: ``g = 448*6 / max finite |x|`` over every rank."""
        abs_TH = x16_TH.float().abs()
        finite = torch.nan_to_num(abs_TH, nan=0.0, posinf=0.0)
        stats = torch.zeros(2, device=x16_TH.device)  # [max finite |x|, any NaN/Inf]
        if finite.numel():
            stats[0] = finite.amax()
            stats[1] = (~torch.isfinite(abs_TH)).any().float()
        if self.comm_name != "local":
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self._group)
        value = float(stats[0].item())
        if value == 0:
            what = "NaN/Inf or zero" if stats[1].item() else "zero (or empty)"
            raise ValueError(
                "EPMoE(wire='nvfp4', global_scale=None) calibrates on the first forward, but "
                f"every rank's x was {what}: no finite nonzero value to calibrate on; pass "
                "global_scale=g, e.g. moewire.nvfp4_global_scale(calibration_amax)"
            )
        self._build_wire(nvfp4_global_scale(value))

    def _stage(self, name: str) -> AbstractContextManager:
        return nullcontext() if self.stage_timer is None else self.stage_timer(name)

    # ------------------------------------------------------------------ weights
    def load_experts(
        self,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        router_bias: torch.Tensor | None = None,
        *,
        first_expert: int | None = None,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
    ) -> None:
        """Keep this rank's contiguous shard of the expert weights, in the precision of the
        expert path (bf16, or e4m3 + their fp32 scales for the fp8 paths), once.

        Args:
            w13_E2IH: ``[E, 2I, H]`` (all experts; this rank keeps its slice) or ``[E/W,
                2I, H]`` (this rank's shard only, with ``first_expert``): each expert's gate
                rows, then its up rows. Float, or float8_e4m3fn with ``w13_scale``.
            w2_EHI: ``[E or E/W, H, I]``: each expert's down projection, same dtypes.
            router_bias: ``deepseek_v3`` only: the ``[E]`` expert score correction bias
                (every rank keeps all of it: routing is global).
            first_expert: with a shard, its first global expert id (must be this rank's,
                ``rank * E/W``).
            w13_scale / w2_scale: fp32 scales of e4m3 weights: per output channel
                ``[E or E/W, O]`` (weight ``q * s``) or per 128x128 block ``[E or E/W,
                ceil(O/128), ceil(K/128)]`` (a DeepSeek-V3 checkpoint's
                ``weight_scale_inv``). fp8 experts keep either as given (no bf16 copy, no
                requantization): block scales run DeepSeek-V3's block-scaled fp8 GEMMs
                with 1x128 activation scales and need ``hidden`` and ``intermediate``
                multiples of 128 (else ``ValueError``); bf16 experts dequantize them once
                here. Float weights on fp8 experts are quantized per output channel.

        The weights stay on their device, which is where the forward runs.
        """
        n = check_expert_weights(self.config, self.num_local, w13_E2IH, w2_EHI, w13_scale, w2_scale)
        sl = self._shard_slice(n, first_expert)
        check_router_bias(self.config, router_bias)
        if self.experts_impl == "fp8":
            check_fp8_device(w13_E2IH.device)
        check_finite("router_bias", router_bias)
        self.local_experts = LocalExperts(
            w13_E2IH[sl].detach(),
            w2_EHI[sl].detach(),
            self.first_expert,
            fp8=self.experts_impl in FP8_IMPLS,
            w13_scale=None if w13_scale is None else w13_scale[sl].detach(),
            w2_scale=None if w2_scale is None else w2_scale[sl].detach(),
            num_experts=self.config.num_experts,
        )
        self.router_bias_E = (
            None
            if router_bias is None
            else router_bias.detach().to(device=w13_E2IH.device, dtype=torch.float32)
        )

    def _shard_slice(self, n: int, first_expert: int | None) -> slice:
        """This rank's experts among ``n`` given: all ``E`` (``first_expert`` None) or only
        this rank's shard (``first_expert`` this rank's); ``ValueError`` otherwise."""
        if n == self.config.num_experts and first_expert is None:
            return slice(self.first_expert, self.first_expert + self.num_local)
        if n != self.num_local:
            raise ValueError(
                f"first_expert={first_expert} is for a shard of {self.num_local} experts; "
                f"the weights hold {n}"
            )
        if first_expert != self.first_expert:
            raise ValueError(
                f"first_expert={first_expert}: this rank's shard (rank {self.rank} of "
                f"{self.world_size}, {self.num_local} experts each) starts at expert "
                f"{self.first_expert}"
            )
        return slice(0, n)

    def load_local_experts(
        self,
        w13_L2IH: torch.Tensor,
        w2_LHI: torch.Tensor,
        router_bias: torch.Tensor | None = None,
        **scales: torch.Tensor,
    ) -> None:
        """Keep this rank's experts, given only them (a checkpoint read shard by shard):
        :meth:`load_experts` with ``first_expert`` this rank's. Weights already bf16 and
        contiguous are kept without a copy, so several layers can share one shard.

        Args:
            w13_L2IH: ``[L, 2I, H]``, ``L = E/W``: gate rows, then up rows, of the global
                experts ``[rank*L, (rank+1)*L)``.
            w2_LHI: ``[L, H, I]``: their down projections.
            router_bias: ``deepseek_v3`` only: the full ``[E]`` score correction bias.
            **scales: ``w13_scale`` / ``w2_scale`` of e4m3 weights, as in :meth:`load_experts`.
        """
        self.load_experts(w13_L2IH, w2_LHI, router_bias, first_expert=self.first_expert, **scales)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x_TH: torch.Tensor, router_logits_TE: torch.Tensor) -> None:
        c = self.config
        if self.local_experts is None:
            raise RuntimeError("EPMoE: call load_experts(w13, w2) before the first forward")
        for name, t in (("x", x_TH), ("router_logits", router_logits_TE)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x_TH.dtype not in X_DTYPES:
            raise TypeError(f"x must be bfloat16, float16 or float32, got dtype {x_TH.dtype}")
        if x_TH.dim() != 2 or x_TH.shape[1] != c.hidden:
            raise ValueError(f"x must be [T, hidden={c.hidden}], got shape {tuple(x_TH.shape)}")
        if not router_logits_TE.is_floating_point():
            raise TypeError(f"router_logits must be floating point, got {router_logits_TE.dtype}")
        if tuple(router_logits_TE.shape) != (x_TH.shape[0], c.num_experts):
            raise ValueError(
                f"router_logits must be [T={x_TH.shape[0]}, E={c.num_experts}], "
                f"got shape {tuple(router_logits_TE.shape)}"
            )
        dev = self.local_experts.device
        if x_TH.device != dev or router_logits_TE.device != dev:
            raise ValueError(
                f"x ({x_TH.device}) and router_logits ({router_logits_TE.device}) must be on "
                f"the experts' device {dev}"
            )

    def forward(
        self,
        x_TH: torch.Tensor,
        router_logits_TE: torch.Tensor,
        *,
        counts: Sequence[int] | torch.Tensor | None = None,
        valid_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's tokens through the sharded layer.

        Args:
            x_TH: ``[T, H]`` bf16/fp16/fp32 activations of this rank's tokens (``T`` may
                differ between ranks, and be 0); rounded to bf16 before quantization.
            router_logits_TE: ``[T, E]`` float router logits (routed in fp32).
            counts: every rank's ``T`` (ints or a CPU int tensor, the same on every rank,
                e.g. an engine's data-parallel metadata): the dispatch then needs no count
                exchange and no host sync (see :meth:`moewire.comm.Comm.dispatch`).
            valid_counts: padded batches (CUDA graphs, :mod:`moewire.graphs`): int32
                ``[W]`` on the device, how many of each rank's ``T`` rows are real tokens
                (the rest are padding: routed to no expert, their outputs zeros). Needs
                ``counts`` equal to ``T`` on every rank and ``comm`` "allgather", "grouped"
                or "local" (rows arrive rank by rank).

        Returns:
            ``[T, H]`` in ``x_TH.dtype``: ``sum_k w_k * expert_k(x)`` over the token's top-k
            experts on every rank (plus ``shared_expert(x_TH)``).
        """
        self._check_inputs(x_TH, router_logits_TE)
        x16_TH = x_TH.to(torch.bfloat16)
        if self.spec is None:
            self._calibrate(x16_TH)
        check_padding(self.comm, self.world_size, x_TH.shape[0], counts, valid_counts)
        ids_TK, extras = self._route_sent(router_logits_TE.float().contiguous())
        with self._stage("pack"):
            rows_TR = self.travel_spec.pack(x16_TH, **extras)
        with self._stage("dispatch"):
            kw = {} if counts is None else {"counts": counts}
            recv_NR, handle = self.comm.dispatch(rows_TR, ids_TK, **kw)
        with self._stage("experts"):
            if self.quantize == "after":
                recv_NR = self._quantize_received(recv_NR)
            ids_NK, weights_NK = self._route_received(recv_NR)
            impl = resolve_impl(self.experts_impl, recv_NR.device)
            valid = None if valid_counts is None else (valid_counts, x_TH.shape[0])
            partial_NH = self.local_experts(
                self.spec, recv_NR, ids_NK, weights_NK, impl, self.combine_dtype, valid
            )
        with self._stage("combine"):
            y_TH = self.comm.combine(partial_NH, handle)
        if self.shared_expert is not None:
            y_TH = y_TH.float() + self.shared_expert(x_TH).float()
        return y_TH.to(x_TH.dtype)  # bf16 -> x's dtype rounds as through fp32

    def _route_sent(
        self, logits_TE: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``(ids for the dispatch, extras of the rows)``: this rank's tokens routed where the
        rows carry top-k ids or the comm needs them (:attr:`~moewire.comm.Comm.needs_topk_ids`)."""
        ids_TK = weights_TK = None
        if self.routing == "topk" or self.comm.needs_topk_ids:
            ids_TK, weights_TK = route(self.config, logits_TE, self.router_bias_E)
        if self.routing == "logits":
            return ids_TK, {"router_logits": logits_TE}
        return ids_TK, {"topk_ids": ids_TK.to(torch.int32), "topk_weights": weights_TK}

    def _route_received(self, recv_NR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights of the received rows (padding rows, if any, are dropped
        by the expert stage's plan)."""
        view = self.spec.unpack(recv_NR)
        if self.routing == "logits":
            logits_NE = view.extras["router_logits"]
            ids_NK, weights_NK = route(self.config, logits_NE, self.router_bias_E)
        else:
            ids_NK, weights_NK = view.extras["topk_ids"], view.extras["topk_weights"]
            if not _capturing(recv_NR):  # one host sync; under capture bad ids select nothing
                check_topk_ids(
                    ids_NK, self.config.num_experts, name="received topk_ids", distinct=True
                )
        return ids_NK, weights_NK

    def _quantize_received(self, recv_NR: torch.Tensor) -> torch.Tensor:
        """bf16 rows -> rows of the wire format: the receiver-side quantization."""
        view = self.travel_spec.unpack(recv_NR)
        x16_NH = self.travel_spec.dequantize(recv_NR, torch.bfloat16)
        return self.spec.pack(x16_NH, **{k: v for k, v in view.extras.items()})

    def extra_repr(self) -> str:
        return (
            f"{self.config}, wire={self.options.wire!r}, comm={self.comm_name!r}, "
            f"routing={self.routing!r}, quantize={self.quantize!r}, "
            f"experts={self.experts_impl!r}, combine_wire={self.combine_wire!r}, "
            f"rank={self.rank}/{self.world_size}"
        )
