"""``EPMoE``: the expert-parallel MoE layer. Rank-local tokens in, rank-local outputs out.

    x_TH ─pack─▶ rows_TR ─dispatch─▶ rows_NR ─route, local experts─▶ partial_NH ─combine─▶ y_TH

Rank ``r`` of ``W`` hosts experts ``[r*E/W, (r+1)*E/W)``. Rows carry the quantized tokens
plus either the fp32 router logits (``routing="logits"``: every rank routes every row it
receives, the seed's way) or the top-k ids (int32) and weights (fp32) (``routing="topk"``:
each rank routes its own tokens before the dispatch). Routing is deterministic
(``routing.py``), so both modes pick the same experts with the same weights.

**Activation dtype.** The layer rounds ``x`` to bf16 at its boundary (a no-op for bf16
models, the seed's case) and returns ``y`` in ``x``'s dtype. So the wire always quantizes
bf16 values, and ``quantize="after"`` (bf16 rows travel, the receiver quantizes them: the
path the seed replaced) is bitwise identical to ``quantize="before"`` for every input dtype:
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

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moewire.comm.combine_wire import COMBINE_DTYPES
from moewire.formats import WireSpec, nvfp4_global_scale
from moewire.moe.config import MoEConfig
from moewire.moe.experts import FP8_IMPLS, LocalExperts, resolve_impl
from moewire.moe.routing import check_router_bias, check_topk_ids, route

#: ``comm`` names: the backends of :func:`moewire.make_comm`, plus ``local`` (no process
#: group, one process holds every expert: the unsharded reference layer).
LAYER_COMMS = ("allgather", "alltoall", "grouped", "local")
ROUTING_MODES = ("logits", "topk")
QUANTIZE_MODES = ("before", "after")
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _LocalComm:
    """World size 1 without a process group: dispatch is the identity; combine is too with
    ``combine_wire="bf16"``, else the one source's quantize/dequantize round trip (exactly
    what a one-rank ``allgather`` comm returns)."""

    def __init__(self, combine_wire: str = "bf16") -> None:
        self.combine_wire = combine_wire

    def dispatch(self, rows_TR: torch.Tensor, topk_ids_TK: torch.Tensor | None = None):
        return rows_TR, None

    def combine(self, partial_NH: torch.Tensor, handle: Any) -> torch.Tensor:
        if self.combine_wire == "bf16":
            return partial_NH
        from moewire.comm.combine_wire import combine_codec

        codec = combine_codec(self.combine_wire, partial_NH.shape[1])
        index_T1 = torch.arange(partial_NH.shape[0], device=partial_NH.device)[:, None]
        return codec.decode_sum(codec.encode(partial_NH), index_T1, partial_NH.dtype)


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class EPMoE(nn.Module):
    """An MoE layer whose experts are sharded over ``group``, with quantized rows on the wire.

    Args:
        config: the layer's shapes and router.
        group: the expert-parallel process group (None: the default group). Unused with
            ``comm="local"``.
        wire: wire format of the token rows (one of :data:`moewire.FORMATS`).
        comm: ``"allgather"``, ``"alltoall"``, ``"grouped"`` (:func:`moewire.make_comm`) or
            ``"local"`` (no communication; this process hosts all ``E`` experts).
        routing: ``"logits"`` (router logits travel, receivers route) or ``"topk"`` (senders
            route; ids and weights travel).
        global_scale: ``wire="nvfp4"`` only: the static fp32 global scale ``448*6/amax``
            from calibration (:func:`moewire.nvfp4_global_scale`). None: calibrated once, on
            the first forward, from the largest finite ``|x|`` over every rank (one extra
            all-reduce, that forward only), then fixed; pass a calibrated scale in
            production, where the first batch may not be representative.
        quantize: ``"before"`` (rows quantized before the dispatch) or ``"after"`` (bf16
            rows travel and the receiver quantizes them: the seed's old path, kept for
            measurement). Outputs are bitwise identical.
        experts: compute path of the local experts: ``"auto"``, ``"loop"``, ``"grouped"``,
            ``"fp8"`` or ``"fp8_loop"`` (see ``moe/experts.py``; the fp8 paths need
            ``wire="fp8"``).
        combine_dtype: dtype of the partial sums sent back, fp32 (default) or bf16 (half
            the combine bytes, one more rounding).
        shared_expert: optional module ``[T, H] -> [T, H]`` run on this rank's unquantized
            ``x`` and added to the output (DeepSeek-V3's shared experts).
        combine_wire: how the partial sums travel back (:func:`moewire.make_comm`):
            ``"bf16"`` (default: unquantized, in ``combine_dtype``), ``"fp8"``, ``"mxfp8"``,
            ``"nvfp4"`` (dynamic per-row scale) or ``"mxfp4"``: each rank's partial rows
            (``combine_dtype``) are quantized, dequantized by the owner and added in fp32
            in rank order. ``comm="grouped"`` supports only ``"bf16"``. With
            ``comm="local"`` the full sum makes one round trip (a one-rank group's result).

    Call :meth:`load_experts` before the first forward.
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup | None = None,
        *,
        wire: str = "bf16",
        comm: str = "allgather",
        routing: str = "logits",
        global_scale: float | torch.Tensor | None = None,
        quantize: str = "before",
        experts: str = "auto",
        combine_dtype: torch.dtype = torch.float32,
        shared_expert: nn.Module | None = None,
        combine_wire: str = "bf16",
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        _choice("comm", comm, LAYER_COMMS)
        _choice("routing", routing, ROUTING_MODES)
        _choice("quantize", quantize, QUANTIZE_MODES)
        _choice("combine_dtype", combine_dtype, COMBINE_DTYPES)
        from moewire.comm.combine_wire import check_combine_wire

        check_combine_wire(combine_wire)
        if comm == "grouped" and combine_wire != "bf16":
            raise ValueError(
                f"combine_wire={combine_wire!r}: comm='grouped' (the seed's baseline) "
                "supports only combine_wire='bf16'"
            )
        if experts not in ("auto", "loop", "grouped", *FP8_IMPLS):
            raise ValueError(
                f"experts must be one of ('auto', 'loop', 'grouped', 'fp8', 'fp8_loop'), "
                f"got {experts!r}"
            )
        if experts in FP8_IMPLS and wire != "fp8":
            raise ValueError(f"experts={experts!r} consumes 'fp8' wire rows; got wire={wire!r}")
        if shared_expert is not None and not callable(shared_expert):
            raise TypeError(f"shared_expert must be callable, got {type(shared_expert).__name__}")
        self.config = config
        self.routing = routing
        self.quantize = quantize
        self.experts_impl = experts
        self.combine_dtype = combine_dtype
        self.shared_expert = shared_expert
        self.comm_name = comm
        self.combine_wire = combine_wire

        k, e = config.top_k, config.num_experts
        if routing == "logits":
            extras = {"router_logits": (torch.float32, e)}
        else:
            extras = {"topk_ids": (torch.int32, k), "topk_weights": (torch.float32, k)}
        self._group = group
        self._wire = wire
        self._extras = extras
        if comm == "local":
            self.world_size, self.rank = 1, 0
        else:
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        self.spec: WireSpec | None = None
        self.travel_spec: WireSpec | None = None
        self.comm: Any = None
        if wire == "nvfp4" and global_scale is None:
            WireSpec(wire, config.hidden, global_scale=1.0, extras=extras)  # validate now
        else:
            self._build_wire(global_scale)
        if e % self.world_size:
            raise ValueError(
                f"num_experts={e} must be a multiple of the group size {self.world_size}"
            )
        self.num_local = e // self.world_size
        self.first_expert = self.rank * self.num_local
        self.local_experts: LocalExperts | None = None
        self.router_bias_E: torch.Tensor | None = None
        #: Optional ``stage -> context manager`` hook around the stages "pack", "dispatch",
        #: "experts" (routing included) and "combine" of each forward (``moewire bench``).
        self.stage_timer: Callable[[str], AbstractContextManager] | None = None

    def _build_wire(self, global_scale: float | torch.Tensor | None) -> None:
        """The row layouts and the comm, once the wire format's parameters are known."""
        hidden, extras = self.config.hidden, self._extras
        self.spec = WireSpec(self._wire, hidden, global_scale=global_scale, extras=extras)
        self.travel_spec = (
            self.spec if self.quantize == "before" else WireSpec("bf16", hidden, extras=extras)
        )
        if self.comm_name == "local":
            self.comm = _LocalComm(self.combine_wire)
        else:
            from moewire.comm import make_comm

            # spec and E make every dispatch check that all ranks agree on the format,
            # hidden size, global scale, extras and expert count (in the count exchange).
            self.comm = make_comm(
                self.comm_name,
                self._group,
                num_experts=self.config.num_experts,
                spec=self.travel_spec,
                combine_wire=self.combine_wire,
            )

    def _calibrate(self, x16_TH: torch.Tensor) -> None:
        """nvfp4 without a global scale: ``g = 448*6 / max finite |x|`` over every rank."""
        finite = torch.nan_to_num(x16_TH.float().abs(), nan=0.0, posinf=0.0)
        amax = finite.amax() if finite.numel() else finite.new_zeros(())
        amax = amax.reshape(1)
        if self.comm_name != "local":
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self._group)
        value = float(amax.item())
        if value == 0:
            raise ValueError(
                "EPMoE(wire='nvfp4', global_scale=None) calibrates on the first forward, but "
                "every rank's x was zero (or empty); pass global_scale=g, e.g. "
                "moewire.nvfp4_global_scale(calibration_amax)"
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
    ) -> None:
        """Keep this rank's contiguous shard of the global expert weights.

        Args:
            w13_E2IH: ``[E, 2I, H]`` float: each expert's gate rows, then its up rows.
            w2_EHI: ``[E, H, I]`` float: each expert's down projection.
            router_bias: ``deepseek_v3`` only: the ``[E]`` expert score correction bias
                (every rank keeps all of it: routing is global).

        The shard is stored as bf16 (plus per-channel e4m3 copies for the fp8 paths) on the
        weights' device, which is where the forward runs.
        """
        c = self.config
        self._check_weights(w13_E2IH, w2_EHI, router_bias, c.num_experts)
        sl = slice(self.first_expert, self.first_expert + self.num_local)
        self._keep(w13_E2IH[sl], w2_EHI[sl], router_bias)

    def load_local_experts(
        self,
        w13_L2IH: torch.Tensor,
        w2_LHI: torch.Tensor,
        router_bias: torch.Tensor | None = None,
    ) -> None:
        """Keep this rank's experts, given only them (a checkpoint read shard by shard).

        Args:
            w13_L2IH: ``[L, 2I, H]`` float, ``L = E/W``: gate rows, then up rows, of the
                global experts ``[rank*L, (rank+1)*L)``.
            w2_LHI: ``[L, H, I]`` float: their down projections.
            router_bias: ``deepseek_v3`` only: the full ``[E]`` score correction bias.

        Same storage as :meth:`load_experts` (bf16 weights already bf16 and contiguous are
        kept without a copy, so several layers can share one shard).
        """
        self._check_weights(w13_L2IH, w2_LHI, router_bias, self.num_local)
        self._keep(w13_L2IH, w2_LHI, router_bias)

    def _check_weights(
        self, w13: torch.Tensor, w2: torch.Tensor, router_bias: torch.Tensor | None, n: int
    ) -> None:
        c = self.config
        for name, w, shape in (
            ("w13", w13, (n, 2 * c.intermediate, c.hidden)),
            ("w2", w2, (n, c.hidden, c.intermediate)),
        ):
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
            if not w.is_floating_point():
                raise TypeError(f"{name} must be floating point, got dtype {w.dtype}")
            if tuple(w.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(w.shape)}")
        if w13.device != w2.device:
            raise ValueError(f"w13 is on {w13.device}, w2 on {w2.device}")
        check_router_bias(c, router_bias)
        for name, w in (("w13", w13), ("w2", w2), ("router_bias", router_bias)):
            if w is not None and not bool(torch.isfinite(w).all()):
                n_bad = int((~torch.isfinite(w)).sum())
                raise ValueError(f"{name} must be finite, got {n_bad} NaN/Inf values")

    def _keep(
        self, w13_L2IH: torch.Tensor, w2_LHI: torch.Tensor, router_bias: torch.Tensor | None
    ) -> None:
        self.local_experts = LocalExperts(
            w13_L2IH.detach(),
            w2_LHI.detach(),
            self.first_expert,
            fp8=self.experts_impl in FP8_IMPLS,
        )
        self.router_bias_E = (
            None
            if router_bias is None
            else router_bias.detach().to(device=w13_L2IH.device, dtype=torch.float32)
        )

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
        dev = self.local_experts.w13_L2IH.device
        if x_TH.device != dev or router_logits_TE.device != dev:
            raise ValueError(
                f"x ({x_TH.device}) and router_logits ({router_logits_TE.device}) must be on "
                f"the experts' device {dev}"
            )

    def forward(self, x_TH: torch.Tensor, router_logits_TE: torch.Tensor) -> torch.Tensor:
        """This rank's tokens through the sharded layer.

        Args:
            x_TH: ``[T, H]`` bf16/fp16/fp32 activations of this rank's tokens (``T`` may
                differ between ranks, and be 0); rounded to bf16 before quantization.
            router_logits_TE: ``[T, E]`` float router logits (routed in fp32).

        Returns:
            ``[T, H]`` in ``x_TH.dtype``: ``sum_k w_k * expert_k(x)`` over the token's top-k
            experts on every rank (plus ``shared_expert(x_TH)``).
        """
        self._check_inputs(x_TH, router_logits_TE)
        cfg = self.config
        x16_TH = x_TH.to(torch.bfloat16)
        logits_TE = router_logits_TE.float().contiguous()
        ids_TK = weights_TK = None
        if self.routing == "topk" or self.comm_name == "alltoall":
            ids_TK, weights_TK = route(cfg, logits_TE, self.router_bias_E)
        if self.routing == "logits":
            extras = {"router_logits": logits_TE}
        else:
            extras = {"topk_ids": ids_TK.to(torch.int32), "topk_weights": weights_TK}

        if self.spec is None:
            self._calibrate(x16_TH)
        with self._stage("pack"):
            rows_TR = self.travel_spec.pack(x16_TH, **extras)
        with self._stage("dispatch"):
            if self.comm_name == "alltoall":
                recv_NR, handle = self.comm.dispatch(rows_TR, ids_TK)
            else:
                recv_NR, handle = self.comm.dispatch(rows_TR)
        with self._stage("experts"):
            if self.quantize == "after":
                recv_NR = self._quantize_received(recv_NR)
            view = self.spec.unpack(recv_NR)
            if self.routing == "logits":
                ids_NK, weights_NK = route(cfg, view.extras["router_logits"], self.router_bias_E)
            else:
                ids_NK = view.extras["topk_ids"]
                check_topk_ids(ids_NK, cfg.num_experts, "received topk_ids", distinct=True)
                weights_NK = view.extras["topk_weights"]
            impl = resolve_impl(self.experts_impl, recv_NR.device)
            partial_NH = self.local_experts(self.spec, recv_NR, ids_NK, weights_NK, impl)
        with self._stage("combine"):
            y_TH = self.comm.combine(partial_NH.to(self.combine_dtype), handle).float()
        if self.shared_expert is not None:
            y_TH = y_TH + self.shared_expert(x_TH).float()
        return y_TH.to(x_TH.dtype)

    def _quantize_received(self, recv_NR: torch.Tensor) -> torch.Tensor:
        """bf16 rows -> rows of the wire format: the receiver-side quantization."""
        view = self.travel_spec.unpack(recv_NR)
        x16_NH = self.travel_spec.dequantize(recv_NR, torch.bfloat16)
        return self.spec.pack(x16_NH, **{k: v for k, v in view.extras.items()})

    def extra_repr(self) -> str:
        return (
            f"{self.config}, wire={self._wire!r}, comm={self.comm_name!r}, "
            f"routing={self.routing!r}, quantize={self.quantize!r}, "
            f"experts={self.experts_impl!r}, combine_wire={self.combine_wire!r}, "
            f"rank={self.rank}/{self.world_size}"
        )
