"""The checkpoint and corpora shipped inside the package, so a first run needs no download.

``tiny-relu-lm`` is a ~1.1M-parameter GPT-2 with a ReLU MLP that this project trained itself
(``scripts/train_embedded.py``) on CPython standard-library docstrings
(``scripts/build_corpus.py``, PSF license); ``calibration.txt`` is the held-out part of that
text. This module only computes paths, so importing it stays cheap (no torch).
"""

from __future__ import annotations

from pathlib import Path

from probes.errors import DataError

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_CHECKPOINT = DATA_DIR / "tiny-relu-lm"
DEFAULT_CORPUS = DATA_DIR / "calibration.txt"
TRAIN_CORPUS = DATA_DIR / "corpus_train.txt"
# float16 snapshots of the same training run (ckpt-50 ... ckpt-400); the final model is step 650.
STEPS_DIR = DATA_DIR / "tiny-relu-lm-steps"

# What a usable checkpoint folder must hold; a partial copy should fail here, clearly,
# rather than deep inside transformers.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_checkpoint() -> str:
    """Path of the embedded checkpoint folder; DataError if it (or part of it) is missing."""
    missing = [name for name in _CHECKPOINT_FILES if not (DEFAULT_CHECKPOINT / name).is_file()]
    if missing:
        raise DataError(
            f"the embedded default checkpoint {DEFAULT_CHECKPOINT} is missing {', '.join(missing)}",
            "reinstall actsparse, or from a source checkout run "
            "python scripts/build_corpus.py && python scripts/train_embedded.py "
            "(or pass a checkpoint path explicitly)",
        )
    return str(DEFAULT_CHECKPOINT)


def default_corpus() -> str:
    """Path of the embedded calibration corpus; DataError if it is missing or empty."""
    if not DEFAULT_CORPUS.is_file() or DEFAULT_CORPUS.stat().st_size == 0:
        raise DataError(
            f"the embedded calibration corpus {DEFAULT_CORPUS} is missing or empty",
            "reinstall actsparse, or from a source checkout run python scripts/build_corpus.py "
            "(or pass --data with a corpus of your own)",
        )
    return str(DEFAULT_CORPUS)


def default_track_checkpoints() -> list[str]:
    """The embedded training run for ``actsparse track``: its snapshots by step, then the final model."""
    import re

    snaps = sorted((p for p in STEPS_DIR.glob("ckpt-*") if (p / "model.safetensors").is_file()),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) if STEPS_DIR.is_dir() else []
    if not snaps:
        raise DataError(f"the embedded training snapshots in {STEPS_DIR} are missing",
                        "pass the checkpoints of a run, e.g. 'runs/ckpt-*/', or run python scripts/train_embedded.py")
    return [str(p) for p in snaps] + [default_checkpoint()]
