"""Image inputs, convolutional activation sites and vision model loading.

Data specs:
- ``imagefolder:DIR``: the class-per-folder layout (``DIR/CLASS/IMAGE``, torchvision's
  ImageFolder); labels come from folder names. Files that fail to decode with Pillow are
  skipped and counted (manifest ``skipped_images``); a folder with no images is a DataError.
- ``random:SHAPE`` (e.g. ``random:3x224x224``): seeded random inputs, ``n_images`` of them.
  A 3-D image shape gets i.i.d. Uniform[0, 1) pixels normalised with the model's mean/std
  (the Lazy Neuron paper's random-image setting); any other shape gets i.i.d. N(0, 1).

Preprocessing: the checkpoint folder's Hugging Face image processor (``preprocessor_config.json``)
when there is one; a timm model's ``pretrained_cfg`` mean/std/input size; otherwise the documented
default ``DEFAULT_PREPROCESS``: resize the shorter side to crop/0.875 (256 for 224, bilinear),
center-crop, scale to [0, 1], normalise with ImageNet mean/std. The crop is the config's
``image_size`` when it has one, else 224.

Convolutional sites: every leaf activation module of a model with ``Conv2d`` layers (ReLU after
conv/BN). A ``[B, C, H, W]`` activation is measured per channel with the H*W spatial positions
counted as tokens (``as_tokens`` -> ``[B, H*W, C]``). A module called several times per forward
(torchvision ResNet's shared ``relu``) is measured per call: one row per call, ``.call{k}``.

``--arch timm:NAME`` / ``torchvision:NAME`` build the model without downloading weights and load a
local state dict; both packages are imported lazily and a clear error says when they are missing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from probes.errors import CheckpointError, DataError, ModelError
from probes.hooks import HookCall
from probes.runner import ImageBatches, forward_images, run  # noqa: F401  (forward_images: re-exported)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP = 224
CROP_PCT = 0.875
DEFAULT_PREPROCESS = (f"resize shorter side to crop/{CROP_PCT} (bilinear), center-crop (config image_size, else "
                      f"{DEFAULT_CROP}), scale to [0,1], normalise with ImageNet mean {IMAGENET_MEAN} / "
                      f"std {IMAGENET_STD}")
DEFAULT_N_RANDOM = 16
CONV_ACT = "conv_act"  # site kind: activation after a convolution, per channel
ACT = "act"  # site kind: any other activation module call (2-D / 3-D)


def is_image_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("imagefolder:", "random:"))


# ----------------------------------------------------------------------------- layout

def as_tokens(x, mask=None):
    """``x`` as ``[batch, positions, channels]`` plus the mask that applies to it (or None).

    ``[B, C, H, W]`` (conv) -> ``[B, H*W, C]``: spatial positions are tokens, channels are channels.
    ``[B, T, C]`` keeps ``mask`` when it is ``[B, T]``; ``[B*T, C]`` is unflattened against ``mask``;
    ``[B, C]`` is one token per sample. Other shapes raise ModelError.
    """
    if x.dim() == 4:
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c), None
    if x.dim() == 3:
        if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
            return x, mask
        return x, None
    if x.dim() == 2:
        if mask is not None and x.shape[0] == mask.numel() and mask.dim() == 2 and mask.shape[1] > 1:
            return x.view(*mask.shape, x.shape[-1]), mask
        return x.unsqueeze(1), None
    raise ModelError(f"an activation of shape {tuple(x.shape)} cannot be measured per channel",
                     "pick a site with [batch, pos, channels] or [batch, channels, H, W] activations via --site")


# ----------------------------------------------------------------------------- data

@dataclass
class ImageBatch:
    pixel_values: Any  # FloatTensor [B, C, H, W] (or [B, *shape] for random: non-image shapes)
    labels: Any | None  # LongTensor [B] or None
    paths: list[str] = field(default_factory=list)
    count_mask: Any = None  # every position counts


@dataclass
class ImageData:
    spec: str
    kind: str  # imagefolder | random
    root: str | None = None
    samples: list[tuple[str, str | None]] = field(default_factory=list)  # (path, class name)
    classes: list[str] = field(default_factory=list)
    label_of_class: dict[str, int] = field(default_factory=dict)
    label_method: str | None = None
    shape: tuple[int, ...] | None = None  # random:
    n_images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # undecodable files
    n_decoded: int = 0
    ignored_root_files: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return self.kind == "imagefolder" and bool(self.label_of_class)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"data": self.spec, "data_kind": self.kind, "preprocess": self.preprocess}
        if self.kind == "imagefolder":
            d.update({"image_root": self.root, "n_image_files": len(self.samples), "n_images_decoded": self.n_decoded,
                      "n_skipped_images": len(self.skipped), "skipped_images": self.skipped[:100],
                      "classes": self.classes[:1000], "label_method": self.label_method,
                      "ignored_root_files": self.ignored_root_files})
        else:
            d.update({"random_shape": list(self.shape or ()), "n_images": self.n_images,
                      "random_distribution": ("Uniform[0,1) pixels, normalised with the model mean/std"
                                              if self.shape and len(self.shape) == 3 else "N(0, 1)")})
        return d


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def scan_imagefolder(root: str | Path) -> ImageData:
    """List ``root/CLASS/**/IMAGE`` files (sorted); images directly in ``root`` form one unlabeled set
    when there are no class folders. DataError when nothing is there."""
    r = Path(root).expanduser()
    spec = f"imagefolder:{root}"
    if not r.exists():
        raise DataError(f"image folder {root!r} does not exist", "give imagefolder:DIR with DIR/CLASS/IMAGE files")
    if not r.is_dir():
        raise DataError(f"image folder {root!r} is not a folder", "give imagefolder:DIR with DIR/CLASS/IMAGE files")
    classes, samples = [], []
    for d in sorted(x for x in r.iterdir() if x.is_dir() and not x.name.startswith(".")):
        files = sorted(p for p in d.rglob("*") if _is_image_file(p))
        if files:
            classes.append(d.name)
            samples += [(str(p), d.name) for p in files]
    root_files = sorted(p for p in r.iterdir() if _is_image_file(p))
    data = ImageData(spec, "imagefolder", root=str(r))
    if not samples and root_files:
        samples = [(str(p), None) for p in root_files]
    elif root_files:
        data.ignored_root_files = len(root_files)  # as torchvision's ImageFolder: only class folders count
    if not samples:
        raise DataError(f"image folder {root} has no images (looked for {', '.join(IMAGE_EXTS)})",
                        "use the class-per-folder layout DIR/CLASS/IMAGE.jpg")
    data.samples, data.classes = samples, classes
    return data


def assign_labels(data: ImageData, config: Any = None) -> None:
    """Class name -> label id: the config's ``label2id`` when it names every folder, integer folder
    names as ids, else sorted folder names -> 0..K-1 (torchvision ImageFolder order)."""
    if not data.classes:
        return
    l2i = getattr(config, "label2id", None) or {}
    default_l2i = all(re.fullmatch(r"LABEL_\d+", str(k)) for k in l2i)
    if l2i and not default_l2i and all(c in l2i for c in data.classes):
        data.label_of_class = {c: int(l2i[c]) for c in data.classes}
        data.label_method = "config label2id"
    elif all(re.fullmatch(r"\d+", c) for c in data.classes):
        data.label_of_class = {c: int(c) for c in data.classes}
        data.label_method = "folder names are class ids"
    else:
        data.label_of_class = {c: i for i, c in enumerate(data.classes)}
        data.label_method = "sorted folder names -> 0..K-1 (torchvision ImageFolder order)"
    n = getattr(config, "num_labels", None) if config is not None else None
    if isinstance(n, int) and n > 0:
        bad = {c: v for c, v in data.label_of_class.items() if not 0 <= v < n}
        if bad:
            c, v = next(iter(bad.items()))
            raise DataError(f"label {v} (folder {c!r}) is out of range for a model with {n} classes",
                            "name class folders after the model's labels (config id2label) or its class ids "
                            f"0..{n - 1}")


def parse_random_spec(spec: str) -> tuple[int, ...]:
    body = spec[len("random:"):]
    try:
        shape = tuple(int(s) for s in body.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape) or len(shape) > 4:
        raise DataError(f"bad random input spec {spec!r}", "use random:CxHxW, e.g. random:3x224x224 (or random:64)")
    return shape


def open_image_data(spec: str, config: Any = None, n_images: int | None = None) -> ImageData:
    if spec.startswith("imagefolder:"):
        data = scan_imagefolder(spec[len("imagefolder:"):])
        assign_labels(data, config)
        return data
    if spec.startswith("random:"):
        shape = parse_random_spec(spec)
        return ImageData(spec, "random", shape=shape, n_images=int(n_images or DEFAULT_N_RANDOM))
    raise DataError(f"{spec!r} is not an image data spec", "use imagefolder:DIR or random:CxHxW")


# ----------------------------------------------------------------------------- preprocessing

@dataclass
class Preprocessor:
    """Turns PIL images into a normalised ``[B, 3, H, W]`` float tensor."""

    source: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop: int = DEFAULT_CROP
    hf_processor: Any = None

    def __call__(self, images: list) -> Any:
        import torch

        if self.hf_processor is not None:
            out = self.hf_processor(images=images, return_tensors="pt")
            return out["pixel_values"].float()
        return torch.stack([self._default(im) for im in images])

    def _default(self, im):
        import numpy as np
        import torch
        from PIL import Image

        short = int(round(self.crop / CROP_PCT))
        w, h = im.size
        s = short / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - self.crop) // 2, (h - self.crop) // 2
        im = im.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        m = torch.tensor(self.mean).view(-1, 1, 1)
        sd = torch.tensor(self.std).view(-1, 1, 1)
        return (x - m) / sd

    def describe(self) -> dict[str, Any]:
        d = {"source": self.source, "mean": list(self.mean), "std": list(self.std)}
        if self.hf_processor is None:
            d.update({"crop": self.crop, "resize_shorter_side": int(round(self.crop / CROP_PCT)),
                      "interpolation": "bilinear"})
        return d


def _checkpoint_dir(loaded) -> Path | None:
    p = (getattr(loaded, "source", None) or {}).get("path")
    if not p:
        return None
    p = Path(p)
    return p if p.is_dir() else p.parent


def resolve_preprocessor(loaded) -> Preprocessor:
    folder = _checkpoint_dir(loaded)
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        try:
            from transformers import AutoImageProcessor
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "requires torchvision; falling back to the PIL backend"
            try:
                proc = AutoImageProcessor.from_pretrained(str(folder))
            finally:
                hf_logging.set_verbosity(verbosity)
            mean = tuple(getattr(proc, "image_mean", None) or IMAGENET_MEAN)
            std = tuple(getattr(proc, "image_std", None) or IMAGENET_STD)
            return Preprocessor(f"Hugging Face {type(proc).__name__} from {folder / 'preprocessor_config.json'}",
                                mean, std, hf_processor=proc)
        except Exception as e:  # an unusable processor: say so, use the default
            src = f"default (the folder's image processor failed to load: {type(e).__name__})"
            return Preprocessor(src, crop=_config_crop(loaded))
    pcfg = getattr(loaded.model, "pretrained_cfg", None)  # timm
    if isinstance(pcfg, dict) and pcfg.get("mean") and pcfg.get("input_size"):
        return Preprocessor("timm pretrained_cfg (mean/std/input_size) with the default resize/crop",
                            tuple(pcfg["mean"]), tuple(pcfg["std"]), crop=int(pcfg["input_size"][-1]))
    return Preprocessor("default: " + DEFAULT_PREPROCESS, crop=_config_crop(loaded))


def _config_crop(loaded) -> int:
    v = getattr(getattr(loaded, "config", None), "image_size", None)
    if isinstance(v, (list, tuple)):
        v = v[-1]
    return int(v) if isinstance(v, int) and v > 0 else DEFAULT_CROP


def image_batches(data: ImageData, pre: Preprocessor, batch_size: int, device: Any = "cpu", seed: int = 0,
                  max_images: int | None = None) -> Iterator[ImageBatch]:
    """Batches of decoded, preprocessed images. Undecodable files are skipped and recorded in
    ``data.skipped``; DataError if none of the files decode."""
    import torch

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be at least 1", "use --batch-size 1 or more")
    data.preprocess = pre.describe()
    if data.kind == "random":
        gen = torch.Generator().manual_seed(int(seed))
        n = int(max_images or data.n_images)
        shape = data.shape or ()
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            if len(shape) == 3:
                x = torch.rand((b, *shape), generator=gen)
                c = shape[0]
                if len(pre.mean) == c:
                    x = (x - torch.tensor(pre.mean).view(c, 1, 1)) / torch.tensor(pre.std).view(c, 1, 1)
            else:
                x = torch.randn((b, *shape), generator=gen)
            data.n_decoded += b
            yield ImageBatch(x.to(device), None, [])
        return
    from PIL import Image, UnidentifiedImageError

    samples = data.samples[: max_images] if max_images else data.samples
    buf_img, buf_lab, buf_path = [], [], []

    def flush():
        x = pre(buf_img)
        labels = None
        if data.has_labels and all(lab is not None for lab in buf_lab):
            labels = torch.tensor([data.label_of_class[c] for c in buf_lab], dtype=torch.long)
        batch = ImageBatch(x.to(device), labels.to(device) if labels is not None else None, list(buf_path))
        buf_img.clear(), buf_lab.clear(), buf_path.clear()
        return batch

    for path, cls in samples:
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            why = str(e).splitlines()[0][:160] if str(e) else ""
            data.skipped.append({"path": path, "error": f"{type(e).__name__}: {why}"})
            continue
        buf_img.append(rgb)
        buf_lab.append(cls)
        buf_path.append(path)
        data.n_decoded += 1
        if len(buf_img) == batch_size:
            yield flush()
    if buf_img:
        yield flush()
    if data.n_decoded == 0:
        raise DataError(f"none of the {len(samples)} image files in {data.root} could be decoded "
                        f"(e.g. {data.skipped[0]['path']}: {data.skipped[0]['error']})" if data.skipped else
                        f"no images in {data.root}", "check the files are real images (jpg, png, ...)")


def n_batches(data: ImageData, batch_size: int, max_images: int | None = None) -> int:
    n = data.n_images if data.kind == "random" else len(data.samples)
    if max_images:
        n = min(n, max_images) if data.kind != "random" else max_images
    return math.ceil(n / batch_size)


# ----------------------------------------------------------------------------- models

def is_vision_model(loaded) -> bool:
    cfg = getattr(loaded, "config", None)
    if cfg is not None and (hasattr(cfg, "num_channels") and hasattr(cfg, "image_size")):
        return True
    if (loaded.source or {}).get("kind") in ("timm", "torchvision"):
        return True
    import inspect

    try:
        params = inspect.signature(loaded.model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "pixel_values" in params


def logits_of(out):
    import torch

    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


def _has_conv(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def find_conv_sites(model, exclude: Sequence[str] = ()) -> list:
    """Every leaf activation module of a model with Conv2d layers (those in ``exclude`` aside)."""
    from probes.activations import is_activation_module
    from probes.sites import Site

    if not _has_conv(model):
        return []
    skip = set(exclude)
    sites = []
    for name, m in model.named_modules():
        if not name or name in skip or not is_activation_module(m):
            continue
        sites.append(Site(f"conv.{name}.hook_act", name, CONV_ACT, "output", len(sites), None, "conv", m))
    return sites


def vision_sites(loaded, kinds: Sequence[str] | None = None, globs: Sequence[str] = ()) -> list:
    """MLP sites of a known family; else, for a model with Conv2d layers, every activation module
    (per channel); else the structural MLP fallback."""
    from probes.sites import MLP_KINDS, find_sites

    if globs:
        return find_sites(loaded.model, loaded.family, kinds or MLP_KINDS, globs)
    mlp: list = []
    try:
        mlp = find_sites(loaded.model, loaded.family, kinds or MLP_KINDS)
    except ModelError:
        mlp = []
    if any(s.family not in ("structural", "mlp") for s in mlp):
        return mlp  # a known transformer family (a ViT's patch-embedding conv has no activation)
    # A conv net: its activation modules, per channel; a structural "MLP" guess would only be its head.
    conv = find_conv_sites(loaded.model)
    sites = conv or mlp
    if not sites:
        find_sites(loaded.model, loaded.family, kinds or MLP_KINDS)  # raises the usual ModelError
    return sites


def call_name(canonical: str, call: int, n_calls: int) -> str:
    return canonical if n_calls <= 1 else f"{canonical}.call{call}"


def run_site_probes(model, batches: Iterator[ImageBatch], sites: Sequence, make_probe: Callable[[Any, int, Any], Any],
                    forward: Callable[[Any, Any], Any] | None = None,
                    progress: Callable[[int], None] | None = None) -> tuple[dict, dict, dict]:
    """Forward ``batches`` with probes on ``sites``, one probe per (site, call within a forward).

    Returns ``(probes, calls, dims)``: ``probes[(canonical, call)]``, ``calls[canonical]`` = the most
    calls seen in one forward, ``dims[(canonical, call)]`` = the tensor's rank (4: conv). Conv
    activations go in as ``[B, H*W, C]``.
    """
    probes: dict[tuple[str, int], Any] = {}
    dims: dict[tuple[str, int], int] = {}

    def observe(x, hc: HookCall) -> None:
        xt, m = as_tokens(x, hc.mask)  # [B, C, H, W] -> [B, H*W, C]
        key = (hc.site.canonical_name, hc.call)
        p = probes.get(key)
        if p is None:
            p = probes[key] = make_probe(hc.site, int(xt.shape[-1]), xt.device)
            dims[key] = x.dim()
        p.update(xt.detach(), m)

    r = run(model, batches, fwd_hooks=[(s, observe) for s in sites], adapter=ImageBatches(), forward=forward,
            progress=progress)
    seen = {name for name, _ in probes}
    return probes, {name: k for name, k in r.calls.items() if name in seen}, dims


@dataclass
class VisionOptions:
    data: str = "random:3x224x224"
    batch_size: int = 8
    n_images: int | None = None  # random: count; imagefolder: cap
    seed: int = 0
    eps_grid: Sequence[float] = (1e-6, 1e-3, 1e-2)
    chunk_k: int = 8
    kinds: Sequence[str] | None = None
    sites: Sequence[str] = ()


def measure_vision(loaded, opts: VisionOptions | None = None, progress: Callable[[int, int], Any] | None = None):
    """Activation sparsity of a vision model over image data (``probes.measure.MeasureResult``)."""
    import time

    import torch

    from probes.measure import MeasureResult
    from probes.sparsity import ActivationSparsityProbe

    opts = opts or VisionOptions()
    torch.manual_seed(opts.seed)
    data = open_image_data(opts.data, loaded.config, opts.n_images)
    pre = resolve_preprocessor(loaded)
    sites = vision_sites(loaded, opts.kinds, opts.sites)
    nb = n_batches(data, opts.batch_size, opts.n_images if data.kind == "imagefolder" else None)
    if progress:
        progress(nb, 0)

    def make_probe(site, width, device):
        return ActivationSparsityProbe(width, opts.eps_grid, 0, device=device)  # no chunks: positions are not time

    t0 = time.perf_counter()
    batches = image_batches(data, pre, opts.batch_size, loaded.device, opts.seed,
                            opts.n_images if data.kind == "imagefolder" else None)
    probes, calls, dims = run_site_probes(loaded.model, batches, sites, make_probe,
                                          progress=(lambda k: progress(nb, k)) if progress else None)
    dtype = str(loaded.dtype).replace("torch.", "")
    rows = []
    for s in sites:
        for k in range(calls.get(s.canonical_name, 0)):
            p = probes.get((s.canonical_name, k))
            if p is None:
                continue
            r = s.row()
            kind = s.kind if s.kind != CONV_ACT else (CONV_ACT if dims.get((s.canonical_name, k)) == 4 else ACT)
            r.update({"canonical_name": call_name(s.canonical_name, k, calls[s.canonical_name]), "kind": kind,
                      "call": k, "width": p.width, "dtype": dtype})
            row = p.to_row()
            row.pop(f"chunk_sparsity@{p.chunk_k}", None), row.pop("n_chunks", None)
            rows.append({**r, **row})
    info = {**data.describe(), "n_images": data.n_decoded,
            "n_counted_tokens": max((r["n_tokens"] for r in rows), default=0),
            "tokens": "per row n_tokens: images x spatial positions (conv) or x patches/tokens (transformer)",
            "statistics_dtype": "float32 (float64 sums)", "model_dtype": dtype, "device": str(loaded.device),
            "n_sites": len(rows), "seconds": round(time.perf_counter() - t0, 3),
            "per_call": "a module called several times per forward gives one row per call (.call{k})"}
    return MeasureResult(rows, info, {f"{n}#{k}": p for (n, k), p in probes.items()})


# timm / torchvision models are built and loaded in probes.loading (checkpoint I/O).
from probes.loading import load_vision_arch, num_classes_from, parse_vision_arch  # noqa: E402,F401
