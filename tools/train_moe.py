"""Train the model ``moewire eval`` runs on (see ``moewire/eval/train.py``).

python tools/train_moe.py --size cpu --out ~/.cache/moewire/qwen3moe-cpu-seed0
python tools/train_moe.py --size gpu --out /tmp/qwen3moe-gpu --time-limit 330
"""

from __future__ import annotations

import argparse

import torch

from moewire.eval.train import SIZES, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, help="override the size's step count")
    p.add_argument("--time-limit", type=float, help="stop after this many seconds (logged)")
    a = p.parse_args()
    train(
        a.size,
        a.out,
        seed=a.seed,
        device=a.device,
        steps=a.steps,
        time_limit_s=a.time_limit,
        log=lambda s: print(s, flush=True),
    )


if __name__ == "__main__":
    main()
