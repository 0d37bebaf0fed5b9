"""``probes.malloc_policy.keep_freed_memory``: freed buffers stay in the heap (no page faults to get them back),
set only by the command, and a user's own malloc settings win."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from probes import malloc_policy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

_CYCLES = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from probes.malloc_policy import keep_freed_memory
    done = keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):  # three 8 MiB buffers, freed together: 24 MiB free at the top of the heap
        xs = [np.ones(1 << 20) for _ in range(3)]
        del xs
    f0 = faults()
    for _ in range(20):
        xs = [np.ones(1 << 20) for _ in range(3)]
        del xs
    print(json.dumps({"faults_per_cycle": (faults() - f0) / 20, "done": done}))
""")


def _cycles(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in malloc_policy._USER_SETTINGS}
    r = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, timeout=120,
                       env={**clean, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _cycles("default"), _cycles("keep")
    if kept["done"].get("why", "").startswith("not glibc"):
        pytest.skip(kept["done"]["why"])
    assert kept["done"]["set"] is True and kept["done"]["allocator"].startswith("glibc")
    assert default["faults_per_cycle"] > 500  # 24 MiB returned to the system and faulted in again, each cycle
    assert kept["faults_per_cycle"] < 50


def test_a_users_own_setting_wins():
    out = _cycles("keep", MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    assert out["done"] == {"set": False, "why": "left to the user's MALLOC_TRIM_THRESHOLD_"}


def test_the_spectrum_manifest_records_it(tmp_path):
    from probes.embedded import default_checkpoint

    out = tmp_path / "spec"
    r = subprocess.run([sys.executable, "-m", "actsparse_cli", "spectrum", str(default_checkpoint()), "-o", str(out),
                        "-q"], capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items()
                               if k not in (*malloc_policy._USER_SETTINGS, "NUMPY_MADVISE_HUGEPAGE")},
                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    policy = json.loads((out / "manifest.json").read_text())["memory_policy"]
    assert policy["set"] is True and policy["mmap_threshold"] == malloc_policy.MMAP_THRESHOLD
    assert policy["numpy_hugepage"] is False


def test_a_cpu_forward_command_sets_and_records_it(tmp_path):
    """``measure`` (any command that loads a model through ``loading_opts.load``) on the CPU: the policy is set once
    the model is loaded, and the manifest's model source says so (a user's own setting wins: tested above)."""
    clean = {k: v for k, v in os.environ.items() if k not in malloc_policy._USER_SETTINGS}
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "actsparse_cli", "measure", "--max-tokens", "300", "--device", "cpu",
                        "-o", str(out), "-q"], capture_output=True, text=True, timeout=300,
                       env={**clean, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    policy = json.loads((out / "manifest.json").read_text())["model"]["source"]["memory_policy"]
    assert policy["set"] is True and policy["mmap_threshold"] == malloc_policy.MMAP_THRESHOLD
    assert policy["trim_threshold"] == malloc_policy.TRIM_THRESHOLD


_HUGE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from probes.malloc_policy import small_numpy_pages
    done = small_numpy_pages() if sys.argv[1] == "small" else None
    def anon_huge_kb():
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
    before = anon_huge_kb()
    x = np.ones(64 << 17)  # 64 MiB, touched
    print(json.dumps({"huge_kb": anon_huge_kb() - before, "done": done}))
""")


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() != "madvise" or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="huge pages only on request (THP 'madvise') and smaps_rollup needed")
def test_spectrum_asks_numpy_for_small_pages_and_the_user_setting_wins():
    """numpy madvises its large buffers for huge pages (a 64 MiB array gets some); after ``small_numpy_pages``
    it gets none. A user's own NUMPY_MADVISE_HUGEPAGE is left as it is (and said so)."""
    clean = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}

    def run(mode, **env):
        r = subprocess.run([sys.executable, "-c", _HUGE, mode], capture_output=True, text=True, timeout=120,
                           env={**clean, **env})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert run("default")["huge_kb"] > 0
    small = run("small")
    assert small["huge_kb"] == 0 and small["done"] == {"numpy_hugepage": False}
    user = run("small", NUMPY_MADVISE_HUGEPAGE="1")
    assert user["huge_kb"] > 0 and "NUMPY_MADVISE_HUGEPAGE=1" in user["done"]["numpy_hugepage"]
