"""What ``moewire eval`` checks and prepares before any rank starts: the model, the text, the
configurations. Each problem is one ``ValueError`` line, raised in the launching process
(not in a worker's traceback).

The built-in model (no ``--model``) is the ``cpu`` size of :mod:`moewire.eval.train`,
trained on first use (about a minute on 2 cores) into ``$MOEWIRE_CACHE`` (default
``~/.cache/moewire``) and reused after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from moewire.eval.configs import EvalConfig
from moewire.eval.corpus import builtin_text, sequences, tokenizer_for
from moewire.formats import WireSpec, format_class
from moewire.formats.combine import combine_codec
from moewire.integrations.checkpoint import Checkpoint, load_config, meta_model
from moewire.integrations.transformers import moe_block_names


def builtin_model_dir(size: str = "cpu", seed: int = 0) -> Path:
    """Where the built-in model of ``size`` and ``seed`` is cached."""
    root = Path(os.environ.get("MOEWIRE_CACHE", Path.home() / ".cache" / "moewire"))
    return root / f"qwen3moe-{size}-seed{seed}"


def ensure_builtin_model(log: Callable[[str], None] = print) -> Path:
    """The built-in model's directory, training it first if it is not cached."""
    path = builtin_model_dir()
    if not (path / "train_log.json").is_file():
        from moewire.eval.train import train

        log(f"[eval] training the built-in model into {path} (about a minute on 2 cores)")
        train("cpu", path, log=log)
    return path


def model_shape(path: str | Path, trust_remote_code: bool) -> tuple[int, int, list[str]]:
    """``(hidden, experts, MoE block names)`` of a checkpoint, read without its weights.

    Raises:
        ValueError: not a checkpoint, remote code needed, or no MoE block that
            ``expert_parallel`` knows.
    """
    config = load_config(path, trust_remote_code)
    Checkpoint(path)
    model = meta_model(config, trust_remote_code)
    names = moe_block_names(model)
    w13 = model.get_submodule(names[0]).experts.gate_up_proj
    return int(w13.shape[2]), int(w13.shape[0]), names


def check_configs(configs: list[EvalConfig], hidden: int, experts: int, world: int) -> None:
    """Raise a one-line ``ValueError`` for the first configuration the model cannot take."""
    if experts % world:
        raise ValueError(f"the model's {experts} experts do not split over {world} ranks")
    for cfg in configs:
        try:
            g = 1.0 if format_class(cfg.dispatch).needs_global_scale else None
            WireSpec(cfg.dispatch, hidden, global_scale=g)
            if cfg.combine != "bf16":
                combine_codec(cfg.combine, hidden)
        except ValueError as e:
            raise ValueError(f"configuration {cfg.name}: {e}") from None


def held_out_sequences(
    model_path: str | Path,
    text_path: str | None,
    seq_len: int,
    tokens: int,
    world: int,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """int64 ``[N, seq_len + 1]`` sequences of ``--text`` (or the built-in held-out split)
    in the model's tokenizer, ``N`` a multiple of ``world``.

    Raises:
        ValueError: the file is missing, or too short for one sequence per rank.
    """
    if text_path is None:
        data = builtin_text("heldout")
    else:
        if not Path(text_path).is_file():
            raise ValueError(f"--text {text_path}: no such file")
        data = Path(text_path).read_bytes()
    ids = tokenizer_for(model_path, trust_remote_code)(data)
    return sequences(ids, seq_len, tokens, world)
