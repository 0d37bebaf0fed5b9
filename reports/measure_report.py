"""Files of a ``measure`` run: the per-site table, the model-level summary and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reports.bundle import atomic_output_dir
from reports.manifest import build_manifest, write_manifest
from reports.tables import write_table


def model_section(lm) -> dict[str, Any]:
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {"family": lm.family, "class": type(lm.model).__name__, "n_parameters": n_params,
            "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
            "is_causal_lm": lm.is_causal_lm, "source": lm.source,
            "tokenizer": type(lm.tokenizer).__name__ if lm.tokenizer is not None else None}


def write_measure_outputs(output: str | Path, result, lm, options: dict[str, Any], force: bool = False) -> Path:
    with atomic_output_dir(output, force) as tmp:
        files = write_table(result.table(), tmp, "sparsity")
        files += write_table(result.summary(), tmp, "summary")
        manifest = build_manifest("measure", options, model=model_section(lm), measurement=result.info,
                                  files=files + ["manifest.json"])
        write_manifest(tmp, manifest)
    return Path(output)
