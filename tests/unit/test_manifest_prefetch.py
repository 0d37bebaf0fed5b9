"""The manifest's git hash and package versions (reports/manifest.py): computed early in a background
thread (``prefetch``, started by ``actsparse_cli.main.run`` for a command with an output folder) and read
from the header block of METADATA only; the recorded values must be exactly what they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from actsparse_cli.main import prefetches, writes_output
from reports import manifest as mf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_leftover_prefetch():
    mf._EARLY.clear()
    yield
    mf._EARLY.clear()


# ---------------------------------------------------------------- versions
def test_versions_equal_importlib_metadata_for_every_installed_distribution():
    names = sorted({d.metadata.get("Name") for d in metadata.distributions()} - {None, ""})
    assert len(names) > 10
    assert {n: mf._version(n) for n in names} == {n: metadata.version(n) for n in names}


def _dist(site: Path, name: str, text: str, folder: str = "dist-info", file: str = "METADATA") -> None:
    d = site / f"{name}-1.0.{folder}"
    d.mkdir(parents=True)
    (d / file).write_bytes(text.encode())


@pytest.mark.parametrize("text", [
    "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2.3\n\nVersion: 9.9.9 (the long description)\n",
    "Metadata-Version: 2.1\r\nName: fakepkg\r\nVersion: 4.5\r\n\r\nVersion: 9.9.9\r\n",  # CRLF: parsed whole
    "Metadata-Version: 2.1\nName: fakepkg\nSummary: a\n  folded summary\nVersion:   7.0rc1  \n\nbody\n\n\nmore\n",
    "Metadata-Version: 2.1\nName: fakepkg\n\nVersion: 9.9.9\n",  # no Version header: metadata.version's answer
    "Name: fakepkg\nVersion: 2.0\n",  # no body at all
])
def test_version_from_the_header_block_is_metadata_version(tmp_path, monkeypatch, text):
    _dist(tmp_path, "fakepkg", text)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mf._version("fakepkg") == metadata.version("fakepkg")
    assert mf.package_versions(("fakepkg",))["fakepkg"] == metadata.version("fakepkg")


@pytest.mark.parametrize("head", ["Version:   7.0rc1  \n", "Version:7\n", "version: 1.0\n", "Version: 1\r\nName: x\r\n",
                                  "Version:\t2.0\n", "Version: 3\n  cont\n", "Version : 4\n", "Name: x\nVersion: 5",
                                  "Name: x\n  folded\nVersion: 6\n", "Name: x\n", "odd line\nVersion: 7\n",
                                  "Version: 8\rName: y\r", "VERSION: 9\nVersion: 10\n", ""])
def test_plain_header_reading_is_the_email_parsers(head):
    import email

    got = mf._plain_header(head, "version")
    if got is not mf._ASK_EMAIL:
        assert got == email.message_from_string(head)["Version"]
    assert mf._plain_header("Version: 3\n  cont\n", "version") is mf._ASK_EMAIL


def test_version_of_an_egg_info_and_of_a_missing_package(tmp_path, monkeypatch):
    _dist(tmp_path, "eggpkg", "Metadata-Version: 1.0\nName: eggpkg\nVersion: 0.3\n\nVersion: 1\n",
          folder="egg-info", file="PKG-INFO")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mf._version("eggpkg") == metadata.version("eggpkg") == "0.3"
    assert mf.package_versions(("no-such-package-xyz",))["no-such-package-xyz"] is None


def test_versions_without_importing_importlib_metadata():
    """The manifest's packages are plain folders on sys.path here: their versions (and the absence of a missing
    one) come without importing importlib.metadata (11-23 ms of a ~1 s spectrum command)."""
    code = ("import sys\nfrom reports import manifest as mf\n"
            "v = mf.package_versions(mf._PACKAGES + ('no-such-package-xyz',))\n"
            "print(sorted(k for k, x in v.items() if x is None), 'importlib.metadata' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    missing, imported = r.stdout.strip().rsplit(" ", 1)
    assert "'no-such-package-xyz'" in missing and imported == "False"
    want = {p: None for p in mf._PACKAGES}
    for p in mf._PACKAGES:
        try:
            want[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    assert mf.package_versions() == {"python": mf.platform.python_version(), **want}


def test_version_lookup_follows_sys_path_order_and_falls_back_for_zips(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    _dist(first, "Dup_Pkg", "Metadata-Version: 2.1\nName: dup-pkg\nVersion: 1.0\n")
    _dist(second, "dup.pkg", "Metadata-Version: 2.1\nName: dup-pkg\nVersion: 2.0\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    assert mf._version("DUP-pkg") == metadata.version("DUP-pkg") == "1.0"
    zipped = tmp_path / "lib.zip"
    zipped.write_bytes(b"")  # a sys.path entry that is a file: "missing" is importlib.metadata's to say
    monkeypatch.syspath_prepend(str(zipped))
    assert mf._dist_folder("surely-not-installed-xyz") is None
    assert mf.package_versions(("surely-not-installed-xyz",))["surely-not-installed-xyz"] is None


# ---------------------------------------------------------------- git hash, early or not
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "reports").mkdir(parents=True)
    _git(r, "init", "-q")
    (r / "reports" / "a.py").write_text("x = 1\n")
    _git(r, "add", "reports/a.py")
    _git(r, "commit", "-q", "-m", "one")
    return r


def _early_manifest() -> dict:
    mf.prefetch()
    return mf.build_manifest("x", {})


def test_git_hash_clean_dirty_untracked_and_not_a_checkout(repo, tmp_path, monkeypatch):
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setattr(mf, "_SOURCE", repo / "reports")
    assert mf.git_hash() == head and len(head) == 40
    assert _early_manifest()["git_hash"] == head
    (repo / "reports" / "new.py").write_text("untracked\n")  # untracked files do not make it dirty
    assert mf.git_hash() == head == _early_manifest()["git_hash"]
    (repo / "reports" / "a.py").write_text("x = 2\n")
    assert mf.git_hash() == head + "-dirty" == _early_manifest()["git_hash"]
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setattr(mf, "_SOURCE", plain)
    assert mf.git_hash() is None and _early_manifest()["git_hash"] is None
    monkeypatch.setattr(mf, "_SOURCE", repo / "reports")
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # git not installed
    assert mf.git_hash() is None and _early_manifest()["git_hash"] is None


def test_a_prefetch_is_taken_once(repo, monkeypatch):
    head = _git(repo, "rev-parse", "HEAD")
    monkeypatch.setattr(mf, "_SOURCE", repo / "reports")
    mf.prefetch()
    mf._EARLY["thread"].join()
    (repo / "reports" / "a.py").write_text("x = 3\n")  # after the prefetch
    first = mf.build_manifest("x", {})
    assert first["git_hash"] == head  # what the prefetch found at the start
    assert first["versions"] == mf.package_versions()
    assert mf.build_manifest("x", {})["git_hash"] == head + "-dirty"  # the next manifest asks git again


def test_which_command_lines_prefetch(monkeypatch):
    for args in (["spectrum", "m", "-o", "x"], ["drift", "a", "--output", "x"], ["report", "a", "--output=x"],
                 ["measure", "-qo", "x"], ["measure", "-ox"], ["analyze", "-o", "x"]):
        assert writes_output(args), args
    for args in ([], ["-o", "x"], ["spectrum", "m"], ["compare", "a", "b", "-q"], ["spectrum", "m", "-o", "x",
                 "--help"], ["spectrom", "-o", "x"], ["--version"]):
        assert not writes_output(args), args
    # no background thread where the command forks workers (a fork must not find another thread holding a lock)
    assert prefetches(["spectrum", "m", "-o", "x"]) and not prefetches(["spectrum", "m", "-o", "x", "--workers", "2"])
    assert not prefetches(["spectrum", "m", "--workers=2", "-o", "x"]) and not prefetches(["spectrum", "m"])
    monkeypatch.setenv("_ACTSPARSE_COMPLETE", "complete_bash")
    assert not writes_output(["spectrum", "m", "-o", "x"])


def test_a_command_run_with_o_prefetches_and_records_the_same_values(tmp_path):
    """The whole process: run() starts the prefetch, the manifest holds git_hash() and package_versions()."""
    out = tmp_path / "sp"
    code = ("import sys; sys.argv = ['actsparse', 'spectrum', sys.argv[1], '-o', sys.argv[2], '-q']\n"
            "from actsparse_cli.main import run\nimport reports.manifest as mf\n"
            "try:\n    run()\nfinally:\n"
            "    print('PREFETCHED', mf._EARLY.get('thread') is not None, file=sys.stderr)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "probes" / "data" / "tiny-relu-lm"), str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PREFETCHED True" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["git_hash"] == mf.git_hash()
    assert m["versions"] == mf.package_versions()
