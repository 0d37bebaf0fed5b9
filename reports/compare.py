"""Line up two result sets and gate on their differences (the library of ``actsparse compare``).

Both sides (actsparse output folders or report bundles) are turned into one tidy long form,
one row per (table, name, layer, kind, metric) with a float ``value``: ``name`` is the site or
tensor (``canonical_name``, else ``name``, else ``module_path``) prefixed by any other identity
column (``p_pct=1``, ``method=cett``, ``step=100``), so the five columns identify a value. The
two long forms are joined on those columns with an outer join: values present on one side only,
columns present on one side only, tables present on one side only, different token counts and
different method options are listed as problems, never silently dropped or joined.

Rules (``--fail-on METRIC:DELTA``), checked on every value whose metric matches METRIC (an exact
name or a glob; ``TABLE/METRIC`` restricts it to one table):

- ``zero_frac:-0.02``   broken if candidate - baseline < -0.02 (a drop of more than 0.02)
- ``alpha:+0.5``        broken if candidate - baseline > +0.5 (a rise of more than 0.5)
- ``alpha:+10%``        broken if (candidate - baseline) / |baseline| > 10 %
- ``zero_frac:0.01``    no sign: broken if |candidate - baseline| > 0.01 (either way)

A matched value that is missing or NaN in the candidate (finite in the baseline) breaks the rule
too; values new in the candidate or NaN in the baseline are not checked (and are counted).

Noise: a column ``X_se`` (standard error over windows, ``probes.uncertainty``) beside a column
``X`` is an error bar, not a metric (``X_lo``/``X_hi`` intervals likewise; neither is diffed nor
matched by rules). When both sides carry ``X_se``, each value of X gets
``sigma = sqrt(se_baseline^2 + se_candidate^2)`` and ``within_noise = |delta| <= z * sigma``
(``z`` = 1.96 by default: the two-sided 95 % normal quantile); the report marks each changed
value and the verdict counts the changes beyond noise. Values without error bars on both sides
compare as before. Rules are not relaxed by noise: a broken rule says whether its change is
within noise. The test treats the two sides as independent samples of windows: "within noise"
means the change is smaller than what measuring on another sample of the corpus could give. Two
runs over the same windows (same corpus, --max-tokens, --seed) are paired, so for them the test is
conservative: a systematic change smaller than the sampling noise (bf16 against float32, say) is
real but called within noise.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from probes.errors import EXIT_RULE_BROKEN, ActsparseError, did_you_mean  # noqa: F401  (re-exported for the CLI)
from probes.uncertainty import DEFAULT_Z, bar_column, is_uncertainty_column
from reports import sections
from reports.numbers import fmt, pct
from reports.sections import TableSpec
from reports.markdown import md_code, md_escape
from reports.sources import Source, checkpoint_of, read_sources, token_counts

LONG_COLUMNS = ("table", "name", "layer", "kind", "metric", "value")
_KEYS = ["table", "name", "layer", "kind", "metric"]


class RuleError(ActsparseError):
    """A --fail-on rule that cannot be parsed or matches no metric (exit code 2)."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ table specs
TOKEN_COLUMNS = ("n_tokens", "n_grad_tokens", "n_counted_tokens", "n_counted_tokens_per_checkpoint")
SPECS: dict[str, TableSpec] = sections.table_specs()  # every registered section's tables
_GENERIC_KEYS = ("checkpoint_index", "step", "p_pct", "method", "param", "canonical_name", "name", "part",
                 "module_path", "policy", "role", "kind", "layer", "channel", "metric", "series")
_MAIN_NAME = ("canonical_name", "name", "module_path", "series")


def spec_for(table: str, df: pd.DataFrame) -> TableSpec:
    base = table.split("/")[-1]
    if base in SPECS:
        return SPECS[base]
    return TableSpec(tuple(c for c in _GENERIC_KEYS if c in df.columns))


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)


def _fmt_key(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(v, (float, np.floating)) and float(v) == int(v):
        return str(int(v))
    return str(v)


@dataclass
class Issue:
    kind: str  # schema | missing | tokens | method | text | keys | noise (error bars on one side only)
    message: str
    table: str | None = None


def long_form(df: pd.DataFrame, table: str) -> tuple[pd.DataFrame, pd.DataFrame, list[Issue]]:
    """Tidy long form of one table: (table, name, layer, kind, metric, value), plus text columns and issues."""
    spec = spec_for(table, df)
    issues: list[Issue] = []
    empty_text = pd.DataFrame(columns=["table", "name", "layer", "kind", "column", "text"])
    if spec.skip or df.empty:
        return pd.DataFrame(columns=list(LONG_COLUMNS)), empty_text, issues
    df = df.reset_index(drop=True)
    keys = [k for k in spec.keys if k in df.columns]
    main = next((k for k in _MAIN_NAME if k in keys), None)
    kind_col = spec.kind_col if spec.kind_col in df.columns else ("kind" if "kind" in df.columns else None)
    extra = [k for k in keys if k not in (main, "layer", kind_col) and not (spec.value_cols and k == "metric")]
    names = []
    for i in range(len(df)):
        parts = [f"{k}={_fmt_key(df.at[i, k])}" for k in extra if _fmt_key(df.at[i, k]) != ""]
        if main is not None and _fmt_key(df.at[i, main]) != "":
            parts.append(_fmt_key(df.at[i, main]))
        names.append(" ".join(parts) if parts else ("(model)" if spec.value_cols else f"row {i}"))
    ident = pd.DataFrame({"name": names})
    ident["layer"] = pd.to_numeric(df["layer"], errors="coerce").astype("Float64") if "layer" in df.columns \
        else pd.Series([pd.NA] * len(df), dtype="Float64")
    ident["kind"] = df[kind_col].map(_fmt_key) if kind_col else ""
    if spec.value_cols and "metric" in df.columns:
        ident["metric_row"] = df["metric"].astype(str)
    dup_cols = list(ident.columns)
    dup = ident.duplicated(dup_cols, keep=False)
    if dup.any():
        occ = ident.groupby(dup_cols, dropna=False).cumcount()
        ident.loc[dup, "name"] = ident.loc[dup, "name"] + " #" + (occ[dup] + 1).astype(str)
        issues.append(Issue("keys", f"{int(dup.sum())} rows are not unique by ({', '.join(keys) or 'no key'}); "
                                    "matched by order of appearance", table))
    skip = set(keys) | set(spec.meta) | set(TOKEN_COLUMNS) | ({kind_col} if kind_col else set())
    bars = [c for c in df.columns if is_uncertainty_column(str(c), df.columns)]  # X_se / X_lo / X_hi
    skip |= set(bars)

    def se_of(col: str) -> dict[str, Any]:
        if not bars:
            return {}
        se = bar_column(col, "_se")
        return {"se": pd.to_numeric(df[se], errors="coerce").astype(float) if se in df.columns
                else pd.Series(np.nan, index=df.index)}

    frames, texts = [], []
    if spec.value_cols and "metric" in df.columns:
        for vc in spec.value_cols:
            if vc not in df.columns:
                continue
            frames.append(pd.DataFrame({"table": table, "name": vc, "layer": ident["layer"], "kind": ident["kind"],
                                        "metric": ident["metric_row"],
                                        "value": pd.to_numeric(df[vc], errors="coerce").astype(float), **se_of(vc)}))
    else:
        for col in df.columns:
            if col in skip:
                continue
            if _is_numeric(df[col]):
                v = pd.to_numeric(df[col].astype("float64") if pd.api.types.is_bool_dtype(df[col]) else df[col],
                                  errors="coerce").astype(float)
                frames.append(pd.DataFrame({"table": table, "name": ident["name"], "layer": ident["layer"],
                                            "kind": ident["kind"], "metric": str(col), "value": v, **se_of(col)}))
            else:
                texts.append(pd.DataFrame({"table": table, "name": ident["name"], "layer": ident["layer"],
                                           "kind": ident["kind"], "column": str(col),
                                           "text": df[col].map(_fmt_key)}))
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(LONG_COLUMNS))
    text = pd.concat(texts, ignore_index=True) if texts else empty_text
    return long, text, issues


# ------------------------------------------------------------------------------------------- result sets
@dataclass
class ResultSet:
    path: Path
    sources: list[Source]
    tables: dict[str, tuple[Source, str]]  # qualified table name -> (source, table name)

    @property
    def commands(self) -> list[str]:
        return [s.command for s in self.sources]

    def describe(self) -> str:
        parts = []
        for s in self.sources:
            counts = token_counts(s.manifest)
            tok = f", {max(counts.values())} tokens" if counts else ""
            parts.append(f"{s.command} of {checkpoint_of(s.manifest)}{tok}")
        return "; ".join(parts)


def _source_keys(sources: Sequence[Source]) -> list[str]:
    """``measure``, ``spectrum``, ... or ``measure#2`` for the second measure input of a bundle."""
    seen: dict[str, int] = {}
    out = []
    for s in sources:
        seen[s.command] = seen.get(s.command, 0) + 1
        out.append(s.command if seen[s.command] == 1 else f"{s.command}#{seen[s.command]}")
    return out


def load_result_set(path: str | Path) -> ResultSet:
    sources = read_sources(path)
    counts: dict[str, int] = {}
    for s in sources:
        for t in s.tables:
            counts[t] = counts.get(t, 0) + 1
    tables: dict[str, tuple[Source, str]] = {}
    for s, key in zip(sources, _source_keys(sources)):
        for t in s.tables:
            tables[t if counts[t] == 1 else f"{key}/{t}"] = (s, t)
    return ResultSet(Path(path), sources, tables)


# -------------------------------------------------------------------------------------------------- rules
_DELTA = re.compile(r"^([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(%?)$")


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str  # exact name or glob
    table: str | None
    delta: float  # >= 0
    direction: int  # -1: a drop breaks it, +1: a rise breaks it, 0: either
    relative: bool

    def describe(self) -> str:
        what = "(candidate - baseline) / |baseline|" if self.relative else "candidate - baseline"
        lim = f"{100 * self.delta:g} %" if self.relative else f"{self.delta:g}"
        scope = f"{self.metric} in table {self.table}" if self.table else self.metric
        if self.direction < 0:
            return f"{scope}: broken if {what} < -{lim}"
        if self.direction > 0:
            return f"{scope}: broken if {what} > +{lim}"
        return f"{scope}: broken if |{what}| > {lim}"

    def matches(self, table: str, metric: str) -> bool:
        if self.table is not None and table.split("/")[-1] != self.table and table != self.table:
            return False
        return metric == self.metric or fnmatch.fnmatchcase(metric, self.metric)

    def change(self, base: float, cand: float) -> float:
        d = cand - base
        if not self.relative:
            return d
        if base == 0:
            return 0.0 if d == 0 else math.copysign(math.inf, d)
        return d / abs(base)

    def broken_by(self, base: float, cand: float) -> bool:
        c = self.change(base, cand)
        # a change of exactly DELTA holds; float rounding (0.78 - 0.80 = -0.020000000000000018) must not break it
        lim = self.delta + 1e-12 * (1.0 if self.relative else max(1.0, abs(base), abs(cand)))
        if self.direction < 0:
            return c < -lim
        if self.direction > 0:
            return c > lim
        return abs(c) > lim


def parse_rule(text: str) -> Rule:
    """``METRIC:DELTA`` (``zero_frac:-0.02``, ``alpha:+10%``, ``sparsity/zero_frac:0.01``)."""
    raw = text.strip()
    if ":" not in raw:
        raise RuleError(f"--fail-on {text!r} has no ':'", "write METRIC:DELTA, e.g. zero_frac:-0.02 or alpha:+10%")
    metric, delta = raw.rsplit(":", 1)
    metric, delta = metric.strip(), delta.strip().replace(" ", "")
    m = _DELTA.match(delta)
    if not metric or not m:
        raise RuleError(f"--fail-on {text!r}: cannot read the delta {delta!r}" if metric else
                        f"--fail-on {text!r} names no metric",
                        "write METRIC:DELTA with DELTA like -0.02, +0.5, 0.01 or +10% (a sign says which "
                        "direction fails; none means either)")
    sign, number, pct = m.groups()
    value = float(number) / (100.0 if pct else 1.0)
    if not math.isfinite(value):  # 1e999 reads as inf: a rule no change can break
        raise RuleError(f"--fail-on {text!r}: the delta {delta!r} is not a finite number",
                        "write a finite DELTA, e.g. -0.02, +0.5 or +10%")
    table = None
    if "/" in metric:
        table, metric = metric.rsplit("/", 1)
    return Rule(raw, metric, table or None, value, {"-": -1, "+": 1, "": 0}[sign], bool(pct))


@dataclass
class RuleResult:
    rule: Rule
    n_checked: int
    n_skipped: int  # NaN in the baseline, or only in the candidate
    broken: pd.DataFrame  # the diff rows that break it (with a "why" column)
    tables: list[str]

    @property
    def passed(self) -> bool:
        return self.broken.empty


# ------------------------------------------------------------------------------------------------ compare
@dataclass
class CompareResult:
    baseline: ResultSet
    candidate: ResultSet
    diff: pd.DataFrame  # table name layer kind metric baseline candidate delta rel_delta status
    issues: list[Issue]
    rules: list[RuleResult]
    text_changes: pd.DataFrame
    compared_tables: list[str]
    skipped_tables: dict[str, str] = field(default_factory=dict)
    strict: bool = False  # a mismatch (tables, columns, rows, tokens, method options) fails too
    z: float = DEFAULT_Z  # a change is within noise when |delta| <= z * sqrt(se_baseline^2 + se_candidate^2)

    @property
    def has_error_bars(self) -> bool:
        """Some value has a standard error on both sides (``within_noise`` is known for it)."""
        return "within_noise" in self.diff.columns and bool(self.diff.within_noise.notna().any())

    def noise_counts(self) -> dict[str, int]:
        """Changed values with error bars on both sides, and how many of them change beyond noise."""
        ch = self.changed()
        if "within_noise" not in ch.columns:
            return {"changed_with_error_bars": 0, "beyond_noise": 0}
        known = ch[ch.within_noise.notna()]
        beyond = int((~known.within_noise.astype(bool)).sum())
        return {"changed_with_error_bars": len(known), "beyond_noise": beyond}

    def noise_clause(self) -> str:
        """``3 of 40 changes with error bars beyond noise (z 1.96)`` ('' when no value has error bars on both sides)."""
        if not self.has_error_bars:
            return ""
        n = self.noise_counts()
        return (f"{n['beyond_noise']} of {n['changed_with_error_bars']} changes with error bars beyond noise "
                f"(|delta| > {fmt(self.z)} sigma)")

    @property
    def passed(self) -> bool:
        """Every rule holds."""
        return all(r.passed for r in self.rules)

    @property
    def failed(self) -> bool:
        """The gate's verdict: a broken rule, or with ``strict`` any mismatch."""
        return not self.passed or (self.strict and self.mismatched)

    @property
    def mismatched(self) -> bool:
        return any(i.kind in ("schema", "missing", "tokens", "method") for i in self.issues)

    def changed(self) -> pd.DataFrame:
        d = self.diff[self.diff.status == "both"]
        b, c = d.baseline.to_numpy(float), d.candidate.to_numpy(float)
        with np.errstate(invalid="ignore"):  # inf - inf
            same = (b == c) | (np.isnan(b) & np.isnan(c)) | (np.abs(c - b) <= 1e-12 * np.maximum(np.abs(b), np.abs(c)))
        out = d[~same].copy()
        out["_order"] = np.abs(out.rel_delta.to_numpy(float))
        out["_order"] = out["_order"].fillna(np.inf)
        return out.sort_values(["_order", "table", "name"], ascending=[False, True, True]).drop(columns="_order")

    def to_markdown(self, top: int = 25) -> str:
        return render_markdown(self, top)


def _diff(base: pd.DataFrame, cand: pd.DataFrame, z: float = DEFAULT_Z) -> pd.DataFrame:
    bars = "se" in base.columns or "se" in cand.columns
    b = base.rename(columns={"value": "baseline", "se": "se_baseline"})
    c = cand.rename(columns={"value": "candidate", "se": "se_candidate"})
    if bars:
        for d, col in ((b, "se_baseline"), (c, "se_candidate")):
            if col not in d.columns:
                d[col] = np.nan
    for d in (b, c):
        d["layer"] = d["layer"].astype("Float64")
        d["kind"] = d["kind"].astype(str)
    m = b.merge(c, on=_KEYS, how="outer", indicator=True, sort=False)
    m["status"] = m["_merge"].map({"both": "both", "left_only": "baseline_only", "right_only": "candidate_only"})
    m = m.drop(columns="_merge")
    bv, cv = m.baseline.to_numpy(float), m.candidate.to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = cv - bv
        rel = np.where(bv == 0, np.where(delta == 0, 0.0, np.sign(delta) * np.inf), delta / np.abs(bv))
    m["delta"] = delta
    m["rel_delta"] = rel
    if bars:  # error bars: sigma of the difference, and whether it is within z sigma (NA without both se)
        with np.errstate(invalid="ignore"):
            sigma = np.sqrt(m.se_baseline.to_numpy(float) ** 2 + m.se_candidate.to_numpy(float) ** 2)
            known = np.isfinite(sigma) & np.isfinite(delta)
            within = np.abs(delta) <= z * sigma
        m["sigma"] = sigma
        m["within_noise"] = pd.array(np.where(known, within, False), dtype="boolean")
        m.loc[~known, "within_noise"] = pd.NA
        m = m[[c for c in m.columns if c not in ("se_baseline", "se_candidate", "sigma", "within_noise")]
              + ["se_baseline", "se_candidate", "sigma", "within_noise"]]
    return m


def _method_view(man: dict[str, Any]) -> dict[str, Any]:
    """The options that change what a number means (not where it was computed)."""
    out: dict[str, Any] = {}
    keys = ("max_length", "stride", "skip_first", "window_scheme", "model_dtype", "prefix_token", "preset", "bos",
            "n_sequences", "loss", "loss_reduction", "method", "tol", "corpus_is_default", "statistics_dtype")
    for sec in ("measurement", "massive", "gradients", "pplp", "curve", "track"):
        s = man.get(sec)
        if not isinstance(s, dict):
            continue
        for k in keys:
            if k in s and not isinstance(s[k], (dict, list)):
                out[f"{sec}.{k}"] = s[k]
        if s.get("corpus"):
            out[f"{sec}.corpus (file name)"] = Path(str(s["corpus"])).name
        opts = s.get("options") if isinstance(s.get("options"), dict) else {}
        for k in ("eps_grid", "chunk_k", "kinds", "sites", "top_k", "taus"):
            if k in opts:
                out[f"{sec}.options.{k}"] = opts[k]
    svd = man.get("svd")
    if isinstance(svd, dict) and "dtype" in svd:
        out["svd.dtype"] = svd["dtype"]
    return out


def _short_list(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def compare(baseline: str | Path, candidate: str | Path, rules: Sequence[str | Rule] = (),
            strict: bool = False, z: float = DEFAULT_Z) -> CompareResult:
    """Line up ``baseline`` and ``candidate`` (output folders or report bundles) and check ``rules``.

    ``strict``: the verdict (``CompareResult.failed``) also fails on any mismatch between the sides.
    ``z``: where both sides carry ``X_se`` columns, a change of X is within noise when
    ``|delta| <= z * sqrt(se_baseline^2 + se_candidate^2)``.
    """
    parsed = [r if isinstance(r, Rule) else parse_rule(r) for r in rules]
    base, cand = load_result_set(baseline), load_result_set(candidate)
    issues: list[Issue] = []
    if base.commands != cand.commands:
        issues.append(Issue("schema", f"different kinds of output: baseline {', '.join(base.commands)}; "
                                      f"candidate {', '.join(cand.commands)}"))
    for t in sorted(set(base.tables) - set(cand.tables)):
        issues.append(Issue("missing", f"table {t} only in the baseline", t))
    for t in sorted(set(cand.tables) - set(base.tables)):
        issues.append(Issue("missing", f"table {t} only in the candidate", t))
    # token counts and method options, source by source (in order of command)
    for (kb, sb), (kc, sc) in zip(zip(_source_keys(base.sources), base.sources),
                                  zip(_source_keys(cand.sources), cand.sources)):
        if kb != kc:
            continue
        tb, tc = token_counts(sb.manifest), token_counts(sc.manifest)
        for sec in sorted(set(tb) | set(tc)):
            if tb.get(sec) != tc.get(sec):
                issues.append(Issue("tokens", f"{kb}: counted tokens differ in {sec}: baseline {tb.get(sec, 'none')}, "
                                              f"candidate {tc.get(sec, 'none')}"))
        mb, mc = _method_view(sb.manifest), _method_view(sc.manifest)
        shared = {k.split(".")[0] for k in mb} & {k.split(".")[0] for k in mc}  # a missing section is listed above
        for k in sorted(k for k in set(mb) | set(mc) if k.split(".")[0] in shared):
            if mb.get(k) != mc.get(k):
                issues.append(Issue("method", f"{kb}: {k} differs: baseline {mb.get(k, 'absent')!r}, "
                                              f"candidate {mc.get(k, 'absent')!r}"))
    longs_b, longs_c, texts_b, texts_c = [], [], [], []
    compared, skipped = [], {}
    for t in sorted(set(base.tables) & set(cand.tables)):
        (sb, nb), (sc, nc) = base.tables[t], cand.tables[t]
        db, dc = sb.table(nb), sc.table(nc)
        spec = spec_for(t, db)
        if spec.skip:
            skipped[t] = spec.skip
            continue
        compared.append(t)
        only_b, only_c = [c for c in db.columns if c not in dc.columns], [c for c in dc.columns if c not in db.columns]
        def bar_col(c: Any, cols) -> bool:  # an error bar, or the window count behind them
            return str(c) == "n_windows" or is_uncertainty_column(str(c), cols)

        for side, only, cols in (("baseline", only_b, db.columns), ("candidate", only_c, dc.columns)):
            bars = [c for c in only if bar_col(c, cols)]
            if bars:  # error bars on one side only: no noise verdict for them, but nothing measured differs
                issues.append(Issue("noise", f"{t}: error-bar columns only in the {side} ({_short_list(bars, 3)}): "
                                             "no within-noise verdict for their metrics", t))
        only_b = [c for c in only_b if not bar_col(c, db.columns)]
        only_c = [c for c in only_c if not bar_col(c, dc.columns)]
        if only_b:
            issues.append(Issue("schema", f"{t}: columns only in the baseline: {_short_list(only_b)}", t))
        if only_c:
            issues.append(Issue("schema", f"{t}: columns only in the candidate: {_short_list(only_c)}", t))
        for col in (c for c in db.columns if c in dc.columns):
            if _is_numeric(db[col]) != _is_numeric(dc[col]) and not (db[col].isna().all() or dc[col].isna().all()):
                issues.append(Issue("schema", f"{t}: column {col} is {'numeric' if _is_numeric(db[col]) else 'text'} "
                                              f"in the baseline but {'numeric' if _is_numeric(dc[col]) else 'text'} "
                                              "in the candidate", t))
        for tc_col in TOKEN_COLUMNS:
            if tc_col in db.columns and tc_col in dc.columns:
                vb = sorted(set(pd.to_numeric(db[tc_col], errors="coerce").dropna().astype(int)))
                vc = sorted(set(pd.to_numeric(dc[tc_col], errors="coerce").dropna().astype(int)))
                if vb != vc:
                    issues.append(Issue("tokens", f"{t}: {tc_col} differ: baseline {_short_list(map(str, vb), 4)}, "
                                                  f"candidate {_short_list(map(str, vc), 4)}", t))
        lb, xb, ib = long_form(db, t)
        lc, xc, ic = long_form(dc, t)
        issues += [Issue(i.kind, f"baseline {i.message}", t) for i in ib]
        issues += [Issue(i.kind, f"candidate {i.message}", t) for i in ic]
        longs_b.append(lb)
        longs_c.append(lc)
        texts_b.append(xb)
        texts_c.append(xc)
    empty = pd.DataFrame(columns=list(LONG_COLUMNS))
    lb = pd.concat([x for x in longs_b if len(x)], ignore_index=True) if any(len(x) for x in longs_b) else empty.copy()
    lc = pd.concat([x for x in longs_c if len(x)], ignore_index=True) if any(len(x) for x in longs_c) else empty.copy()
    diff = _diff(lb, lc, z)
    # rows (sites, layers, ...) on one side only, per table; metrics of shared rows missing on one side
    row_cols = ["table", "name", "layer", "kind"]
    for status, side in (("baseline_only", "baseline"), ("candidate_only", "candidate")):
        d = diff[diff.status == status]
        if d.empty:
            continue
        other = "candidate" if side == "baseline" else "baseline"
        rows_other = diff[diff.status != status][row_cols].drop_duplicates()
        for t, g in d.groupby("table", sort=True):
            rows = g[row_cols].drop_duplicates()
            whole = rows.merge(rows_other, on=row_cols, how="left", indicator=True)
            missing_rows = whole[whole["_merge"] == "left_only"]
            if len(missing_rows):
                labels = [f"{r.name}" + (f" (layer {int(r.layer)})" if pd.notna(r.layer) else "")
                          for r in missing_rows.itertuples()]
                issues.append(Issue("missing", f"{t}: {len(labels)} row(s) only in the {side}: "
                                               f"{_short_list(labels)}", t))
            part = g.merge(missing_rows[row_cols], on=row_cols, how="left", indicator=True)
            part = part[part["_merge"] == "left_only"]
            if len(part):
                mets = sorted(set(part.metric))
                issues.append(Issue("missing", f"{t}: metric(s) {_short_list(mets)} missing in the {other} for "
                                               f"{part[row_cols].drop_duplicates().shape[0]} row(s)", t))
    both = diff[diff.status == "both"]
    nan_c = both[both.baseline.notna() & both.candidate.isna()]
    if len(nan_c):
        for t, g in nan_c.groupby("table"):
            issues.append(Issue("missing", f"{t}: {len(g)} value(s) finite in the baseline are NaN in the candidate "
                                           f"({_short_list(sorted(set(g.metric)))})", t))
    nan_b = both[both.baseline.isna() & both.candidate.notna()]
    if len(nan_b):
        for t, g in nan_b.groupby("table"):
            issues.append(Issue("missing", f"{t}: {len(g)} value(s) NaN in the baseline are finite in the candidate "
                                           f"({_short_list(sorted(set(g.metric)))})", t))
    text_changes = _text_changes(texts_b, texts_c)
    for (t, col), g in text_changes.groupby(["table", "column"], sort=True):
        ex = g.iloc[0]
        issues.append(Issue("text", f"{t}: {col} changed in {len(g)} row(s), e.g. {ex['name']}: "
                                    f"{ex['baseline']!r} -> {ex['candidate']!r}", t))
    results = [_check_rule(r, diff, z) for r in parsed]
    return CompareResult(base, cand, diff, issues, results, text_changes, compared, skipped, strict, z)


def _text_changes(tb: list[pd.DataFrame], tc: list[pd.DataFrame]) -> pd.DataFrame:
    cols = ["table", "name", "layer", "kind", "column", "baseline", "candidate"]
    b = [x for x in tb if len(x)]
    c = [x for x in tc if len(x)]
    if not b or not c:
        return pd.DataFrame(columns=cols)
    b, c = pd.concat(b, ignore_index=True), pd.concat(c, ignore_index=True)
    for d in (b, c):
        d["layer"] = d["layer"].astype("Float64")
    m = b.merge(c, on=["table", "name", "layer", "kind", "column"], suffixes=("_b", "_c"))
    m = m[m.text_b != m.text_c].rename(columns={"text_b": "baseline", "text_c": "candidate"})
    return m[cols].reset_index(drop=True)


def _noise_note(r: Any, z: float) -> str:
    """`` (within noise, 0.4 sigma)`` for a row of the diff with error bars on both sides, else ''."""
    w = getattr(r, "within_noise", None)
    if w is None or w is pd.NA or pd.isna(w):
        return ""
    sig = float(r.sigma)
    k = abs(float(r.delta)) / sig if sig > 0 else (0.0 if float(r.delta) == 0 else math.inf)
    return f" ({'within' if bool(w) else 'beyond'} noise, {fmt(k, 3)} sigma)"


def _check_rule(rule: Rule, diff: pd.DataFrame, z: float = DEFAULT_Z) -> RuleResult:
    hit = diff[[rule.matches(t, m) for t, m in zip(diff.table, diff.metric)]] if len(diff) else diff
    if hit.empty:
        known = sorted(set(diff.metric)) if len(diff) else []
        where = f" in table {rule.table}" if rule.table else ""
        raise RuleError(f"--fail-on {rule.text!r}: no metric {rule.metric!r}{where} in either result set"
                        + did_you_mean(rule.metric, known, n=3),
                        "use a metric column name from the tables (e.g. zero_frac, alpha, ratio_top1_median), "
                        "optionally as TABLE/METRIC")
    broken, n_checked, n_skipped = [], 0, 0
    for r in hit.itertuples(index=False):
        b, c = r.baseline, r.candidate
        if r.status == "candidate_only" or (r.status == "both" and (b is None or math.isnan(b))):
            n_skipped += 1
            continue
        n_checked += 1
        if r.status == "baseline_only":
            broken.append({**r._asdict(), "why": "missing in the candidate"})
        elif c is None or math.isnan(c):
            broken.append({**r._asdict(), "why": "NaN in the candidate"})
        elif rule.broken_by(b, c):
            ch = rule.change(b, c)
            broken.append({**r._asdict(), "why": f"{'%+.2f %%' % (100 * ch) if rule.relative else '%+.4g' % ch}"
                                                 + _noise_note(r, z)})
    cols = list(diff.columns) + ["why"]
    return RuleResult(rule, n_checked, n_skipped, pd.DataFrame(broken, columns=cols), sorted(set(hit.table)))


# ----------------------------------------------------------------------------------------------- markdown
def _layer(v: Any) -> str:
    """A layer number for display ('' when there is none)."""
    return "" if v is None or pd.isna(v) else str(int(v))


def render_markdown(res: CompareResult, top: int = 25) -> str:
    """A markdown report for a pull-request comment or a CI job summary."""
    n_broken = sum(not r.passed for r in res.rules)
    if n_broken:
        head = f"FAIL: {n_broken} of {len(res.rules)} rule(s) broken"
    elif res.failed:
        head = "FAIL (--strict): the two sides measured different things" + (
            f"; all {len(res.rules)} rule(s) hold" if res.rules else "")
    elif res.rules:
        head = f"PASS: all {len(res.rules)} rule(s) hold"
    else:
        head = "no rules given"
    if res.has_error_bars:
        head += f"; {res.noise_clause()}"
    lines = [f"## actsparse compare: {head}", "",
             f"- baseline: {md_code(res.baseline.path)}: {md_escape(res.baseline.describe())}",
             f"- candidate: {md_code(res.candidate.path)}: {md_escape(res.candidate.describe())}",
             f"- tables compared: {md_escape(', '.join(res.compared_tables) or 'none')}"
             + (f"; not compared: {md_escape(', '.join(f'{k} ({v})' for k, v in res.skipped_tables.items()))}"
                if res.skipped_tables else ""), ""]
    if res.rules:
        lines += ["| rule | status | meaning | values checked | broken | worst |", "|---|---|---|---:|---:|---|"]
        for r in res.rules:
            worst = "-"
            if not r.passed:
                b = r.broken.iloc[0]
                worst = (f"{b['table']} {b['name']}" + (f" layer {_layer(b['layer'])}" if _layer(b['layer']) else "")
                         + f" {b['metric']}: {fmt(b['baseline'], 6)} -> {fmt(b['candidate'], 6)} ({b['why']})")
            status = "**broken**" if not r.passed else "ok"
            lines.append(f"| {md_code(r.rule.text)} | {status} | {md_escape(r.rule.describe())} | {r.n_checked} | "
                         f"{len(r.broken)} | {md_escape(worst)} |")
        lines.append("")
    problems = [i for i in res.issues if i.kind not in ("text", "noise")]
    if problems:
        lines += ["### Differences in what was measured (reported, not joined)", ""]
        lines += [f"- **{i.kind}**: {md_escape(i.message)}" for i in problems]
        lines.append("")
    bars = [i for i in res.issues if i.kind == "noise"]
    if bars:
        lines += ["### Error bars on one side only", ""] + [f"- {md_escape(i.message)}" for i in bars] + [""]
    texts = [i for i in res.issues if i.kind == "text"]
    if texts:
        lines += ["### Changed text columns", ""] + [f"- {md_escape(i.message)}" for i in texts] + [""]
    ch = res.changed()
    n_both = int((res.diff.status == "both").sum())
    lines += [f"### Largest changes ({min(top, len(ch))} of {len(ch)} changed values; {n_both} values on both sides)",
              ""]
    noise = res.has_error_bars
    if noise:
        lines += [f"Noise: where both sides carry a standard error (`X_se`), sigma = sqrt(se_baseline^2 + "
                  f"se_candidate^2) and a change is within noise when abs(delta) <= {fmt(res.z)} sigma.", ""]
    if len(ch):
        lines += ["| table | site | layer | kind | metric | baseline | candidate | delta | delta % |"
                  + (" noise |" if noise else ""),
                  "|---|---|---:|---|---|---:|---:|---:|---:|" + ("---|" if noise else "")]
        for r in ch.head(top).itertuples(index=False):
            lines.append(f"| {md_escape(r.table)} | {md_escape(r.name)} | {_layer(r.layer)} | {md_escape(r.kind)} | "
                         f"{md_escape(r.metric)} | {fmt(r.baseline, 6)} | {fmt(r.candidate, 6)} | {fmt(r.delta, 6)} | "
                         f"{pct(r.rel_delta, signed=True, suffix=' %')} |"
                         + (f" {_noise_note(r, res.z).strip(' ()') or '-'} |" if noise else ""))
    else:
        lines.append("No value changed.")
    for r in res.rules:
        if len(r.broken) > 1:
            lines += ["", f"<details><summary>All {len(r.broken)} values breaking <code>{md_escape(r.rule.text)}</code>"
                          "</summary>", "", "| table | site | layer | metric | baseline | candidate | why |",
                      "|---|---|---:|---|---:|---:|---|"]
            for b in r.broken.head(200).itertuples(index=False):
                lines.append(f"| {md_escape(b.table)} | {md_escape(b.name)} | {_layer(b.layer)} | "
                             f"{md_escape(b.metric)} | "
                             f"{fmt(b.baseline, 6)} | {fmt(b.candidate, 6)} | {md_escape(b.why)} |")
            lines += ["", "</details>"]
    return "\n".join(lines) + "\n"
