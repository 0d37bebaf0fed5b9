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

    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)  # /proc/stat's CPUs: the affinity mask's
    start = (100.0, 1000, 5000, 3.0)  # (seconds, busy jiffies, total jiffies, own CPU seconds)
    # 1 s later: 2 cores x 100 ticks; 150 ticks busy = 1.5 cores, of which 0.5 core was this process
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (101.0, 1150, 5200, 3.5))
    seen = threads.busy_elsewhere(start)
    assert seen == {"cores": 1.0, "window_s": 1.0}
    monkeypatch.setattr(threads, "_MARK", start)
    assert threads.busy_elsewhere() == seen  # since the command started (this module's import)
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (100.05, 1010, 5010, 3.0))  # 50 ms: too short to say
    assert threads.busy_elsewhere(start) is None
    monkeypatch.setattr(threads, "_MARK", None)  # no /proc/stat
    assert threads.busy_elsewhere() is None


def test_independent_calls_take_every_cpu_whatever_the_load(monkeypatch):
    """The spectrum's LAPACK calls (independent, single-threaded) run on as many threads as this process has
    CPUs, however busy the machine is (a busy core time-slices them); ACTSPARSE_CPU_THREADS wins,
    OMP_NUM_THREADS (BLAS threads per call) is not read, an unreadable setting falls back to the CPUs."""
    from probes import threads

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(threads, "_cpu_sample", lambda: (101.0, 1200, 1200, 0.0))  # every core busy elsewhere
    assert threads.independent_threads(cpus=2) == {"threads": 2, "rule": threads.independent_threads(2)["rule"]}
    assert "affinity" in threads.independent_threads(2)["rule"]
    assert threads.independent_threads(cpus=8)["threads"] == 8
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)
    assert threads.independent_threads()["threads"] == 3
    monkeypatch.setenv(ENV, "5")
    assert threads.independent_threads(cpus=2) == {"threads": 5, "rule": f"{ENV}=5"}
    monkeypatch.setenv(ENV, "x")
    assert threads.independent_threads(cpus=2)["threads"] == 2


def test_the_real_sample_reads_this_machine():
    from probes import threads

    s = threads._cpu_sample()
    if s is None:
        pytest.skip("no /proc/stat here")
    assert s[2] >= s[1] >= 0 and s[3] >= 0


def test_the_forward_thread_count_follows_the_free_cores_between_passes(monkeypatch):
    """apply_cpu_threads takes its first count from the load average (here 1.3: one thread); between forward
    passes follow_cpu_threads re-reads /proc/stat over the last second or more: both cores free -> 2, another
    process on one -> 1, a window under a second -> no reading. The manifest's history lists the changes, and
    a user's ACTSPARSE_CPU_THREADS or a command's end stops it."""
    import torch

    from probes import threads

    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.3, 1.0, 0.5))
    samples = iter([(100.0, 1000, 5000, 3.0),  # apply_cpu_threads
                    (100.5, 1050, 5100, 3.5),  # 0.5 s later: too short, not read
                    (101.2, 1120, 5240, 4.2),  # 1.2 s: 120 busy of 240 ticks = 1 core, all of it this process
                    (102.4, 1360, 5480, 5.4),  # 1.2 s: 2 cores busy, 1 of them this process
                    (103.6, 1600, 5720, 6.6)])  # the same again: no change
    monkeypatch.setattr(threads, "_cpu_sample", lambda: next(samples))
    try:
        choice = threads.apply_cpu_threads()
        assert choice["threads_in_use"] == 1 and "re-read" in choice["rule"]
        counts = []
        for _ in range(4):
            threads.follow_cpu_threads()
            counts.append(torch.get_num_threads())
        assert counts == [1, 2, 1, 1]
        assert [n for _, n in choice["history"]] == [1, 2, 1] and choice["threads_in_use"] == 1
        threads.stop_following()
        threads.follow_cpu_threads()  # nothing is read after the command
        monkeypatch.setenv(threads.ENV, "1")
        choice = threads.apply_cpu_threads()
        assert "re-read" not in choice["rule"] and threads._FOLLOW == {}
    finally:
        threads.stop_following()
        torch.set_num_threads(before)


def test_a_command_stops_following_when_it_ends(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from actsparse_cli.main import app
    from probes import threads

    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    real = threads.follow_cpu_threads

    def spy():
        seen.append(bool(threads._FOLLOW))
        real()

    monkeypatch.setattr(threads, "follow_cpu_threads", spy)
    r = CliRunner().invoke(app, ["measure", "--max-tokens", "128", "--device", "cpu", "-q", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert seen and all(seen) and threads._FOLLOW == {}


def _cgroup(tmp_path, proc: str, files: dict[str, str]):
    (tmp_path / "proc").write_text(proc)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "fs"), str(tmp_path / "proc")


@pytest.mark.parametrize("proc, files, want", [
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),  # v2, a container showing its cgroup as the root
    ("0::/user.slice/job\n", {"user.slice/job/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, 1.5),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no quota
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                                       "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, none
    ("1:cpu:/\n", {}, None),  # no files
])
def test_the_cgroup_cpu_quota(tmp_path, proc, files, want):
    from probes import threads

    root, proc_file = _cgroup(tmp_path, proc, files)
    assert threads.cgroup_cpu_quota(root, proc_file) == want


def test_a_quota_caps_the_cpus_and_their_threads(monkeypatch):
    """A container given 1.5 CPUs on a 16-CPU host: 2 CPUs for every rule (torch's threads, the spectrum's
    LAPACK calls, --workers); no quota: the affinity mask."""
    from actsparse_cli.spectrum_cmd import _cap_workers
    from probes import spectrum, threads

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 16)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)
    assert threads.available_cpus() == 2 and spectrum._cpus() == 2
    assert threads.independent_threads()["threads"] == 2
    assert choose_cpu_threads(load=0.0, env={})["threads"] == 2
    assert _cap_workers(8) == (2, "--workers 8 capped at 2, the CPUs available to this process")
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 0.2)
    assert threads.available_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.available_cpus() == 16
