"""``probes.loading.check_finite``'s one-reduction test (``_all_finite``: finite min and max) against the
definition, ``torch.isfinite(p).all()``, on hand-made and random tensors of every float dtype."""

from __future__ import annotations

import pytest
import torch

from probes.errors import ModelError
from probes.loading import _all_finite, check_finite

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_isfinite_all(dtype):
    hand = {(1.0, 2.0): True, (1.0, NAN, 2.0): False, (NAN,): False, (INF,): False, (-INF, 0.0): False,
            (0.0, -0.0): True, (NAN, INF, -INF): False, (-1e4, 1e4): True}
    for vals, want in hand.items():
        t = torch.tensor(vals, dtype=dtype)
        assert _all_finite(t) is want is bool(torch.isfinite(t).all()), (dtype, vals)
    assert _all_finite(torch.tensor(3.0, dtype=dtype))  # 0-d
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        t = torch.randn(37, 53, generator=g).to(dtype)
        if i % 4:  # a bad value at a random place, sometimes in a strided view only
            r, c = torch.randint(0, 37, (1,), generator=g).item(), torch.randint(0, 53, (1,), generator=g).item()
            t[r, c] = (NAN, INF, -INF)[i % 3]
        view = t[:, ::2] if i % 2 else t.t()
        assert _all_finite(view) == bool(torch.isfinite(view).all()), i


def test_check_finite_names_the_first_bad_weight():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_finite(model)
    with torch.no_grad():
        model[1].weight[1, 3] = NAN
        model[1].bias[0] = INF
    with pytest.raises(ModelError, match=r"^weight 1\.weight contains NaN or Inf values"):
        check_finite(model)
    with torch.no_grad():
        model[1].weight[1, 3] = 0.0
    with pytest.raises(ModelError, match=r"^weight 1\.bias "):
        check_finite(model)
