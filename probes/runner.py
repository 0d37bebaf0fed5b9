"""The one loop over batches: forward passes with probes attached to sites.

Probes are created lazily per site (their width comes from the first tensor they see) and
updated on the device the site lives on. Positions outside a batch's ``count_mask``
(padding, uncounted context, ``--skip-first``) never reach a probe.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from probes.corpus import Batch
from probes.errors import DeviceError, ModelError
from probes.hooks import attach_sites
from probes.sites import Site


def forward_batch(model, batch: Batch, *, is_encoder_decoder: bool = False, need_logits: bool = False):
    """Run ``model`` on a token batch. Causal LMs skip most of the LM head unless logits are needed."""
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if is_encoder_decoder:
        shift = getattr(model, "_shift_right", None) or getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if shift is None:
            raise ModelError("encoder-decoder model without a way to build decoder inputs",
                             "use --site on encoder modules only")
        kwargs["decoder_input_ids"] = shift(batch.input_ids)
    if not need_logits and not is_encoder_decoder and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False  # a key/value cache nobody reads costs memory in every layer
    return model(**kwargs)


def _accepts(model, name: str) -> bool:
    # Checked from the signature, never by retrying: a retried forward would run the hooks twice.
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run_probes(model, batches: Iterable[Batch], sites: Sequence[Site], make_probe: Callable[[Site, int, Any], Any],
               *, forward: Callable[[Any, Batch], Any] | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Attach ``make_probe(site, width, device)`` probes to ``sites`` and stream ``batches`` through ``model``."""
    import torch

    forward = forward or (lambda m, b: forward_batch(m, b))
    probes: dict[str, Any] = {}
    current: dict[str, Any] = {"mask": None}

    def observe(site: Site, x) -> None:
        if x is None or not torch.is_tensor(x) or not x.is_floating_point():
            return
        mask = current["mask"]
        if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
            m = mask
        elif x.dim() == 2 and mask is not None and x.shape[0] == mask.numel():
            x, m = x.view(*mask.shape, x.shape[-1]), mask  # flattened [batch*pos, channels]
        elif x.dim() == 2:
            m = None  # plain MLP: [batch, channels], one token per sample
        elif x.dim() == 3:
            m = None  # a sequence of another length (e.g. a vision model): count every position
        else:
            raise ModelError(f"site {site.where} gives a {x.dim()}-D tensor {tuple(x.shape)}",
                             "pick a site with [batch, pos, channels] activations via --site")
        p = probes.get(site.canonical_name)
        if p is None:
            p = probes[site.canonical_name] = make_probe(site, int(x.shape[-1]), x.device)
        p.update(x.detach(), m)

    try:
        with torch.inference_mode(), attach_sites(sites, observe):
            for batch in batches:
                current["mask"] = batch.count_mask
                forward(model, batch)
                if progress is not None:
                    progress(1)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        raise DeviceError("out of memory on a batch", "lower --batch-size or --max-length, or use --dtype bfloat16") \
            from e
    return probes
