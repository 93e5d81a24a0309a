"""The wire API on one process: pack tokens into rows of bytes, look inside a row, dequantize,
and compare the formats' bytes per token and accuracy (SQNR).

    python examples/wire_api.py
"""

import torch

import moewire as mw


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    noise = (ref.float() - approx.float()).pow(2).sum()
    return float(10 * torch.log10(ref.float().pow(2).sum() / noise))


def main() -> None:
    torch.manual_seed(0)
    hidden, experts = 7168, 256  # DeepSeek-R1's sizes
    x = torch.randn(32, hidden, dtype=torch.bfloat16)  # this rank's tokens [T, H]
    logits = torch.randn(32, experts)  # router logits [T, E], travel in the same row
    g = mw.nvfp4_global_scale(x)  # nvfp4's static global scale, calibrated on x

    spec = mw.WireSpec(
        "nvfp4", hidden, global_scale=g, extras={"router_logits": (torch.float32, experts)}
    )
    rows = spec.pack(x, router_logits=logits)  # uint8 [T, row_bytes]
    view = spec.unpack(rows)  # zero-copy views into the rows
    x_hat = spec.dequantize(rows, dtype=torch.bfloat16)
    print(
        f"nvfp4 rows: {tuple(rows.shape)} uint8; payload {tuple(view.payload.shape)}, "
        f"scales {tuple(view.scales.shape)} {view.scales.dtype}, router_logits "
        f"{tuple(view.extras['router_logits'].shape)} (bit-exact copy: "
        f"{torch.equal(view.extras['router_logits'], logits)})"
    )
    print(f"dequantized {tuple(x_hat.shape)} {x_hat.dtype}, SQNR {sqnr_db(x, x_hat):.1f} dB\n")

    base = mw.WireSpec("bf16", hidden, extras={"router_logits": (torch.float32, experts)})
    print(
        f"bytes per token with the router logits (baseline: bf16 + fp32 logits = "
        f"{base.row_bytes} B)"
    )
    print(f"{'format':<14}{'bytes':>7}{'smaller':>9}{'SQNR dB':>9}")
    for fmt in mw.FORMATS:
        s = mw.WireSpec(
            fmt,
            hidden,
            global_scale=g if fmt == "nvfp4" else None,
            extras={"router_logits": (torch.float32, experts)},
        )
        y = s.dequantize(s.pack(x, router_logits=logits), torch.float32)
        sq = "exact" if torch.equal(y, x.float()) else f"{sqnr_db(x, y):.1f}"
        print(f"{fmt:<14}{s.row_bytes:>7}{base.row_bytes / s.row_bytes:>8.2f}x{sq:>9}")


if __name__ == "__main__":
    main()
