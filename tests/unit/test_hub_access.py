"""A hub id without a reachable hub fails at once with the fix (issue 17), not after the client's retries."""

from __future__ import annotations

import socket
import time

import pytest

from probes import loading
from probes.errors import CheckpointError


def _refuse(*a, **k):
    raise socket.gaierror(-2, "Name or service not known")


def test_unreachable_hub_fails_fast_with_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: not cached
    monkeypatch.setattr(socket, "create_connection", _refuse)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        loading.load_checkpoint("some-org/some-model", device="cpu")
    assert time.perf_counter() - t0 < 20  # the client's own retries take ~25 s
    msg = str(e.value)
    assert "huggingface.co cannot be reached" in msg and "some-org/some-model" in msg
    assert "huggingface-cli download some-org/some-model" in e.value.fix


def test_hub_access_uses_cache_when_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(loading, "_cached_on_disk", lambda name: True)
    assert loading._hub_access("org/cached") == {"local_files_only": True}


def test_offline_env_skips_the_network_check(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network check offline"))
    assert loading._hub_access("org/x") == {}


def test_reachable_host_is_none(monkeypatch):
    class _Conn:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _Conn())
    assert loading.hub_unreachable() is None
