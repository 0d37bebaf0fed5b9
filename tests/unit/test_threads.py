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


def test_busy_elsewhere_is_the_cores_others_used_in_the_window(monkeypatch):
    from probes import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    start = (100.0, 1000, 5000, 3.0)  # (seconds, busy jiffies, total jiffies, own CPU seconds)
    # 1 s later: 2 cores x 100 ticks; 150 ticks busy = 1.5 cores, of which 0.5 core was this process
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (101.0, 1150, 5200, 3.5))
    seen = threads.busy_elsewhere(start)
    assert seen == {"cores": 1.0, "window_s": 1.0}
    monkeypatch.setattr(threads, "_MARK", start)
    monkeypatch.delenv(threads.ENV, raising=False)
    c = threads.free_cpus()  # another process held one core just now, whatever the load average says
    assert c["threads"] == 1 and c["busy_elsewhere"] == seen and "/proc/stat" in c["rule"]
    # a quiet window after a busy minute (a lagging load average of 1.7): both cores are free
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (101.0, 1090, 5200, 3.9))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    c = threads.free_cpus()
    assert c["threads"] == 2 and c["busy_elsewhere"]["cores"] == 0.0


def test_a_short_window_or_no_proc_stat_falls_back_to_the_load_average(monkeypatch):
    from probes import threads

    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "_MARK", (100.0, 1000, 5000, 3.0))
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (100.05, 1010, 5010, 3.0))  # 50 ms: too short to say
    assert threads.busy_elsewhere() is None
    c = threads.free_cpus(cpus=2, load=1.2)
    assert c["threads"] == 1 and "load average" in c["rule"]
    monkeypatch.setattr(threads, "_MARK", None)  # no /proc/stat
    c = threads.free_cpus()
    assert c["busy_elsewhere"] == {"cores": None, "window_s": None} and "load average" in c["rule"]


def test_the_real_sample_reads_this_machine():
    from probes import threads

    s = threads._cpu_sample()
    if s is None:
        pytest.skip("no /proc/stat here")
    assert s[2] >= s[1] >= 0 and s[3] >= 0
