"""The CPU thread policy (issue 16): cores minus the load average, at least one; the user's setting wins."""

from __future__ import annotations

import pytest

from probes.threads import ENV, choose_cpu_threads


@pytest.mark.parametrize("cpus, load, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 6.7, 1),
                                                  (16, 3.2, 13), (16, 40.0, 1), (1, 0.0, 1)])
def test_cores_minus_load(cpus, load, expected):
    c = choose_cpu_threads(cpus=cpus, load=load, env={})
    assert c["threads"] == expected and c["cpus_available"] == cpus


def test_user_settings_win():
    assert choose_cpu_threads(cpus=8, load=7.9, env={ENV: "6"})["threads"] == 6
    omp = choose_cpu_threads(cpus=8, load=7.9, env={"OMP_NUM_THREADS": "4"})
    assert omp["threads"] is None and "OMP_NUM_THREADS=4" in omp["rule"]
    assert choose_cpu_threads(cpus=8, load=0.0, env={ENV: "x"})["threads"] == 8  # unreadable: the rule


def test_manifest_records_the_choice(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from actsparse_cli.main import app

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(ENV, "1")
    r = CliRunner().invoke(app, ["measure", "--max-tokens", "128", "--device", "cpu", "-q", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["model"]["source"]["cpu_threads"]["threads_in_use"] == 1
