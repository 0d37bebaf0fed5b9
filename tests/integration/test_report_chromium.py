"""A report bundle's index.html in a real browser: headless Chromium loads it offline and every
figure (<img>) decodes; no script runs, not even one smuggled in through a checkpoint name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from reports.bundle_report import build_report
from reports.manifest import build_manifest, write_manifest
from reports.tables import write_table

CHROMIUM = next((p for p in (os.environ.get("ACTSPARSE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
HOSTILE = "<script>alert(1)</script>"

pytestmark = [pytest.mark.chromium,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                 "(apt-get install chromium, or set ACTSPARSE_CHROMIUM)")]

# Replaces the page's "no script" policy in a test copy only, so that this probe can read naturalWidth.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = 'IMAGES ' + imgs.length + ' LOADED ' + ok.length + ' SCRIPTS ' + document.scripts.length;
  document.body.appendChild(out);
});
</script>"""


def _outputs(root: Path) -> list[Path]:
    """Three small actsparse outputs (measure, massive, spectrum) written through the report helpers."""
    ck = f"/models/{HOSTILE}"
    m = root / "measure-out"
    m.mkdir(parents=True)
    sp = pd.DataFrame([{"canonical_name": f"blocks.{i}.mlp.hook_post", "module_path": f"h.{i}.mlp.c_proj",
                        "kind": "mlp_post", "layer": i, "width": 64, "n_tokens": 512, "zero_frac": z,
                        "near_zero_frac@1e-06": z, "near_zero_frac@0.001": z + 0.01, "near_zero_frac@0.01": z + 0.03,
                        "nonzero_pct_per_token": 100 * (1 - z), "nonzero_pct_per_token_p05_hist": 80 * (1 - z),
                        "nonzero_pct_per_token_p95_hist": min(100.0, 120 * (1 - z)), "dead_frac": 0.01 * i,
                        "always_on_frac": 0.0} for i, z in enumerate((0.5, 0.7, 0.8, 0.85))])
    write_table(sp, m, "sparsity")
    write_manifest(m, build_manifest("measure", {"checkpoint": ck}, measurement={
        "corpus": f"/data/{HOSTILE}.txt", "n_counted_tokens": 512, "n_windows": 4, "max_length": 128}))
    ma = root / "massive-out"
    ma.mkdir()
    layers = pd.DataFrame([{"canonical_name": f"blocks.{i}.hook_resid_post", "kind": "resid_post", "layer": i,
                            "layer_1based": i + 1, "top1_mean": 10.0 * 3 ** i, "top2_mean": 8.0 * 2 ** i,
                            "top3_mean": 6.0 * 2 ** i, "median_mean": 0.5, "ratio_top1_median": 20.0 * 3 ** i,
                            "peak_token": HOSTILE} for i in range(4)])
    write_table(layers, ma, "massive_layers")
    write_manifest(ma, build_manifest("massive", {"checkpoint": ck}, massive={
        "corpus": "c.txt", "n_counted_tokens": 400, "n_sequences": 4, "preset": "sun2024", "bos": False}))
    s = root / "spectrum-out"
    s.mkdir()
    spec = pd.DataFrame([{"name": f"h.{i}.mlp.c_fc.weight", "part": None, "layer_type": "dense", "alpha": 2 + i / 3,
                          "sigma_mp": 0.8, "ww_skipped": False, "non_ww": False} for i in range(6)])
    write_table(spec, s, "spectrum")
    write_manifest(s, build_manifest("spectrum", {"checkpoint": ck}))
    return [m, ma, s]


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
               f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_index_html_renders_offline_with_every_figure(tmp_path):
    bundle = build_report(_outputs(tmp_path / "in"), tmp_path / "report")
    page = (bundle / "index.html").read_text()
    n_img = page.count("<img ")
    assert n_img >= 5 and "<script" not in page and HOSTILE not in page
    # a copy with the probe script: every <img> must have decoded (naturalWidth > 0)
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probe = probe.replace("</body>", PROBE + "</body>", 1)
    probe_file = bundle / "probe.html"
    probe_file.write_text(probe)
    r = _chromium("--virtual-time-budget=10000", "--dump-dom", probe_file.as_uri())
    m = re.search(r"IMAGES (\d+) LOADED (\d+) SCRIPTS (\d+)", r.stdout)
    assert m, f"no probe result in Chromium's DOM dump (rc {r.returncode}): {r.stderr[-2000:]}"
    images, loaded, scripts = map(int, m.groups())
    assert images == n_img and loaded == images
    assert scripts == 1  # only the probe: the hostile checkpoint name stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.stdout
    # the page itself (no script allowed) renders to a non-trivial screenshot
    shot = tmp_path / "shot.png"
    r = _chromium("--window-size=1200,3000", f"--screenshot={shot}", (bundle / "index.html").as_uri())
    assert shot.is_file() and shot.stat().st_size > 20_000, r.stderr[-2000:]
