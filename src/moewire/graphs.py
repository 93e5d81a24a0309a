"""Capture an :class:`moewire.EPMoE` layer in a CUDA graph at a static token capacity.

Decode steps are small: at 1-256 tokens per rank the layer's GPU work is a few hundred
microseconds to a millisecond, and launching its ~50 kernels from Python costs as much.
Inference engines capture such steps in CUDA graphs, with every data-parallel rank padded
to the same token count (vLLM pads to the largest count across ranks, which it knows before
the layer runs), so the dispatch needs no count exchange and every shape is static.

:class:`GraphedMoE` does that for one layer: static input buffers of ``max_tokens`` rows on
every rank, the layer run once eagerly (compiles the kernels, calibrates an nvfp4 global
scale if none was given, and runs the comm's one-time cross-rank agreement check), then
captured with ``counts = [max_tokens] * W`` and a device tensor of each rank's real token
count. A call writes where this step's tokens are into a small pinned table, the real counts
of every rank into that tensor (when they change), and replays: the graph's first node
copies the tokens the table names into the static buffers (no launch of its own before
the replay: on a decode step the host's time is the latency), padding rows are routed to
no expert and their outputs are dropped. Replay is bitwise equal to the eager layer on the
same padded batch. The table is rewritten only once the replay that read it has run (an
event per call), so calls may follow each other without a sync.

Rules, as in any CUDA-graph serving loop: every rank replays its graph once per step, in
step (idle ranks with zero real tokens too); the output is a view of the graph's static
buffer, valid until the next replay; the layer's weights and configuration must not change
after capture. Needs ``comm`` "allgather", "grouped" or "local", and the ``grouped`` or
``fp8`` expert path (the ``loop`` oracles read counts on the host).

Shape legend: ``T`` real tokens on this rank, ``M`` capacity, ``H`` hidden, ``E`` experts,
``W`` ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moewire.comm.counts import normalize_counts
from moewire.constants import ceil_div
from moewire.formats.spec import pick_backend
from moewire.moe.experts import resolve_impl
from moewire.moe.layer import EPMoE

#: Expert paths that run without a host sync (and so can be captured).
GRAPH_IMPLS = ("grouped", "fp8")
GRAPH_COMMS = ("allgather", "grouped", "local")


class GraphedMoE:
    """``layer`` captured at ``max_tokens`` rows per rank; call it like the layer.

    Args:
        layer: an :class:`moewire.EPMoE` with its experts loaded, on CUDA.
        max_tokens: ``M``, the static capacity per rank (every rank the same).
        x_dtype: dtype of the activations the caller passes (the output's dtype).
        pool: optional CUDA graph memory pool to share with other captures.

    Attributes ``x_MH``, ``logits_ME`` and ``valid_W`` (int32 ``[W]``, every rank's real
    token count) are the graph's input buffers, written by each call: do not write
    ``valid_W`` (a call copies new counts into it only when they change). The inputs of
    a call are read when its replay runs (stream-ordered, as any CUDA op's). An engine may
    write a step's ``T`` tokens into ``x_MH[:T]`` and their fp32 logits into
    ``logits_ME[:T]`` and pass those views: the call then copies nothing. Inputs the
    graph's copy node cannot read (strided, logits not fp32) are copied before the replay.
    """

    def __init__(
        self,
        layer: EPMoE,
        max_tokens: int,
        *,
        x_dtype: torch.dtype = torch.bfloat16,
        pool: object | None = None,
    ) -> None:
        if not isinstance(layer, EPMoE):
            raise TypeError(f"layer must be an EPMoE, got {type(layer).__name__}")
        if layer.local_experts is None:
            raise RuntimeError("GraphedMoE: call layer.load_experts(...) before capture")
        if layer.spec is None:
            raise ValueError(
                "GraphedMoE: the layer's nvfp4 global scale is not calibrated yet; pass "
                "global_scale= to EPMoE or run one eager forward on real activations first "
                "(capture runs on zero-filled buffers)"
            )
        dev = layer.local_experts.device
        if dev.type != "cuda":
            raise ValueError(f"GraphedMoE needs the layer on CUDA, its experts are on {dev}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        impl = resolve_impl(layer.experts_impl, dev)
        if impl not in GRAPH_IMPLS or layer.comm_name not in GRAPH_COMMS:
            raise ValueError(
                f"GraphedMoE needs experts in {GRAPH_IMPLS} and comm in {GRAPH_COMMS}, got "
                f"experts={impl!r}, comm={layer.comm_name!r}"
            )
        cfg, w = layer.config, layer.world_size
        self.layer, self.max_tokens = layer, max_tokens
        self.counts = [max_tokens] * w
        self.x_MH = torch.zeros((max_tokens, cfg.hidden), dtype=x_dtype, device=dev)
        self.logits_ME = torch.zeros((max_tokens, cfg.num_experts), device=dev)
        self.valid_W = torch.zeros(w, dtype=torch.int32, device=dev)
        self._valid_host = torch.zeros(w, dtype=torch.int32).pin_memory()
        self._copied = torch.cuda.Event()  # the last copy out of _valid_host
        self._x_ptr, self._logits_ptr = self.x_MH.data_ptr(), self.logits_ME.data_ptr()
        self._dev_index = self.x_MH.get_device()
        # The input copy is the graph's first node: it copies what this pinned table names
        # (sources' addresses, int32 words; then the buffers' addresses), written by the
        # host before each replay.
        self._copy_in_graph = pick_backend(None, dev) == "triton"
        self._idle_entry = (self._x_ptr, self._logits_ptr, 0, 0)  # copies nothing
        self._table_host = torch.zeros(6, dtype=torch.int64).pin_memory()
        self._table = self._table_host.numpy()
        self._table[:4] = self._table_now = self._idle_entry
        self._table[4:] = self._x_ptr, self._logits_ptr  # where the node writes
        self._replayed = torch.cuda.Event()  # the last replay (it read the table)
        self.graph = torch.cuda.CUDAGraph()
        self.y_MH = self._capture(pool)
        self._replayed.record()  # after the warm-up runs, which read the table too
        self._valid_counts = (max_tokens,) * w  # what valid_W holds (capture filled it)
        self._outputs: dict[int, torch.Tensor] = {}  # T -> y_MH[:T], built once per T

    def _run(self) -> torch.Tensor:
        if self._copy_in_graph:
            from moewire.moe._kernels.copy import copy_table_kernel

            words = max(self.x_MH.numel() * self.x_MH.element_size(), self.logits_ME.numel() * 4)
            progs = min(_COPY_PROGS, ceil_div(words // 4, _COPY_BLOCK))
            copy_table_kernel[(progs, 2)](
                self._table_host, self.x_MH, self.logits_ME, BLOCK=_COPY_BLOCK, num_warps=4
            )
        return self.layer(self.x_MH, self.logits_ME, counts=self.counts, valid_counts=self.valid_W)

    def _capture(self, pool: object | None) -> torch.Tensor:
        self.valid_W.fill_(self.max_tokens)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, calibrate, agree once; then a clean warm run
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=pool):
            y = self._run()
        return y

    def _copy_inputs(self, x_TH: torch.Tensor, logits_TE: torch.Tensor) -> None:
        """This step's tokens into the static buffers now, with ``copy_`` (any strides,
        device or float dtype; the logits converted): the inputs the graph's copy node
        cannot read. An input that already is its buffer's first rows is not copied."""
        for src, buf in ((x_TH, self.x_MH), (logits_TE, self.logits_ME)):
            if src.data_ptr() != buf.data_ptr() or src.stride() != buf.stride():
                buf[: src.shape[0]].copy_(src)

    def _table_entry(self, x_TH: torch.Tensor, logits_TE: torch.Tensor) -> tuple:
        """What the graph's copy node copies this step: ``(x address, logits address, x
        words, logits words)``, zero words for an input that already is its buffer's first
        rows. Inputs the node cannot read (another device, not contiguous whole aligned
        words, logits not fp32) are copied now by :meth:`_copy_inputs` instead, and the
        node copies nothing."""
        if self._copy_in_graph and logits_TE.dtype == torch.float32:
            na, nb = _word_count(x_TH), _word_count(logits_TE)
            if (
                na is not None
                and nb is not None
                and x_TH.get_device() == self._dev_index
                and logits_TE.get_device() == self._dev_index
            ):
                xp, lp = x_TH.data_ptr(), logits_TE.data_ptr()
                return (xp, lp, 0 if xp == self._x_ptr else na, 0 if lp == self._logits_ptr else nb)
        self._copy_inputs(x_TH, logits_TE)
        return self._idle_entry

    def __call__(
        self,
        x_TH: torch.Tensor,
        router_logits_TE: torch.Tensor,
        counts: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """One step: this rank's ``T <= M`` tokens through the captured layer.

        Args:
            x_TH: ``[T, H]`` activations (``x_dtype``), on the layer's device.
            router_logits_TE: ``[T, E]`` float router logits.
            counts: every rank's ``T`` this step, as :meth:`moewire.EPMoE.forward` takes it
                (ints or a CPU int tensor, the same on every rank, e.g. the engine's
                data-parallel metadata); this rank's entry must be ``x_TH.shape[0]``.

        Returns:
            ``[T, H]``: a view of the graph's output buffer, valid until the next replay.
        """
        t = x_TH.shape[0]
        counts = normalize_counts(counts, self.layer.world_size, self.layer.rank, t, "x.shape[0]")
        if max(counts) > self.max_tokens:
            raise ValueError(
                f"counts={list(counts)}: every count must be in [0, max_tokens="
                f"{self.max_tokens}] (capture a larger graph for larger batches)"
            )
        if x_TH.dtype != self.x_MH.dtype or tuple(router_logits_TE.shape) != (
            t,
            self.logits_ME.shape[1],
        ):
            raise ValueError(
                f"x must be {self.x_MH.dtype} [T, {self.x_MH.shape[1]}] and router_logits "
                f"[T, {self.logits_ME.shape[1]}], got {x_TH.dtype} {list(x_TH.shape)} and "
                f"{list(router_logits_TE.shape)}"
            )
        entry = self._table_entry(x_TH, router_logits_TE)
        if entry != self._table_now:  # steady-state steps mostly repeat their inputs
            self._replayed.synchronize()  # the last replay has read the table
            self._table[:4] = self._table_now = entry
        if counts != self._valid_counts:  # decode steps mostly repeat their counts
            self._copied.synchronize()  # the previous copy has read the pinned buffer
            for i, n in enumerate(counts):
                self._valid_host[i] = n
            self.valid_W.copy_(self._valid_host, non_blocking=True)
            self._copied.record()
            self._valid_counts = counts
        self.graph.replay()
        self._replayed.record()
        y = self._outputs.get(t)
        if y is None:
            y = self._outputs[t] = self.y_MH[:t]
        return y


#: Words per step of a program of the in-graph input copy.
_COPY_BLOCK = 4096
#: At most this many programs per buffer in the in-graph input copy, each striding over
#: the words. Every program first reads the table from pinned host memory (over the bus):
#: on one H100, 224 programs took 23.6 us at 256 tokens x 7168 bf16, where the launched
#: copy of the same words took 3.5 us.
_COPY_PROGS = 32


def _word_count(t: torch.Tensor) -> int | None:
    """The int32 words of ``t``'s memory, where it is contiguous, 4-byte aligned and whole
    words (else None). Reads only metadata: no view is built."""
    nbytes = t.numel() * t.element_size()
    if nbytes % 4 or t.data_ptr() % 4 or not t.is_contiguous():
        return None
    return nbytes // 4


def capture(layer: EPMoE, max_tokens: int, **kwargs: object) -> GraphedMoE:
    """``GraphedMoE(layer, max_tokens, **kwargs)``: the layer captured at ``max_tokens``."""
    return GraphedMoE(layer, max_tokens, **kwargs)
