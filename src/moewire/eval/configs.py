"""The configurations ``moewire eval`` compares: dispatch wire format, routing mode, combine
wire and where the dispatch quantizes, and the rule that recommends one.

The reference is the unquantized configuration (:data:`REFERENCE`): bf16 rows, router
logits on the wire, unquantized (fp32) combine. Every other configuration is measured
against it on the same tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from moewire.formats import FORMATS
from moewire.moe.options import LayerOptions

#: Dispatch formats and combine wires of the issue's full table.
DISPATCH_FORMATS = tuple(FORMATS)
COMBINE_WIRES = ("bf16", "fp8", "nvfp4")
#: The recommendation rule: PPL ratio at most this, and top-1 agreement at least this (%).
MAX_PPL_RATIO = 1.01
MIN_TOP1_SAME_PCT = 97.0


@dataclass(frozen=True)
class EvalConfig:
    """One configuration of the expert-parallel MoE layers.

    Args:
        dispatch: wire format of the dispatched token rows (:data:`moewire.FORMATS`).
        combine: wire of the partial sums sent back (``"bf16"``: unquantized).
        routing: ``"logits"`` or ``"topk"`` (what travels with each row).
        quantize: ``"before"`` or ``"after"`` the dispatch (bitwise the same outputs).
    """

    dispatch: str
    combine: str = "bf16"
    routing: str = "logits"
    quantize: str = "before"

    def __post_init__(self) -> None:
        if self.dispatch not in FORMATS:
            raise ValueError(f"dispatch format must be one of {FORMATS}, got {self.dispatch!r}")
        LayerOptions(**self.layer_kwargs())  # checks combine, routing and quantize

    @property
    def name(self) -> str:
        return f"{self.dispatch}/{self.combine}/{self.routing}/{self.quantize}"

    @property
    def quantized(self) -> bool:
        """Anything on the wire quantized (else it computes the reference's outputs)."""
        return self.dispatch != "bf16" or self.combine != "bf16"

    def layer_kwargs(self) -> dict:
        """Keyword arguments of :class:`moewire.EPMoE` for this configuration."""
        return {
            "wire": self.dispatch,
            "combine_wire": self.combine,
            "routing": self.routing,
            "quantize": self.quantize,
        }

    def with_quantize(self, quantize: str) -> EvalConfig:
        return EvalConfig(self.dispatch, self.combine, self.routing, quantize)


REFERENCE = EvalConfig("bf16", "bf16", "logits", "before")


def grid(
    dispatch: list[str], combine: list[str], routing: list[str], quantize: list[str]
) -> list[EvalConfig]:
    """Every combination, in the order given (dispatch outermost), reference excluded."""
    out = []
    for d, c, r, q in itertools.product(dispatch, combine, routing, quantize):
        cfg = EvalConfig(d, c, r, q)
        if cfg != REFERENCE and cfg not in out:
            out.append(cfg)
    return out


def recommended(ppl_ratio: float, top1_same_pct: float) -> bool:
    """The rule: PPL ratio <= 1.01 and top-1 same >= 97%."""
    return ppl_ratio <= MAX_PPL_RATIO and top1_same_pct >= MIN_TOP1_SAME_PCT
