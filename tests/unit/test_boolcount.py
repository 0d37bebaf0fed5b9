"""probes.boolcount gives a bool tensor's ``.sum`` per row and along the last dimension, as int64."""

import pytest
import torch

from probes.boolcount import count_last, count_rows


@pytest.mark.parametrize("shape", [(0, 3, 4), (1, 1, 1), (1, 40, 33), (5, 7, 3), (3, 300), (2, 3, 4, 5), (4, 0, 6)])
def test_counts_equal_bool_sums(shape):
    g = torch.Generator().manual_seed(sum(shape))
    b = torch.rand(shape, generator=g) < 0.3
    rows = count_rows(b)
    assert rows.dtype == torch.int64 and torch.equal(rows, b.sum(tuple(range(1, b.dim()))))
    last = count_last(b)
    assert last.dtype == torch.int64 and torch.equal(last, b.sum(-1))
    nc = b.transpose(-1, -2)  # not contiguous
    assert torch.equal(count_last(nc), nc.sum(-1)) and torch.equal(count_rows(nc), nc.sum(tuple(range(1, nc.dim()))))
