"""Write a linear-probe classifier (``probes.linear_head``) as a Hugging Face checkpoint folder.

Through the one output guard (``reports.bundle.atomic_output_dir``): the folder appears whole or
not at all, an existing non-empty one is refused without ``force``, and ``force`` replaces only a
folder actsparse wrote. It holds ``save_pretrained``'s config and safetensors weights, the
tokenizer files, and ``actsparse_head.json`` (``LinearHeadFit.record``: encoder, labels, split rule
and held-out indices, l2, accuracies), so ``load_checkpoint`` (and every command) reads it as a
plain ``...ForSequenceClassification`` folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from probes.linear_head import HEAD_FILE


def write_head_checkpoint(out_dir: str | os.PathLike, fit: Any, *, force: bool = False,
                          inputs: Iterable = ()) -> Path:
    """Save ``fit`` (a ``LinearHeadFit``) into ``out_dir`` atomically; returns the folder."""
    from reports.bundle import atomic_output_dir

    with atomic_output_dir(out_dir, force, inputs=inputs) as tmp:
        fit.model.save_pretrained(tmp, safe_serialization=True)
        fit.tokenizer.save_pretrained(tmp)
        (tmp / HEAD_FILE).write_text(json.dumps(fit.record, indent=1) + "\n", encoding="utf-8")
    return Path(out_dir)


def fit_head_checkpoint(encoder_path: str, data: str, labels_field: str, out_dir: str | os.PathLike, *,
                        force: bool = False, **fit_kw: Any):
    """Check ``out_dir`` (before any model work), fit the head (``probes.linear_head.fit_linear_head``,
    keywords passed on) and write the checkpoint; returns the ``LinearHeadFit``."""
    from probes.linear_head import fit_linear_head
    from reports.bundle import check_output_dir, release

    inputs = [str(p) for p in (encoder_path, data, fit_kw.get("tokenizer"), fit_kw.get("config")) if p]
    check_output_dir(out_dir, force, inputs=inputs)
    try:
        fit = fit_linear_head(encoder_path, data, labels_field, **fit_kw)
    except BaseException:
        release(out_dir)
        raise
    write_head_checkpoint(out_dir, fit, force=force, inputs=inputs)
    return fit


def read_head_record(folder: str | os.PathLike) -> dict | None:
    """``actsparse_head.json`` of a checkpoint folder written here, or None if it has none."""
    p = Path(folder) / HEAD_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))
