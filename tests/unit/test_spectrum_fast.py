"""The fast paths of ``actsparse spectrum`` (issue 16, goal 1) give the numbers and bytes of the paths they
replace: the pandas-free table and its files, the Nelder-Mead polish without scipy.optimize, the windowed
KDE, the blocked KS distances, the cheaper finiteness check. Each is compared bit for bit with a
reference written here from the definition (or with pandas / scipy themselves)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probes import spectrum as sp
from probes import spectrum_fit as sf
from probes.errors import ModelError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "probes" / "data" / "tiny-relu-lm"


# ------------------------------------------------------------------ Nelder-Mead (WW's fmin polish)

def _fmin(f, x0: float) -> float:
    from scipy.optimize import fmin

    return float(fmin(lambda p: f(float(p[0])), x0, full_output=True, disp=False)[0][0])


AWKWARD = [  # (function, start): plateaus, ties, NaN, divergence (the 200-step / 200-value budgets), x0 = 0
    (lambda x: (x - 1.3) ** 2, 1.0),
    (lambda x: abs(x + 4.0) ** 0.5, 7.0),
    (lambda x: 1.0, 3.0),
    (lambda x: 1.0, 0.0),
    (lambda x: (x - 0.01) ** 2, 0.0),
    (lambda x: 1000.0 if x < 0.5 else (x - 0.7) ** 2, 0.3),  # a penalty plateau, as the MP fit's
    (lambda x: float("nan") if x > 2 else (x - 1) ** 2, 1.9),
    (lambda x: math.floor(x * 3) % 2, 0.7),
    (lambda x: math.sin(50 * x) + x * x, 1.3),
    (lambda x: x, 1.0),  # runs out of steps
    (lambda x: -x * x, 0.1),
    (lambda x: (x - 1e6) ** 2, 1.0),
]


@pytest.mark.parametrize("i", range(len(AWKWARD)))
def test_nelder_mead_is_scipys_fmin_to_the_last_bit(i):
    f, x0 = AWKWARD[i]
    ours, ref = sf.nelder_mead_1d(f, x0), _fmin(f, x0)
    assert ours == ref or (math.isnan(ours) and math.isnan(ref))


def test_nelder_mead_on_random_quadratics_and_kinks():
    rng = np.random.default_rng(0)
    for _ in range(60):
        a, c, p = rng.uniform(-5, 5), rng.uniform(0.01, 100), float(rng.choice([1, 2, 4, 0.5]))
        f = lambda x, a=a, c=c, p=p: c * abs(x - a) ** p  # noqa: E731
        x0 = float(rng.uniform(-10, 10))
        assert sf.nelder_mead_1d(f, x0) == _fmin(f, x0)


def test_nelder_mead_by_hand():
    # f = (x - 2)^2 from 1: the simplex {1, 1.05}; reflection 1.1 (better) -> expansion 1.15 is kept, ...
    assert sf.nelder_mead_1d(lambda x: (x - 2.0) ** 2, 1.0) == pytest.approx(2.0, abs=1e-4)
    assert sf.nelder_mead_1d(lambda x: 5.0, 0.0) == 0.0  # flat: the start is as good as anything


def test_mp_fit_sigma_is_scipys_on_real_esds():
    """The MP objective of every matrix of the bundled model (real ESDs, the penalty edges), polished by
    scipy's fmin from the same start (the reference's code path) and by ours."""
    t = sp.analyze_checkpoint(TINY, frame=False, compute_thread=False)
    kept: dict[str, tuple] = {}

    def grab(row, evals):
        kept[row["name"]] = (evals, row)

    sp.analyze_checkpoint(TINY, on_layer=grab, compute_thread=False)
    assert len(kept) == len(t)
    for name, (evals, row) in kept.items():
        N, M = int(row["N"]), int(row["M"])
        Q = N / M
        W_scale = np.sqrt(evals.size) / np.sqrt(np.sum(evals))
        x = (W_scale * W_scale) * evals
        s0 = np.sqrt(np.max(x) / np.square(1 + 1.0 / np.sqrt(Q)))
        kde = sf.kde_on_grid(np.sqrt(x) if Q == 1 else x)
        grid = np.mgrid[0.05 * s0:2.0 * s0:0.01 * s0]
        start = float(grid[int(np.argmin(sf._mp_sse(grid, kde, Q)))])
        f = lambda s: sf._mp_sse(np.array([s]), kde, Q)[0]  # noqa: E731
        assert sf.nelder_mead_1d(f, start) == _fmin(f, start) == row["sigma_mp"], name


def test_the_spectrum_command_path_imports_neither_pandas_pyarrow_scipy_optimize_nor_rich(tmp_path):
    code = ("import sys\nfrom actsparse_cli.main import app\n"
            f"sys.argv = ['actsparse', 'spectrum', {str(TINY)!r}, '-q', '-o', {str(tmp_path / 'out')!r}]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('pandas', 'pyarrow', 'scipy.optimize', 'rich.progress', 'rich.console')\n"
            "             if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "spectrum.parquet").is_file() and (tmp_path / "out" / "spectrum.csv").is_file()


def _mp_sse_every_row(sigmas, kde, Q):
    """The MP objective as WW's brute force computes it: the density for every sigma, the penalty rows after."""
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    resid = sf.mp_density(kde.x[None, :], s, Q) - kde.y
    if Q != 1:
        lam_plus, lam_minus = sf._mp_edges(s, Q)
        x_peak = kde.x[np.argmax(kde.y)]
        outside = (lam_plus < x_peak) | (lam_plus > np.max(kde.x)) | (lam_minus > x_peak)
        resid = np.where(outside, sf.MP_PENALTY, resid)
    resid = np.concatenate([resid, np.zeros((resid.shape[0], kde.n_dropped))], axis=1)
    return np.sum(resid ** 2, axis=1)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("shape", [(300, 300), (300, 120), (500, 60), (64, 63)])
def test_mp_objective_skipping_the_penalty_rows_is_every_row_to_the_last_bit(shape):
    """``_mp_sse`` computes the density only for the sigmas whose MP edges fall inside the data (most of the
    brute-force grid is outside): each value must be the every-row computation's, bit for bit, on the grid,
    on single sigmas (the Nelder-Mead polish), with NaN, 0 and huge sigmas, and when no or every sigma is
    outside."""
    rng = np.random.default_rng(shape[0] + shape[1])
    a, b = shape
    W = rng.standard_normal((a, b)) + 2.0 * np.outer(rng.standard_normal(a), rng.standard_normal(b)) / np.sqrt(a * b)
    evals = np.sort(np.linalg.eigvalsh(W.T @ W))
    Q = a / b
    x = evals * (evals.size / evals.sum())
    kde = sf.kde_on_grid(np.sqrt(x) if Q == 1 else x)
    s0 = np.sqrt(x.max() / np.square(1 + 1.0 / np.sqrt(Q)))
    grid = np.mgrid[0.05 * s0:2.0 * s0:0.01 * s0]
    mixed = np.concatenate([grid, rng.uniform(0, 3 * s0, 50), [0.0, np.nan, 1e6, -1.0]])
    got = sf._mp_sse(mixed, kde, Q)
    assert np.array_equal(got, _mp_sse_every_row(mixed, kde, Q), equal_nan=True)
    for sig in (grid[0], grid[len(grid) // 2], s0, np.nan):
        assert np.array_equal(sf._mp_sse(np.array([sig]), kde, Q), _mp_sse_every_row(np.array([sig]), kde, Q),
                              equal_nan=True)
    if Q != 1:  # every sigma outside, and none: the same values too
        far = np.array([1e3 * s0, 2e3 * s0])
        assert np.array_equal(sf._mp_sse(far, kde, Q), _mp_sse_every_row(far, kde, Q))
        assert np.all(sf._mp_sse(far, kde, Q) >= sf.MP_PENALTY ** 2)
        best = grid[int(np.argmin(got[:grid.size]))]
        assert np.array_equal(sf._mp_sse(np.array([best]), kde, Q), _mp_sse_every_row(np.array([best]), kde, Q))


# ------------------------------------------------------------------ KDE and KS distances

def _kde_dense_reference(data: np.ndarray):
    """The linear-kernel KDE on the grid, every (grid point, data point) pair, data in blocks of 2048:
    the definition, written out."""
    xs = np.linspace(0, np.max(data) + 0.5, sf.KDE_POINTS)
    acc = np.zeros(sf.KDE_POINTS)
    for b0 in range(0, data.size, 2048):
        k = 1.0 - np.abs(xs[:, None] - data[None, b0:b0 + 2048]) / sf.KDE_BANDWIDTH
        acc += np.clip(k, 0.0, None).sum(axis=1)
    return xs, acc / (data.size * sf.KDE_BANDWIDTH)


@pytest.mark.parametrize("n", [1, 2, 9, 384, 2048, 2049, 4500])
def test_windowed_kde_is_the_dense_one_to_the_last_bit(n):
    rng = np.random.default_rng(n)
    for data in (rng.gamma(2, 0.5, n), np.sort(rng.pareto(1.5, n)), rng.uniform(0, 0.01, n), np.zeros(n),
                 rng.uniform(0, 300, n)):
        kde = sf.kde_on_grid(data)
        xs, ys = _kde_dense_reference(data)
        good = ys > sf.KDE_MIN_DENSITY
        assert np.array_equal(kde.x, xs[good]) and np.array_equal(kde.y, ys[good])
        assert kde.n_dropped == int(np.count_nonzero(ys < sf.KDE_MIN_DENSITY))


def test_kde_of_one_point_by_hand():
    kde = sf.kde_on_grid(np.array([0.5]))  # grid [0, 1], step 1/999; peak 1/h = 10 at the grid point nearest 0.5
    assert kde.y.max() == pytest.approx(10 * (1 - abs(round(0.5 * 999) / 999 - 0.5) / 0.1))
    assert kde.x.min() > 0.4 - 1e-3 and kde.x.max() < 0.6 + 1e-3


def test_blocked_ks_distances_are_the_row_by_row_definition():
    """D_i = max_{j>=i} |1 - (x_j/x_i)^(1-alpha_i) - (j-i)/n_i| row by row (as exp of the log ratio, the
    form WW's fit evaluates), against the blocked computation, bit for bit, for several block sizes."""
    rng = np.random.default_rng(3)
    for n in (20, 65, 300, 768):
        data = np.sort(rng.pareto(2.0, n) + 0.5)
        alphas, Ds = sf._pl_candidates(data)
        logs = np.log(data)
        for i in range(n - 1):
            n_i = float(n - i)
            dev = np.abs(1 - np.exp((logs[i:] - logs[i]) * (1 - alphas[i])) - np.arange(n - i) / n_i)
            assert Ds[i] == (dev.max() if alphas[i] > 1 else 1.0), (n, i)
        for rows in (1, 7, 64, 1000):
            assert np.array_equal(sf._pl_candidates(data, rows)[1], Ds)


# ------------------------------------------------------------------ finiteness check

def test_check_finite_float32_overflowing_sum_is_not_an_error():
    W = np.full((64, 64), 3e37, dtype=np.float32)  # every entry finite; the float32 sum overflows
    sf.check_finite(W, "big")
    W[3, 5] = np.nan
    with pytest.raises(ModelError, match="1 non-finite"):
        sf.check_finite(W, "w")
    h = np.full((8, 8), 60000, dtype=np.float16)  # float16: summed in float32
    sf.check_finite(h, "h")
    h[0, 0] = np.inf
    with pytest.raises(ModelError, match="1 non-finite"):
        sf.check_finite(h, "h")


# ------------------------------------------------------------------ the table without pandas

def _odd_checkpoint(folder: Path) -> Path:
    """Every kind of row: dense and conv weights, a weight past WW's size limits (status skipped, NA
    integers), a NaN weight, an all-zero weight (failed fits), a name WW skips, a bias."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    W = {
        "h.0.mlp.c_fc.weight": rng.standard_normal((16, 48)).astype(np.float32),
        "h.0.attn.c_attn.weight": rng.standard_normal((16, 48)).astype(np.float32),
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "huge.weight": np.zeros((50001, 8), dtype=np.float16),
        "nan.weight": np.full((12, 10), np.nan, dtype=np.float32),
        "zero.weight": np.zeros((12, 10), dtype=np.float32),
        "proj.kernel": rng.standard_normal((20, 10)).astype(np.float32),
        "proj.bias": np.zeros(10, dtype=np.float32),
    }
    folder.mkdir()
    save_file(W, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 2, "n_embd": 16}))
    return folder


CASES = [(TINY, {}), (TINY, {"randomize": True, "split_fused": True, "seed": 3}), ("odd", {}),
         ("odd", {"split_fused": True, "randomize": True})]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_table_files_are_the_pandas_files(tmp_path, case):
    import pandas as pd

    from reports.spectrum_table import write_spectrum_table
    from reports.tables import write_table

    path, kw = CASES[case]
    if path == "odd":
        path = _odd_checkpoint(tmp_path / "odd")
    table = sp.analyze_checkpoint(path, frame=False, compute_thread=False, **kw)
    table.attrs["notes"] = [*table.attrs["notes"], "a note, with \"quotes\""]
    df = table.to_pandas()
    if path != TINY:
        assert set(table.column("status")) >= {"success", "skipped", "non-finite", "failed"}
        assert df["kkT_rows"].isna().any() and df["N"].notna().all()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    assert write_spectrum_table(table, ours) == write_table(df, theirs, "spectrum")
    assert (ours / "spectrum.csv").read_bytes() == (theirs / "spectrum.csv").read_bytes()
    back, pandas_back = pd.read_parquet(ours / "spectrum.parquet"), pd.read_parquet(theirs / "spectrum.parquet")
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    pd.testing.assert_frame_equal(back, pandas_back, check_exact=True)
    assert back.attrs == df.attrs == pandas_back.attrs
    import pyarrow.parquet as pq  # the same values and nulls as pandas' file, column by column

    ours_t, theirs_t = pq.read_table(ours / "spectrum.parquet"), pq.read_table(theirs / "spectrum.parquet")
    assert ours_t.column_names == theirs_t.column_names and ours_t.num_rows == theirs_t.num_rows
    for c in ours_t.column_names:
        assert ours_t[c].to_pylist() == theirs_t[c].to_pylist(), c


def test_table_with_an_unexpected_column_goes_through_pandas(tmp_path):
    from reports.spectrum_table import write_spectrum_table
    from reports.tables import write_table

    table = sp.analyze_checkpoint(TINY, frame=False, compute_thread=False)
    for r in table.rows:
        r["Q"] = int(r["N"]) // int(r["M"])  # whole numbers in a float column: pandas makes it int64
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    write_spectrum_table(table, ours)
    write_table(table.to_pandas(), theirs, "spectrum")
    for name in ("spectrum.csv", "spectrum.parquet"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert str(table.to_pandas()["Q"].dtype) == "int64"  # the case the fallback is for


def test_summary_and_counts_without_pandas_are_pandas(tmp_path):
    table = sp.analyze_checkpoint(_odd_checkpoint(tmp_path / "odd"), frame=False, compute_thread=False,
                                  split_fused=True)
    df = table.to_pandas()
    assert sp.summarize(table) == sp.summarize(df)
    counts = sp.table_counts(table)
    assert counts == sp.table_counts(df)
    # the status order is pandas' value_counts (most frequent first, ties in order of appearance)
    assert [k for k in counts if k.startswith("status_")] == [f"status_{k}" for k in df["status"].value_counts().index]
    assert len(sp.ww_rows(table)) == len(sp.ww_rows(df))
    tie = sp.SpectrumTable([dict(r, status=s) for r, s in zip(table.rows[:6], "bbaacc")], False)
    assert list(sp.table_counts(tie))[4:] == list(sp.table_counts(tie.to_pandas()))[4:] == \
        ["status_b", "status_a", "status_c"]


def test_summary_of_bundled_model_by_hand():
    table = sp.analyze_checkpoint(TINY, frame=False, compute_thread=False)
    alphas = [r["alpha"] for r in table.rows if np.isfinite(r["alpha"])]
    assert sp.summarize(table)["alpha"] == pytest.approx(sum(alphas) / len(alphas), rel=1e-14)


# ------------------------------------------------------------------ terminal tables: the width check

def test_plain_width_is_richs_measurement():
    """``display._plain_width`` (the cheap width check of every terminal table) against rich's own measure
    of the same table, framed and frameless, on random texts with wide characters and empty cells."""
    import random

    from actsparse_cli import display as d

    rng = random.Random(0)
    alphabet = "abcXYZ019 .-_/()%+é漢字😀"

    def text(k: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, k)))

    checked = 0
    for _ in range(150):
        ncols, nrows = rng.randint(1, 7), rng.randint(0, 5)
        cols = [d.Col(text(10) or "h", lambda r, i=i: r[i], left=rng.random() < 0.5) for i in range(ncols)]
        rows = [{i: text(16) for i in range(ncols)} for _ in range(nrows)]
        for frameless in (False, True):
            assert d._plain_width(cols, rows, frameless) == d._natural_width(d._table(cols, rows, None, frameless))
            checked += 1
    assert checked == 300
    # texts rich could render differently from their characters are left to rich
    assert d._plain_width([d.Col("[b]x[/b]", lambda r: "1")], [{}], True) is None
    assert d._plain_width([d.Col("a", lambda r: "x:smile:")], [{}], True) is None


def test_pandas_version_without_importing_pandas():
    from importlib import metadata

    from reports.spectrum_table import _pandas_version

    assert _pandas_version() == metadata.version("pandas")
