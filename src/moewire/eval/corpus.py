"""Held-out text, tokenized, cut into the sequences ``moewire eval`` runs.

The built-in corpus is CPython 3.11.7's standard library source (``data/``, made by
``tools/make_corpus.py``; PSF license): a training split and a held-out split of whole
files (631 kB, so at least 600k held-out tokens with the byte tokenizer). It ships as
files rather than being read from the running interpreter, because the stdlib text differs
between Python versions and the GPU machine runs another one.

The models that ``moewire.eval.train`` makes use the byte tokenizer (token = byte, vocabulary
256), marked by a ``moewire_tokenizer.json`` file in the checkpoint; any other checkpoint
uses its own tokenizer through ``transformers.AutoTokenizer`` (local files only).

Shape legend: ``N`` sequences, ``S`` sequence length.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Callable
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "heldout")
#: Marker file of a byte-tokenized checkpoint.
BYTE_TOKENIZER_FILE = "moewire_tokenizer.json"
BYTE_VOCAB = 256


def builtin_text(split: str) -> bytes:
    """The built-in corpus split ``"train"`` or ``"heldout"``, as UTF-8 bytes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return lzma.decompress((DATA_DIR / f"corpus_{split}.txt.xz").read_bytes())


def byte_ids(data: bytes) -> torch.Tensor:
    """Byte tokenizer: int64 ``[len(data)]``, one token per byte."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def write_byte_tokenizer(path: str | Path) -> None:
    """Mark checkpoint directory ``path`` as byte-tokenized."""
    (Path(path) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab": 256}))


def tokenizer_for(
    path: str | Path, trust_remote_code: bool = False
) -> Callable[[bytes], torch.Tensor]:
    """``bytes -> int64 token ids`` for checkpoint ``path``: the byte tokenizer if it is
    marked so, else its own tokenizer (``AutoTokenizer``, local files only, no special
    tokens added)."""
    if (Path(path) / BYTE_TOKENIZER_FILE).is_file():
        return byte_ids
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: no usable tokenizer ({first})") from None

    def encode(data: bytes) -> torch.Tensor:
        text = data.decode("utf-8", errors="replace")
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    return encode


def sequences(ids: torch.Tensor, seq_len: int, tokens: int, world_size: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs, then targets shifted by
    one), ``N`` of them with ``N * seq_len <= tokens`` evaluated tokens and ``N`` a multiple
    of ``world_size`` (every rank runs the same number of forwards).

    Args:
        ids: int64 ``[n]`` token ids of the held-out text.
        seq_len: tokens per sequence ``S`` (each predicts ``S`` next tokens).
        tokens: the most tokens to evaluate; fewer if the text is shorter.
        world_size: ranks that share the sequences.

    Returns:
        int64 ``[N, S + 1]``.

    Raises:
        ValueError: the text is too short for one sequence per rank.
    """
    if seq_len < 1 or tokens < 1:
        raise ValueError(f"seq_len and tokens must be positive, got {seq_len} and {tokens}")
    fit = (ids.numel() - 1) // seq_len
    n = min(fit, tokens // seq_len) // world_size * world_size
    if n == 0:
        raise ValueError(
            f"text too short: {ids.numel()} tokens, need {seq_len * world_size + 1} for one "
            f"sequence of --seq-len {seq_len} per rank ({world_size} ranks) within --tokens "
            f"{tokens}"
        )
    starts = torch.arange(n) * seq_len
    return ids[starts[:, None] + torch.arange(seq_len + 1)]
