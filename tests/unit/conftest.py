import pytest


@pytest.fixture
def spy(monkeypatch):
    """Every eta a gradient probe sees, per probe (keyed by object) and per call (one call per batch),
    valid positions only."""
    from probes.gradients import GradientSparsityProbe

    seen: dict[int, list] = {}
    orig = GradientSparsityProbe.update_backward

    def update_backward(self, eta, mask=None):
        v = eta[mask] if mask is not None else eta.reshape(-1, eta.shape[-1])
        seen.setdefault(id(self), []).append(v.detach().clone())
        return orig(self, eta, mask)

    monkeypatch.setattr(GradientSparsityProbe, "update_backward", update_backward)
    return seen
