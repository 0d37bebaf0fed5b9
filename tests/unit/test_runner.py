"""The one runner (probes.runner, probes.hooks) and the shared data set-up (probes.data), on hand-built modules."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from probes import corpus as corpus_mod
from probes import distributed
from probes.data import (DEFAULT_MAX_LENGTH_CAP, CorpusOptions, DataOptions, TokenData, pad_id, resolve_max_length,
                         sequence_windows)
from probes.errors import DataError, DeviceError
from probes.hooks import HookPoint, attach_sites, hooks
from probes.runner import BatchAdapter, ImageBatches, Runner, run, run_probes


class TinyMLP(torch.nn.Module):
    """[batch, pos, 4] -> up (4 -> 6) -> ReLU (in place) -> down (6 -> 3); ``act`` is called ``n_act`` times."""

    def __init__(self, n_act: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(4, 6)
        self.act = torch.nn.ReLU(inplace=True)
        self.down = torch.nn.Linear(6, 3)
        self.n_act = n_act

    def forward(self, x):
        h = self.up(x)
        for _ in range(self.n_act):
            h = self.act(h)
        return self.down(h)


def _point(model, name, hook="output"):
    return HookPoint(name, getattr(model, name), hook)


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@dataclasses.dataclass
class Plain:
    """A batch of plain tensors for a plain module: its own adapter."""

    x: torch.Tensor
    count_mask: torch.Tensor | None = None


class PlainBatches(BatchAdapter):
    def forward(self, model, batch):
        return model(batch.x)

    def size(self, batch) -> int:
        return int(batch.x.shape[0])


def test_forward_and_backward_hooks_in_one_context_match_autograd():
    model = TinyMLP()
    x = torch.randn(2, 5, 4)
    seen: dict[str, torch.Tensor] = {}

    def h_in(h, hc):  # the ReLU's input, before the in-place op overwrites it
        hc.ctx["d"] = (h > 0).float()
        seen["h"] = h.detach().clone()

    def g_out(g, hc):  # dL/da at the ReLU's output
        seen["eta"] = g * hc.ctx["d"]

    act = _point(model, "act")
    leaf = x.clone().requires_grad_(True)
    with hooks([(act, "input", h_in)], [(act, "output", g_out)]) as state:
        out = model(leaf)
        torch.autograd.grad(out.square().sum(), leaf)
    assert _n_hooks(model) == 0
    assert state.calls == {} and state.counts == {"act": 1}  # no begin/end: counts only
    # reference: dL/dh through autograd, with h kept by a plain hook
    ref = {}

    def keep(m, a, o):
        o.retain_grad()
        ref["h"] = o

    model.act.inplace = False  # so that h stays h
    handle = model.up.register_forward_hook(keep)
    leaf2 = x.clone().requires_grad_(True)
    model(leaf2).square().sum().backward()
    handle.remove()
    torch.testing.assert_close(seen["h"], ref["h"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(seen["eta"], ref["h"].grad, rtol=0, atol=0)


def test_hooks_are_removed_when_the_body_fails():
    model = TinyMLP()
    with pytest.raises(RuntimeError, match="boom"):
        with hooks([(_point(model, "act"), lambda x, hc: None)], [(_point(model, "down"), lambda g, hc: None)]):
            assert _n_hooks(model) > 0
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0

    def fail(x, hc):
        raise ValueError("in a hook")

    with pytest.raises(ValueError, match="in a hook"):
        run(model, [Plain(torch.randn(1, 2, 4))], fwd_hooks=[(_point(model, "act"), fail)], adapter=PlainBatches())
    assert _n_hooks(model) == 0


def test_input_replacement_and_output_replacement():
    model = TinyMLP()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        dense = model(x)
        with hooks([(_point(model, "down", "input"), lambda h, hc: torch.zeros_like(h))]):
            zeroed = model(x)
        with hooks([(_point(model, "up"), lambda h, hc: h * 0 - 1.0)]):  # ReLU(-1) = 0: the same as zeroing
            negative = model(x)
        after = model(x)
    torch.testing.assert_close(zeroed, model.down.bias.expand_as(zeroed))
    torch.testing.assert_close(negative, zeroed)
    torch.testing.assert_close(after, dense)  # nothing left behind


def test_calls_per_forward_masks_progress_and_stats():
    model = TinyMLP(n_act=2)
    masks = [torch.tensor([[True, False, True]]), None]
    batches = [Plain(torch.randn(1, 3, 4), masks[0]), Plain(torch.randn(2, 3, 4))]
    got, ticks = [], []

    def observe(x, hc):
        got.append((hc.call, hc.mask))

    r = run(model, batches, fwd_hooks=[(_point(model, "act"), observe)], adapter=PlainBatches(),
            progress=ticks.append)
    assert [c for c, _ in got] == [0, 1, 0, 1]
    assert got[0][1] is masks[0] and got[1][1] is masks[0] and got[2][1] is None
    assert r.calls == {"act": 2} and r.n_batches == 2 and r.n_items == 3 and ticks == [1, 1]
    assert _n_hooks(model) == 0


def test_token_and_image_batches_go_through_the_same_loop():
    class Seq(torch.nn.Module):  # a stand-in for a token model and an image model at once
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.mlp = TinyMLP()

        def forward(self, input_ids=None, attention_mask=None, pixel_values=None):
            x = self.emb(input_ids) if input_ids is not None else pixel_values.flatten(2).transpose(1, 2)
            return self.mlp(x)

    model = Seq()
    wins = [corpus_mod.Window([1, 2, 3], [2, 3, -100], [True, True, False]), corpus_mod.Window([4], [5], [True])]
    text = list(corpus_mod.batches(wins, 2, 0))
    image = types.SimpleNamespace(pixel_values=torch.randn(2, 4, 2, 3))  # [B, C, H, W] -> 6 positions of 4
    site = HookPoint("act", model.mlp.act)
    text_probes = run_probes(model, text, [site], lambda s, w, d: _Count(w))
    image_probes = run_probes(model, [image], [site], lambda s, w, d: _Count(w), adapter=ImageBatches())
    assert text_probes["act"].n == 3  # counted positions only: padding and uncounted context never reach it
    assert image_probes["act"].n == 2 * 6


class _Count:
    def __init__(self, width):
        self.n = 0

    def update(self, x, mask):
        self.n += int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1]


def test_out_of_memory_is_one_device_error_naming_the_batch():
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = Boom()
    with pytest.raises(DeviceError) as e:
        run(model, [Plain(torch.zeros(1, 1, 1))], adapter=PlainBatches())
    assert "batch" in e.value.problem and "--batch-size" in e.value.fix
    assert isinstance(e.value.__cause__, oom)  # what the CLI looks for to name a smaller --batch-size


def test_backward_hook_on_a_tensor_without_grad_is_reported():
    model = TinyMLP()
    with Runner(model, bwd_hooks=[(_point(model, "act"), lambda g, hc: None)], adapter=PlainBatches(),
                mode="grad") as r:
        r.run([Plain(torch.randn(1, 2, 4))])  # parameters require grad, so the activation does ...
    assert r.missing_grad == set()
    for p in model.parameters():
        p.requires_grad_(False)
    with Runner(model, bwd_hooks=[(_point(model, "act"), lambda g, hc: None)], adapter=PlainBatches(),
                mode="grad") as r:
        r.run([Plain(torch.randn(1, 2, 4))])  # ... and now nothing does
    assert r.missing_grad == {"act"}
    with pytest.raises(ValueError, match="mode"):
        Runner(model, mode="train")


def test_attach_sites_keeps_its_contract():
    model = TinyMLP()
    seen = []
    with torch.no_grad(), attach_sites([_point(model, "act"), _point(model, "down", "input")],
                                       lambda site, x: seen.append(site.canonical_name)):
        model(torch.randn(1, 2, 4))
    assert seen == ["act", "down"] and _n_hooks(model) == 0


# ----------------------------------------------------------------------------------------------- data set-up
def test_data_options_are_defined_once():
    shared = {f.name for f in dataclasses.fields(DataOptions)}
    assert shared == {"data", "text_field", "encoding", "batch_size", "max_length", "max_tokens", "stride", "seed",
                      "skip_first"}
    from probes.gradients import GradOptions
    from probes.massive import MassiveOptions
    from probes.measure import MeasureOptions
    from probes.pplp import CurveOptions, PplpOptions

    for cls in (MeasureOptions, GradOptions, PplpOptions, CurveOptions):
        assert issubclass(cls, DataOptions)
    assert issubclass(MassiveOptions, CorpusOptions) and "stride" not in {f.name for f in
                                                                          dataclasses.fields(MassiveOptions)}
    m = MeasureOptions(data="x.txt", batch_size=2, stride=8, skip_first=1, kinds=("mlp_post",))
    g = GradOptions(**m.data_fields(), taus=(1e-3,))
    assert (g.data, g.batch_size, g.stride, g.skip_first, g.taus) == ("x.txt", 2, 8, 1, (1e-3,))
    mo = MassiveOptions(**m.data_fields(exclude=("batch_size", "seed", "stride")))
    assert (mo.data, mo.batch_size, mo.seed, mo.skip_first) == ("x.txt", None, None, 1)


def test_pad_id_fallback_and_max_length():
    assert pad_id(types.SimpleNamespace(pad_token_id=7, eos_token_id=3)) == 7
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(None) == 0
    cfg = types.SimpleNamespace(n_positions=64)
    assert resolve_max_length(types.SimpleNamespace(config=cfg, max_length=64), None) == 64
    assert resolve_max_length(types.SimpleNamespace(config=None, max_length=None), None) == DEFAULT_MAX_LENGTH_CAP
    assert resolve_max_length(types.SimpleNamespace(config=cfg, max_length=64), 32) == 32
    with pytest.raises(DataError, match="position limit"):
        resolve_max_length(types.SimpleNamespace(config=cfg, max_length=64), 65)


def test_data_parallel_share_is_round_robin_over_batches():
    wins = sequence_windows([[i, i + 1] for i in range(7)], skip_first=1)
    assert [w.count for w in wins[:1]] == [[False, True]]
    td = TokenData(wins, batch_size=2, pad_id=0)
    assert td.n_batches() == 4 and td.n_counted == 7
    batches = [b.input_ids[:, 0].tolist() for b in td.batches()]
    for rank in (0, 1):
        dist = distributed.DistContext(rank=rank, world_size=2)
        local = td.local(dist)
        mine = [b.input_ids[:, 0].tolist() for b in td.batches(local)]
        assert mine == batches[rank::2]  # the same batches a single process makes, every other one
    assert td.local(None) is wins


def test_probes_of_sites_with_a_known_width_are_made_before_the_first_forward():
    """``run_probes``: a site whose width and device are known gets its probe before any hook runs (made inside
    the forward, its small tensors cost that forward more than their making); a wrong width is not trusted (the
    probe is made again from the tensor); a site never called still has no probe in the result."""
    from probes.sites import Site

    model = TinyMLP()
    events = []

    class Rec(_Count):
        def __init__(self, name, width):
            super().__init__(width)
            self.name, self.width = name, width
            events.append(("make", name, width))

        def update(self, x, mask):
            events.append(("update", self.name, int(x.shape[-1])))
            super().update(x, mask)

    def site(name, module, hook, width):
        return Site(name, name, "mlp_post", hook, 0, width, "test", module=module)

    sites = [site("down_in", model.down, "input", 6),  # right width, the device of down's weight
             site("act_out", model.act, "output", 5),  # wrong width (the tensor has 6): made again
             site("up_out", model.up, "output", None),  # width unknown: made from the tensor
             site("never", torch.nn.Linear(2, 2), "output", 2)]  # not part of the model: never called
    batches = [Plain(torch.randn(2, 3, 4)), Plain(torch.randn(1, 3, 4))]

    class Marked(PlainBatches):
        def forward(self, model, batch):
            events.append(("forward",))
            return super().forward(model, batch)

    got = run_probes(model, batches, sites, lambda s, w, d: Rec(s.canonical_name, w), adapter=Marked())

    first_forward = events.index(("forward",))
    made_before = {e[1:] for e in events[:first_forward] if e[0] == "make"}
    assert made_before == {("down_in", 6), ("act_out", 5), ("never", 2)}
    assert sorted(got) == ["act_out", "down_in", "up_out"]  # "never": made ahead, never called, not returned
    assert {k: p.width for k, p in got.items()} == {"down_in": 6, "act_out": 6, "up_out": 6}
    assert all(p.n == 9 for p in got.values())  # both batches reached the probe that was kept
    assert events.count(("make", "down_in", 6)) == 1  # the one made ahead is the one used
