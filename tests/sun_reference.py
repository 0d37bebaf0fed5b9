"""Test reference for Sun et al. (massive activations, exp3): their ``lib/hook.py``
``Intervened_Layer.update`` written from the reference, shared by the LM and classifier intervention tests.
Importable from any test file (``tests/`` is on ``sys.path``: the folder of the root conftest)."""

from __future__ import annotations

import torch


def intervened_layer_update(channels, reset, consts):
    """A forward hook: with ``reset`` (``"set_zero"`` or ``"set_mean"``), the given channels at position 0 and at
    the row's top-|h| position (when that is not 0) become 0, or ``consts["first"]`` / ``consts["peak"]``."""

    def update(_, inp, out):
        feat = out[0] if isinstance(out, tuple) else out
        if reset is not None:
            alpha = 0.0 if reset == "set_zero" else 1.0
            top = torch.sort(feat.abs().flatten(), descending=True).indices[0]
            token_dim = top.item() // feat.shape[2]
            if token_dim != 0:
                for j, c in enumerate(channels):
                    feat[:, token_dim, c] = consts["peak"][j] * alpha
            for j, c in enumerate(channels):
                feat[:, 0, c] = consts["first"][j] * alpha
        return out

    return update
