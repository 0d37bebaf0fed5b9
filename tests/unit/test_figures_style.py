"""reports.figures: one style, one saver (PNG at one dpi + SVG), used by every figure."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest

from reports.figures import DPI, OKABE_ITO, PANEL, new_figure, panel_size, pyplot, save, save_into

ROOT = Path(__file__).resolve().parents[2]


def _png_size_and_dpi(path: Path) -> tuple[int, int, float]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    i = data.index(b"pHYs")  # pixels per metre, written by matplotlib from the dpi
    ppm = struct.unpack(">I", data[i + 4:i + 8])[0]
    return w, h, ppm * 0.0254


def test_pyplot_and_new_figure_apply_the_style():
    import matplotlib
    from matplotlib.colors import to_hex

    matplotlib.rcParams["axes.prop_cycle"] = matplotlib.rcParamsDefault["axes.prop_cycle"]
    matplotlib.rcParams["axes.titlesize"] = "large"
    plt = pyplot()
    fig, ax = plt.subplots()
    assert tuple(fig.get_size_inches()) == PANEL
    (line,) = ax.plot([0, 1], [0, 1])
    assert to_hex(line.get_color()) == OKABE_ITO[0].lower()
    assert to_hex(matplotlib.colors.to_rgba("C3")) == "#d55e00"  # "C3" is the palette's vermillion
    assert ax.set_title("t").get_fontsize() == 10
    plt.close(fig)
    matplotlib.rcParams["axes.prop_cycle"] = matplotlib.rcParamsDefault["axes.prop_cycle"]
    fig = new_figure(figsize=(2, 1))
    ax = fig.subplots()
    (line,) = ax.plot([0, 1], [0, 1])
    assert to_hex(line.get_color()) == OKABE_ITO[0].lower()
    assert len(set(OKABE_ITO)) == 8


def test_panel_size():
    assert panel_size() == PANEL
    assert panel_size(3) == (3 * PANEL[0], PANEL[1])
    assert panel_size(2, 2, extra_width=1.5) == (2 * PANEL[0] + 1.5, 2 * PANEL[1])


@pytest.mark.parametrize("make", ["pyplot", "new_figure"])
def test_save_writes_png_at_one_dpi_and_svg_and_closes(tmp_path, make):
    plt = pyplot()
    fig = plt.figure(figsize=(4, 3)) if make == "pyplot" else new_figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0])
    n_open = len(plt.get_fignums())
    assert save(fig, tmp_path, "pic") == ["pic.png", "pic.svg"]
    w, h, dpi = _png_size_and_dpi(tmp_path / "pic.png")
    assert dpi == pytest.approx(DPI, abs=0.5)
    assert 0.6 * 4 * DPI < w <= 4 * DPI + 20 and 0.6 * 3 * DPI < h <= 3 * DPI + 20  # tight box, not cropped away
    svg = (tmp_path / "pic.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<dc:date>" not in svg  # no date: the same figure, the same file
    assert len(plt.get_fignums()) == n_open - (make == "pyplot")
    assert save_into(new_figure(), tmp_path / "a" / "b", "x") == ["x.png", "x.svg"]
    assert (tmp_path / "a" / "b" / "x.svg").exists()


def _calls(tree: ast.AST, names: set[str]) -> list[int]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in names:
                out.append(node.lineno)
    return out


def test_every_figure_goes_through_reports_figures():
    """savefig, pyplot and matplotlib.figure.Figure are used only in reports/figures.py: every other module
    draws on ``pyplot()`` / ``new_figure()`` (the style) and writes with ``save`` / ``save_into``."""
    found = []
    for pkg in ("reports", "actsparse_cli", "probes"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "reports/figures.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found += [f"{rel}:{n} savefig" for n in _calls(tree, {"savefig"})]
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{rel}:{node.lineno} imports {m}" for m in mods
                          if m in ("matplotlib.pyplot", "matplotlib.figure", "pylab")]
    assert not found, "figures made or written outside reports.figures: " + ", ".join(found)
