"""``probes.loading.offer_loaded``: a model loaded once is handed to the next load with the same
arguments (``actsparse analyze`` plans on it, then its measure step takes it), and to nothing else."""

from __future__ import annotations

import pytest

from probes import loading
from probes.embedded import default_checkpoint


@pytest.fixture(scope="module")
def bundled():
    return loading.load_checkpoint(default_checkpoint(), device="cpu")


@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = loading._load_any

    def counting(checkpoint, **kw):
        calls.append(checkpoint)
        return real(checkpoint, **kw)

    monkeypatch.setattr(loading, "_load_any", counting)
    return calls


def test_the_same_arguments_get_the_offered_model_once(bundled, loads):
    with loading.offer_loaded(bundled, checkpoint=default_checkpoint(), device="cpu"):
        # "auto" resolves to the CPU here, and the auto dtype on the CPU is float32: the same load
        assert loading.load_checkpoint(default_checkpoint(), device="auto", dtype="auto") is bundled
        assert loads == []
        again = loading.load_checkpoint(default_checkpoint(), device="cpu")  # the offer was taken
    assert again is not bundled and loads == [default_checkpoint()]


@pytest.mark.parametrize("change", [dict(dtype="float16"), dict(arch="gpt2"), dict(tokenizer="gpt2"),
                                    dict(trust_remote_code=True), dict(checkpoint="elsewhere")])
def test_other_arguments_load_as_usual_and_withdraw_the_offer(bundled, change, monkeypatch):
    seen = []
    monkeypatch.setattr(loading, "_load_any", lambda checkpoint, **kw: seen.append((checkpoint, kw)) or "fresh")
    monkeypatch.setattr(loading, "check_vocab", lambda lm, tok: None)
    args = {"checkpoint": default_checkpoint(), "device": "cpu", **change}
    with loading.offer_loaded(bundled, checkpoint=default_checkpoint(), device="cpu"):
        assert loading.load_checkpoint(**args) == "fresh"
        assert loading._OFFERED == []  # withdrawn by the first call, matching or not
        assert loading.load_checkpoint(default_checkpoint(), device="cpu") == "fresh"
    assert len(seen) == 2


def test_the_offer_ends_with_its_block_and_lets_the_model_go(bundled, loads):
    import gc
    import weakref

    lm = loading.load_checkpoint(default_checkpoint(), device="cpu")
    ref = weakref.ref(lm.model)
    offer = loading.offer_loaded(lm, checkpoint=default_checkpoint(), device="cpu")
    del lm
    with offer:
        pass  # no load inside: nothing takes it
    assert loading._OFFERED == []
    gc.collect()
    assert ref() is None  # the spent offer object does not keep the model alive
    assert loading.load_checkpoint(default_checkpoint(), device="cpu") is not None and len(loads) == 2
