"""What the golden tests run and how they compare: shared by ``regen.py`` and ``test_golden.py``.

Every case is one ``actsparse`` command on the bundled model (``probes/data/tiny-relu-lm``) and the
bundled calibration corpus, on CPU, with fixed seeds and few tokens. What is pinned, per case
(``expected/<case>/``):

- ``case.json``: the argv (with ``{out}`` placeholders), the exit code, and the names of every
  file the command wrote (figures and parquet included, by name only: a dropped figure fails);
- every CSV table the command wrote (all rows and columns; the expected file is the command's own
  CSV with paths normalised, gzipped when over 64 KiB);
- the keys of every ``manifest.json`` (recursively, sorted dotted paths; ``[]`` marks list items;
  the children of ``versions`` are left out because they depend on what is installed);
- stdout where the case says so (``sites``), and ``compare``'s markdown report.

Values that change from run to run are left out: manifest values (only keys are pinned) and
table columns named ``seconds``. Absolute paths inside tables and texts are replaced by
``<REPO>`` (the repository root the code was imported from) and ``<OUT>`` (the run's output root).

Comparison: integer columns and strings exactly; other numeric columns with
``rtol=1e-6, atol=1e-9`` (NaN equals NaN, inf equals inf of the same sign) -- on the machine the
goldens were made on (``expected/MACHINE.json``: CPU vendor, family and model, and the torch build).
Another CPU rounds float32 sums differently (other BLAS kernels), so there every number may move by
``XTOL`` of itself plus ``XTOL`` of its column's largest magnitude (``XTOL_SEARCH`` for cases whose
numbers come out of a search that float noise can send down another path), and a count by 2 + 0.1 %.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected"
# The repository these files live in; regen.py and the test both check that the imported code is
# this repository's (a worktree used for regeneration has its own copy of tests/golden/).
REPO = HERE.parents[1]

RTOL, ATOL = 1e-6, 1e-9
# On another machine: how far a float may move, as a fraction of itself plus the same fraction of its
# column's largest magnitude. Measured on 2026-12-04 between the goldens of an AMD EPYC (family 26) and
# the same code on an Intel Xeon with AMX: at most 1.9e-4 of the column's scale outside pplp (an SE in
# cliff_points), and 2.5e-3 in pplp, whose secant search over the threshold took other steps (6.4e-6 once
# the CETT column norms were summed in float64: one ulp of a float32 norm had flipped a neuron on the
# threshold); a count moved by at most 2 (a flatness histogram bin). See README.md.
XTOL, XTOL_SEARCH = 1e-3, 1e-2
XCOUNT_ABS, XCOUNT_REL = 2, 1e-3
MACHINE_FILE = "MACHINE.json"
GZIP_OVER = 64 * 1024  # expected CSVs larger than this are stored as .csv.gz
# Counted tokens and windows per batch for the forward-pass commands: 1000 tokens are 4 windows of 256
# (the last counts only 232 positions), so with 3 windows a batch there are two batches, the second
# one partial: the goldens cover merging over batches and uncounted positions, and stay quick.
MAX_TOKENS, BATCH = "1000", "3"
# One CPU thread (torch and BLAS) in regen.py and in the test: float sums do not depend on the
# machine's core count, and on a busy 2-core machine one thread is twice as fast as two.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
MODEL = "probes/data/tiny-relu-lm"  # relative to the repository root (the commands run there)

# Table columns whose values change from run to run (wall-clock times).
VOLATILE_COLUMNS = re.compile(r"(^|_)seconds$")
# Manifest keys whose children depend on the environment, not on the code (package versions).
ENV_KEYS = {"versions"}


@dataclass(frozen=True)
class Case:
    """One command line. ``{out}`` is this case's folder, ``{out:NAME}`` another case's (run first)."""

    name: str
    argv: tuple[str, ...]
    stdout: str | None = None          # pin stdout under this name: *.txt as text, *.csv as a table
    texts: tuple[str, ...] = ()        # files in {out} pinned as text (normalised)
    mkdir: bool = False                # create {out} first (commands that write into it without -o)
    search: bool = False               # numbers come out of a search float noise can steer (XTOL_SEARCH)

    def deps(self) -> list[str]:
        return [m for a in self.argv for m in re.findall(r"\{out:([\w-]+)\}", a)]


_T = ("--max-tokens", MAX_TOKENS, "--device", "cpu")
_B = ("--batch-size", BATCH)

CASES: tuple[Case, ...] = (
    Case("sites", ("sites", MODEL), stdout="stdout.txt"),
    Case("sites-csv", ("sites", MODEL, "--format", "csv"), stdout="stdout.csv"),
    Case("measure", ("measure", *_T, *_B, "--seed", "0", "-q", "-o", "{out}")),
    Case("measure-grad-massive", ("measure", "--grad", "--massive", *_T, *_B, "--seed", "0", "-q", "-o", "{out}")),
    # a second measure, so that compare has changed values to report and a rule to break
    Case("measure-skip-first", ("measure", *_T, *_B, "--seed", "0", "--skip-first", "1", "-q", "-o", "{out}")),
    Case("grad", ("grad", *_T, *_B, "--seed", "0", "-q", "-o", "{out}")),
    # arXiv 2309.03004's flatness / gradient density / diagonality per MLP layer (same loss protocol as grad)
    Case("flatness", ("flatness", *_T, *_B, "--seed", "0", "-q", "-o", "{out}")),
    Case("drift", ("drift", MODEL, "-q", "-o", "{out}")),
    # sun2024 fixes its own seed (1); --top-k 10 keeps massive_topk.csv small (measure --massive pins 100)
    Case("massive", ("massive", *_T, "--top-k", "10", "-q", "-o", "{out}")),
    # Sun et al.'s exp3 and exp4: the intervention's PPL and the attention shares; a short heat-map prompt
    Case("massive-sun", ("massive", *_T, "--top-k", "3", "--intervene", "zero,mean", "--attention",
                         "--attention-prompt", "Return the value of x.", "-q", "-o", "{out}")),
    Case("spectrum", ("spectrum", MODEL, "-q", "-o", "{out}")),
    Case("pplp", ("pplp", "--p", "1", "--p", "5", *_T, *_B, "--seed", "0", "-q", "-o", "{out}"), search=True),
    Case("curve", ("curve", *_T, *_B, "--seed", "0", "--no-plot", "-q", "-o", "{out}")),
    # the sparsity cliff: all four families on a short grid (1000 tokens: 1 calibration window, 3 held out)
    Case("cliff", ("cliff", *_T, *_B, "--seed", "0", "--grid", "0,0.5,0.85,0.9,0.95", "--refine", "1", "-q", "-o",
                   "{out}")),
    Case("report", ("report", "{out:measure}", "{out:spectrum}", "-q", "-o", "{out}")),
    Case("compare", ("compare", "{out:measure}", "{out:measure-skip-first}",
                     "--fail-on", "sparsity/zero_frac:-0.02", "--fail-on", "dead_frac:+10%",
                     "-q", "--markdown", "{out}/compare.md"), texts=("compare.md",), mkdir=True),
    Case("track", ("track", *_T, *_B, "--seed", "0", "-q", "-o", "{out}")),
    # linear probing: the bundled model as a 5-topic classifier (its GPT-2 `score` head) on 120 examples
    Case("fit-head", ("fit-head", MODEL, "--data", "probes/data/topics.jsonl", "--labels", "label",
                      "--max-examples", "120", "--max-length", "64", "--device", "cpu", "--format", "csv", "-q",
                      "-o", "{out}"), stdout="stdout.csv"),
)
BY_NAME = {c.name: c for c in CASES}


def ordered(names: Iterable[str]) -> list[Case]:
    """The cases named and everything they read, dependencies first, in CASES order."""
    want: set[str] = set()

    def add(n: str) -> None:
        if n not in want:
            want.add(n)
            for d in BY_NAME[n].deps():
                add(d)

    for n in names:
        add(n)
    return [c for c in CASES if c.name in want]


def argv_for(case: Case, out_root: Path) -> list[str]:
    def sub(a: str) -> str:
        a = re.sub(r"\{out:([\w-]+)\}", lambda m: str(out_root / m.group(1)), a)
        return a.replace("{out}", str(out_root / case.name))

    return [sub(a) for a in case.argv]


# ----------------------------------------------------------------------------------------------- normalising
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Normaliser:
    """Replaces the absolute paths of one run by placeholders, in every form they may be printed."""

    def __init__(self, repo: Path, out_root: Path):
        pairs = []
        for p, tag in ((out_root, "<OUT>"), (repo, "<REPO>")):
            for form in {str(p), str(p.resolve())}:
                pairs.append((form, tag))
        # longest first, so /tmp/x/out is replaced before /tmp/x
        self.pairs = sorted(pairs, key=lambda t: -len(t[0]))

    def __call__(self, s: str) -> str:
        for form, tag in self.pairs:
            s = s.replace(form, tag)
        return s

    def text(self, s: str) -> str:
        s = _ANSI.sub("", s)
        return "\n".join(line.rstrip() for line in self(s).splitlines()) + "\n"

    def table(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df[[c for c in df.columns if not VOLATILE_COLUMNS.search(str(c))]]
        return df.apply(lambda col: col.map(self))


def read_csv_text(text: str) -> pd.DataFrame:
    """A CSV as strings, exactly as written: no NA guessing (a token 'NA' stays 'NA'), empty stays ''."""
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)


def manifest_keys(obj, prefix: str = "") -> list[str]:
    out: set[str] = set()

    def walk(o, p: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                q = f"{p}.{k}" if p else str(k)
                out.add(q)
                if str(k) not in ENV_KEYS:
                    walk(v, q)
        elif isinstance(o, list):
            for v in o:
                walk(v, p + "[]")

    walk(obj, prefix)
    return sorted(out)


# ----------------------------------------------------------------------------------------------- artefacts
@dataclass
class Artefacts:
    """What one case produced, normalised: meta (case.json), tables, key lists and texts by relative path."""

    meta: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def keys_name(manifest_rel: str) -> str:
    return manifest_rel[: -len(".json")] + ".keys.txt"


def collect(case: Case, out_root: Path, exit_code: int, stdout: str, repo: Path) -> Artefacts:
    norm = Normaliser(repo, out_root)
    folder = out_root / case.name
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) \
        if folder.is_dir() else []
    art = Artefacts(meta={"argv": list(case.argv), "exit_code": exit_code, "files": files})
    for rel in files:
        path = folder / rel
        if rel.endswith(".csv"):
            art.tables[rel] = norm.table(read_csv_text(path.read_text(encoding="utf-8")))
        elif rel.endswith("manifest.json"):
            art.keys[keys_name(rel)] = manifest_keys(json.loads(path.read_text(encoding="utf-8")))
        elif rel in case.texts:
            art.texts[rel] = norm.text(path.read_text(encoding="utf-8"))
    if case.stdout:
        if case.stdout.endswith(".csv"):
            art.tables[case.stdout] = norm.table(read_csv_text(stdout))
        else:
            art.texts[case.stdout] = norm.text(stdout)
    return art


def write_expected(art: Artefacts, folder: Path) -> list[Path]:
    """Write one case's artefacts under ``folder`` (which must be empty or absent)."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)

    def put(rel: str, text: str) -> None:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        if rel.endswith(".csv") and len(data) > GZIP_OVER:
            p = p.with_name(p.name + ".gz")
            with open(p, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
                gz.write(data)
        else:
            p.write_bytes(data)
        written.append(p)

    put("case.json", json.dumps(art.meta, indent=1) + "\n")
    for rel, df in art.tables.items():
        put(rel, df.to_csv(index=False, lineterminator="\n"))
    for rel, keys in art.keys.items():
        put(rel, "\n".join(keys) + "\n")
    for rel, text in art.texts.items():
        put(rel, text)
    return written


def expected_files(case_name: str) -> list[str]:
    """Relative paths of a case's pinned artefacts (``.gz`` dropped), case.json excluded."""
    folder = EXPECTED / case_name
    if not folder.is_dir():
        return []
    rels = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            rel = rel[:-3] if rel.endswith(".csv.gz") else rel
            if rel != "case.json":
                rels.append(rel)
    return rels


def read_expected(case_name: str, rel: str) -> str:
    p = EXPECTED / case_name / rel
    if not p.exists() and rel.endswith(".csv"):
        return gzip.decompress((p.with_name(p.name + ".gz")).read_bytes()).decode("utf-8")
    return p.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ machine
def this_machine() -> dict[str, str]:
    """What decides how float32 sums round here: the CPU (vendor, family, model: which BLAS and vector
    kernels run) and the torch build."""
    import platform
    from importlib.metadata import version

    info = {"arch": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "model name") and key.replace(" ", "_") not in info:
                    info[key.replace(" ", "_")] = value.strip()
                if not line.strip() and "vendor_id" in info:
                    break
    except OSError:  # not Linux: the architecture alone
        pass
    info["torch"] = version("torch")
    return info


def golden_machine() -> dict[str, str] | None:
    p = EXPECTED / MACHINE_FILE
    return json.loads(p.read_text())["machine"] if p.is_file() else None


def same_machine(recorded: dict[str, str] | None, here: dict[str, str]) -> bool:
    """Every field the record holds (a record may hold fewer, e.g. one written after the fact) is this
    machine's; no record: the same machine (the strict comparison, as before records existed)."""
    return recorded is None or all(here.get(k) == v for k, v in recorded.items() if k != "note")


# ----------------------------------------------------------------------------------------------- comparing
_INT = re.compile(r"^[+-]?\d+$")
ID_COLUMNS = ("step", "method", "param", "value", "p_pct", "pass", "series", "canonical_name", "name", "kind",
              "metric", "role", "rank", "channel", "module_path")


def _num(s: pd.Series) -> np.ndarray | None:
    """Floats when every non-empty cell is a number (inf/nan included), else None."""
    vals = []
    for x in s:
        if x == "":
            vals.append(np.nan)
            continue
        try:
            vals.append(float(x))
        except ValueError:
            return None
    return np.asarray(vals, dtype=float)


def _row_label(df: pd.DataFrame, i: int) -> str:
    ids = [c for c in ID_COLUMNS if c in df.columns][:3]
    parts = [f"{c}={df[c].iat[i]!r}" for c in ids]
    return f"row {i}" + (f" ({', '.join(parts)})" if parts else "")


def compare_tables(exp: pd.DataFrame, act: pd.DataFrame, max_rows: int = 5, xtol: float | None = None
                   ) -> list[str]:
    """Human-readable differences between an expected and an actual table of strings; [] when they agree.
    ``xtol``: another machine made the goldens; numbers within ``xtol`` (see the module's docstring) and
    counts within 2 + 0.1 % agree."""
    problems: list[str] = []
    ec, ac = list(exp.columns), list(act.columns)
    missing = [c for c in ec if c not in ac]
    extra = [c for c in ac if c not in ec]
    if missing:
        problems.append(f"columns missing: {missing}")
    if extra:
        problems.append(f"columns not in the golden: {extra}")
    common = [c for c in ec if c in ac]
    if not missing and not extra and ec != ac:
        problems.append(f"column order differs:\n  expected {ec}\n  actual   {ac}")
    if len(exp) != len(act):
        problems.append(f"row count: expected {len(exp)}, actual {len(act)}")
        # show the first rows that differ by identity, then stop: positional diffs would be noise
        ids = [c for c in ID_COLUMNS if c in exp.columns and c in act.columns][:3]
        if ids:
            ek = set(map(tuple, exp[ids].to_numpy())), set(map(tuple, act[ids].to_numpy()))
            gone, new = sorted(ek[0] - ek[1])[:max_rows], sorted(ek[1] - ek[0])[:max_rows]
            if gone:
                problems.append(f"rows ({', '.join(ids)}) only in the golden: {gone}")
            if new:
                problems.append(f"rows ({', '.join(ids)}) only in the actual table: {new}")
        return problems
    for c in common:
        e, a = exp[c].reset_index(drop=True), act[c].reset_index(drop=True)
        if e.equals(a):
            continue
        en = _num(e)
        an = _num(a) if en is not None else None
        if en is not None and an is not None:
            integer = all(x == "" or _INT.match(x) for x in e)
            if integer and xtol is None:
                bad = ~((en == an) | (np.isnan(en) & np.isnan(an)))
                how = "exactly (integer column)"
            elif integer:
                with np.errstate(invalid="ignore"):
                    bad = ~np.isclose(an, en, rtol=XCOUNT_REL, atol=XCOUNT_ABS, equal_nan=True)
                how = f"a count on another machine: within {XCOUNT_ABS} + {XCOUNT_REL:g} of it"
            elif xtol is None:
                with np.errstate(invalid="ignore"):
                    bad = ~np.isclose(an, en, rtol=RTOL, atol=ATOL, equal_nan=True)
                how = f"rtol {RTOL:g}, atol {ATOL:g}"
            else:
                finite = np.abs(en[np.isfinite(en)])
                scale = float(finite.max()) if finite.size else 0.0
                with np.errstate(invalid="ignore"):
                    bad = ~np.isclose(an, en, rtol=xtol, atol=max(xtol * scale, ATOL), equal_nan=True)
                how = f"on another machine: rtol {xtol:g}, atol {xtol:g} x the column's largest |value| {scale:.3g}"
            idx = np.flatnonzero(bad)
        else:
            idx = np.flatnonzero((e != a).to_numpy())
            how = "exactly (text column)"
        if len(idx) == 0:
            continue
        lines = [f"column {c!r}: {len(idx)} of {len(e)} rows differ ({how})"]
        for i in idx[:max_rows]:
            extra_info = ""
            if en is not None and an is not None and np.isfinite(en[i]) and np.isfinite(an[i]):
                d = an[i] - en[i]
                extra_info = f"  (diff {d:+.3g}" + (f", rel {d / abs(en[i]):+.3g})" if en[i] else ")")
            lines.append(f"    {_row_label(exp, i)}: expected {e.iat[i]!r}, actual {a.iat[i]!r}{extra_info}")
        if len(idx) > max_rows:
            lines.append(f"    ... and {len(idx) - max_rows} more")
        problems.append("\n".join(lines))
    return problems


def compare_lines(exp: list[str], act: list[str], what: str) -> list[str]:
    gone = [k for k in exp if k not in set(act)]
    new = [k for k in act if k not in set(exp)]
    out = []
    if gone:
        out.append(f"{what} in the golden, missing now: {gone}")
    if new:
        out.append(f"{what} new, not in the golden: {new}")
    return out


def compare_text(exp: str, act: str, name: str) -> list[str]:
    if exp == act:
        return []
    import difflib

    diff = difflib.unified_diff(exp.splitlines(), act.splitlines(), f"expected/{name}", f"actual/{name}",
                                lineterm="", n=1)
    lines = list(diff)
    more = f"\n... ({len(lines) - 60} more diff lines)" if len(lines) > 60 else ""
    return ["text differs:\n" + "\n".join(lines[:60]) + more]


Invoker = Callable[[list[str], Path], "tuple[int, str, str]"]  # (argv, cwd) -> (exit code, stdout, stderr)
