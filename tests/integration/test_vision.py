"""Vision inputs end to end: a tiny HF ViT classifier on a generated image folder (with one corrupt
file that is skipped and counted), random: inputs, and a hand-built conv net whose shared ReLU runs
twice per forward (counted per call, per channel, gradients paired with the right call)."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from probes import vision
from probes.errors import DataError, ModelError
from probes.gradients import GradientSparsityProbe, GradOptions, measure_gradients
from probes.loading import load_checkpoint
from probes.vision import VisionOptions, measure_vision

IMG = 16


def _png(path: Path, seed: int, size=(20, 18)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for ci, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i in range(3 + ci):
            _png(root / cls / f"{i}.png", 10 * ci + i)
    (root / "cat" / "broken.png").write_bytes(b"this is not a png file")
    (root / "dog" / "notes.txt").write_text("not an image, not counted")
    return root


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=IMG, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                    id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    cfg.architectures = ["ViTForImageClassification"]
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": IMG, "width": IMG}).save_pretrained(d)
    return d


def test_vit_gradients_on_an_image_folder(vit_dir, image_dir):
    lm = load_checkpoint(str(vit_dir), device="cpu")
    assert vision.is_vision_model(lm)
    res = measure_gradients(lm, GradOptions(data=f"imagefolder:{image_dir}", batch_size=4))
    info = res.info
    assert info["loss"] == "classification" and info["label_method"] == "config label2id"
    assert info["n_image_files"] == 8 and info["n_images_decoded"] == 7 and info["n_skipped_images"] == 1
    assert info["skipped_images"][0]["path"].endswith("broken.png")
    assert info["n_loss_targets"] == 7 and info["preprocess"]["source"].startswith("Hugging Face")
    df = res.table()
    assert list(df.canonical_name) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    # tokens = images x (patches + CLS) = 7 x (2 * 2 + 1)
    assert set(df.n_tokens) == {35} and set(df.n_grad_tokens) == {35} and set(df.width) == {32}
    assert df.deriv_sparsity_rule.iloc[0] == "|act'(h)|<=1e-06"
    assert df["eff_grad_sparsity@0.001"].between(0, 1).all() and (df.eta_l2sq_per_token > 0).all()
    assert all(p.grad is None for p in lm.model.parameters())


def test_vit_activation_sparsity_on_random_inputs(vit_dir):
    lm = load_checkpoint(str(vit_dir), device="cpu")
    res = measure_vision(lm, VisionOptions(data=f"random:3x{IMG}x{IMG}", n_images=5, batch_size=2))
    df = res.table()
    assert list(df.kind) == ["mlp_post", "mlp_pre"] * 2 and set(df.n_tokens) == {25}  # as measure: MLP_KINDS
    assert res.info["data_kind"] == "random" and res.info["n_images"] == 5
    assert "Uniform" in res.info["random_distribution"]
    again = measure_vision(lm, VisionOptions(data=f"random:3x{IMG}x{IMG}", n_images=5, batch_size=5))
    assert again.table().zero_frac.tolist() == df.zero_frac.tolist()  # seeded, batch-size independent
    with pytest.raises(ModelError, match="no labels"):
        measure_gradients(lm, GradOptions(data=f"random:3x{IMG}x{IMG}"))


def test_bad_image_folders(tmp_path, vit_dir):
    lm = load_checkpoint(str(vit_dir), device="cpu")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="has no images"):
        measure_vision(lm, VisionOptions(data=f"imagefolder:{tmp_path / 'empty'}"))
    with pytest.raises(DataError, match="does not exist"):
        measure_vision(lm, VisionOptions(data=f"imagefolder:{tmp_path / 'nope'}"))
    for name in ("0", "5"):
        (tmp_path / "ids" / name).mkdir(parents=True)
        _png(tmp_path / "ids" / name / "a.png", int(name))
    with pytest.raises(DataError, match="out of range"):
        measure_gradients(lm, GradOptions(data=f"imagefolder:{tmp_path / 'ids'}"))
    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="could be decoded"):
        measure_vision(lm, VisionOptions(data=f"imagefolder:{tmp_path / 'bad'}"))
    with pytest.raises(DataError, match="bad random"):
        measure_vision(lm, VisionOptions(data="random:3xbig"))


class SharedReluNet(nn.Module):
    """torchvision-ResNet style: one ReLU module applied after two convolutions of different widths."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def _conv_net():
    torch.manual_seed(0)
    net = SharedReluNet()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_shared_relu_counted_per_call_and_per_channel():
    lm = load_checkpoint(_conv_net(), device="cpu")
    res = measure_vision(lm, VisionOptions(data="random:3x12x12", n_images=4, batch_size=3))
    df = res.table().set_index("canonical_name")
    assert list(df.index) == ["conv.relu.hook_act.call0", "conv.relu.hook_act.call1"]
    assert list(df.kind) == ["conv_act", "conv_act"] and list(df.call) == [0, 1]
    # per channel: width = channels; tokens = images x spatial positions
    assert list(df.width) == [4, 6]
    assert list(df.n_tokens) == [4 * 12 * 12, 4 * 6 * 6]
    # the same numbers by hand
    net = _conv_net()
    data = vision.open_image_data("random:3x12x12", None, 4)
    x = torch.cat([b.pixel_values for b in vision.image_batches(data, vision.resolve_preprocessor(lm), 4)])
    with torch.no_grad():
        a0 = torch.relu(net.bn1(net.conv1(x)))
        a1 = torch.relu(net.conv2(a0))
    assert df.loc["conv.relu.hook_act.call0", "zero_frac"] == int((a0 == 0).sum()) / a0.numel()
    assert df.loc["conv.relu.hook_act.call1", "zero_frac"] == int((a1 == 0).sum()) / a1.numel()
    dead1 = int(((a1 != 0).sum((0, 2, 3)) == 0).sum())
    assert df.loc["conv.relu.hook_act.call1", "dead_neurons"] == dead1


def test_conv_net_gradients_pair_each_call(image_dir, monkeypatch):
    lm = load_checkpoint(_conv_net(), device="cpu")
    seen: dict[int, list] = {}
    orig = GradientSparsityProbe.update_backward

    def spy(self, eta, mask=None):
        seen.setdefault(id(self), []).append(eta.reshape(-1, eta.shape[-1]).clone())
        return orig(self, eta, mask)

    monkeypatch.setattr(GradientSparsityProbe, "update_backward", spy)
    res = measure_gradients(lm, GradOptions(data=f"imagefolder:{image_dir}", batch_size=8, spikes=True,
                                            loss_reduction="sum"))  # as the reference below
    df = res.table().set_index("canonical_name")
    assert list(df.index) == ["conv.relu.hook_act.call0", "conv.relu.hook_act.call1"]
    assert res.info["label_method"].startswith("sorted folder names") and res.info["n_loss_targets"] == 7
    # Reference dL/dh per call with plain autograd on a non-in-place copy.
    ref = copy.deepcopy(lm.model)
    ref.relu.inplace = False
    data = vision.open_image_data(f"imagefolder:{image_dir}", None)
    vision.assign_labels(data)
    (batch,) = list(vision.image_batches(data, vision.resolve_preprocessor(lm), 8))
    h0 = ref.bn1(ref.conv1(batch.pixel_values))
    h0.retain_grad()
    h1 = ref.conv2(torch.relu(h0))
    h1.retain_grad()
    logits = ref.fc(ref.pool(torch.relu(h1)).flatten(1))
    torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").backward()
    for k, h in enumerate((h0, h1)):
        eta = torch.cat(seen[id(res.probes[f"conv.relu.hook_act#{k}"])])
        want = h.grad.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        assert torch.allclose(eta, want, rtol=1e-5, atol=1e-8), (k, (eta - want).abs().max())
    sp = res.spikes_table()
    assert list(sp.module_path) == ["fc"] and sp.in_features.iloc[0] == 6


def test_timm_and_torchvision_are_optional(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    net = _conv_net()
    p = tmp_path / "resnetish.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, p)
    for lib in ("timm", "torchvision"):
        monkeypatch.setitem(sys.modules, lib if lib == "timm" else "torchvision.models", None)
        with pytest.raises(ModelError, match=f"needs the '{lib}' package"):
            load_checkpoint(str(p), arch=f"{lib}:resnet18", device="cpu")
    # With a (fake) timm present: built by name without weights, the local state dict loaded into it.
    fake = types.SimpleNamespace(create_model=lambda name, pretrained, num_classes: SharedReluNet(num_classes))
    monkeypatch.setitem(sys.modules, "timm", fake)
    lm = load_checkpoint(str(p), arch="timm:resnetish", device="cpu")
    assert lm.family == "timm" and lm.source["num_classes"] == 2
    assert torch.equal(lm.model.conv1.weight, net.conv1.weight)
    res = measure_vision(lm, VisionOptions(data="random:3x8x8", n_images=2))
    assert len(res.rows) == 2
    with pytest.raises(ModelError, match="names no model"):
        load_checkpoint(str(p), arch="timm:", device="cpu")
