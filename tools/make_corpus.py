"""Regenerate the built-in corpus of ``moewire eval`` from this interpreter's standard library.

    python tools/make_corpus.py            # writes src/moewire/eval/data/corpus_*.txt.xz

Source: the ``.py`` files of CPython's standard library (``Lib/``, PSF license), read from the
running interpreter; the committed files were made with CPython 3.11.7. Why this corpus: it
is real text (code, comments, docstrings: English prose and a formal language), available
offline on every machine with Python, and small enough to ship compressed (under 2 MB), so
the GPU machine (another Python version, whose stdlib text differs) reads the same bytes.

Files are taken in sorted path order, skipping tests and generated tables; every 10th file
goes to the held-out split (whole files, so held-out text is never seen in training), the
rest to the training split, until the training split holds ``TRAIN_BYTES`` bytes. Each file
is preceded by a line ``# ==== <relative path>``. Output is deterministic for one Python.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import sys
import sysconfig
from pathlib import Path

TRAIN_BYTES = 7_000_000
HELDOUT_EVERY = 10
SKIP_DIRS = {"test", "tests", "idlesave", "site-packages", "lib2to3", "encodings", "__pycache__"}
OUT = Path(__file__).resolve().parents[1] / "src" / "moewire" / "eval" / "data"


def stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside :data:`SKIP_DIRS`, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and "test" not in d)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def main() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    n_train = 0
    for i, path in enumerate(stdlib_files(root)):
        text = path.read_text(encoding="utf-8", errors="replace")
        doc = f"# ==== {path.relative_to(root).as_posix()}\n{text}\n"
        if i % HELDOUT_EVERY == HELDOUT_EVERY - 1:
            held.append(doc)
        else:
            train.append(doc)
            n_train += len(doc.encode())
        if n_train >= TRAIN_BYTES:
            break
    OUT.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", held)):
        data = "".join(docs).encode()
        packed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
        (OUT / f"corpus_{name}.txt.xz").write_bytes(packed)
        digest = hashlib.sha256(data).hexdigest()[:16]
        print(f"{name}: {len(docs)} files, {len(data)} bytes, {len(packed)} compressed, {digest}")
    print(f"from {root} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
