"""The one loop over batches: forward (and backward) passes with hooks attached to sites.

``Runner`` is a context manager: on entry it attaches forward and backward hooks (``probes.hooks``)
and enters inference mode (or no-grad, or grad mode for backward passes); on exit it removes every
handle.
``Runner.run(batches, step)`` streams the batches: for each one it sets the count mask the hooks
see, runs the forward, calls ``step(batch, output)`` (a loss, a backward pass), and reports progress.
Text batches (``probes.corpus.Batch``) and image batches (``probes.vision.ImageBatch``) go through
the same loop; a ``BatchAdapter`` says how to run the model on one and which positions count.
Out of memory, anywhere in the loop, becomes one ``DeviceError`` (the CLI adds the --batch-size
to try). Data-parallel runs give the runner only this rank's batches (``probes.data.TokenData.local``).

``run_probes`` is the common case on top: one streaming probe per site, created lazily (its width
comes from the first tensor it sees) and updated on the device the site lives on. Positions
outside a batch's ``count_mask`` (padding, uncounted context, ``--skip-first``) never reach a probe.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from probes.errors import DeviceError, ModelError
from probes.hooks import HookCall, HookState, hooks

OOM_PROBLEM = "out of memory on a batch"
OOM_FIX = "lower --batch-size or --max-length, or use --dtype bfloat16"
MODES = ("inference", "no_grad", "grad")


# ----------------------------------------------------------------------------------------------- forwards
def forward_batch(model, batch, *, is_encoder_decoder: bool = False, need_logits: bool = False):
    """Run ``model`` on a token batch. Causal LMs skip most of the LM head unless logits are needed. On CPU
    torch's thread count follows the free cores first (``probes.threads.follow_cpu_threads``)."""
    from probes.threads import follow_cpu_threads

    follow_cpu_threads()
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


def forward_images(model, x):
    """``model(pixel_values=x)`` for Hugging Face vision models, ``model(x)`` for plain modules."""
    return model(pixel_values=x) if _accepts(model, "pixel_values") else model(x)


def _accepts(model, name: str) -> bool:
    # Checked from the signature, never by retrying: a retried forward would run the hooks twice.
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------- batches
class BatchAdapter:
    """How the runner treats one kind of batch: run the model on it, its count mask, its size."""

    def forward(self, model, batch):
        raise NotImplementedError

    def mask(self, batch):
        """``[batch, pos]`` bool, the positions whose statistics count; None: every position counts."""
        return getattr(batch, "count_mask", None)

    def size(self, batch) -> int:
        raise NotImplementedError


@dataclass
class TokenBatches(BatchAdapter):
    """``probes.corpus.Batch``: ``input_ids`` / ``attention_mask`` / ``count_mask`` / ``labels``."""

    is_encoder_decoder: bool = False
    need_logits: bool = False

    def forward(self, model, batch):
        return forward_batch(model, batch, is_encoder_decoder=self.is_encoder_decoder, need_logits=self.need_logits)

    def size(self, batch) -> int:
        return int(batch.input_ids.shape[0])


@dataclass
class ImageBatches(BatchAdapter):
    """``probes.vision.ImageBatch``: ``pixel_values`` ``[B, C, H, W]`` (every position counts)."""

    def forward(self, model, batch):
        return forward_images(model, batch.pixel_values)

    def size(self, batch) -> int:
        return int(batch.pixel_values.shape[0])


def adapter_for(batch) -> BatchAdapter:
    return ImageBatches() if hasattr(batch, "pixel_values") else TokenBatches()


@contextlib.contextmanager
def out_of_memory_as_device_error() -> Iterator[None]:
    """The one out-of-memory handler of the batch loops: a ``DeviceError`` whose cause is torch's error
    (the CLI recognises it by that cause and names a smaller --batch-size)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError since torch 2.5: the same class
        raise DeviceError(OOM_PROBLEM, OOM_FIX) from e


# ----------------------------------------------------------------------------------------------- the runner
class Runner:
    """Hooks attached for the ``with`` body, and the loop over batches.

    ``fwd_hooks`` / ``bwd_hooks``: ``(site, fn)`` or ``(site, where, fn)`` as in ``probes.hooks.hooks``.
    ``adapter``: how to run a batch (default: picked from the first batch). ``forward(model, batch)``
    overrides the adapter's forward (a loss built in the forward, say). ``mode``: ``inference``
    (``torch.inference_mode``), ``no_grad``, or ``grad`` (for backward passes).
    ``progress(advance)``: called with 1 after each batch.

    After the run: ``calls`` (the most calls per site in one forward), ``missing_grad``, ``n_batches``,
    ``n_items`` (samples), ``seconds``.
    """

    def __init__(self, model, *, fwd_hooks: Sequence[Sequence] = (), bwd_hooks: Sequence[Sequence] = (),
                 adapter: BatchAdapter | None = None, forward: Callable[[Any, Any], Any] | None = None,
                 mode: str = "inference", progress: Callable[[int], Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown runner mode {mode!r}; use one of {', '.join(MODES)}")
        self.model = model
        self.fwd_hooks, self.bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        self.adapter = adapter
        self._forward = forward
        self.mode = mode
        self.progress = progress
        self.state = HookState()
        self.n_batches = 0
        self.n_items = 0
        self.seconds = 0.0
        self._stack: contextlib.ExitStack | None = None

    @property
    def calls(self) -> dict[str, int]:
        return self.state.calls

    @property
    def missing_grad(self) -> set[str]:
        return self.state.missing_grad

    def __enter__(self) -> "Runner":
        import torch

        stack = contextlib.ExitStack()
        try:
            stack.enter_context({"inference": torch.inference_mode, "no_grad": torch.no_grad,
                                 "grad": torch.enable_grad}[self.mode]())
            stack.enter_context(hooks(self.fwd_hooks, self.bwd_hooks, self.state))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()  # removes every hook handle, whatever happened in the body

    def forward(self, batch):
        """One forward of ``batch`` with the hooks seeing its count mask."""
        adapter = self.adapter = self.adapter or adapter_for(batch)
        self.state.begin(adapter.mask(batch))
        out = (self._forward or adapter.forward)(self.model, batch)
        self.state.end()
        self.n_batches += 1
        self.n_items += adapter.size(batch)
        return out

    def run(self, batches: Iterable[Any], step: Callable[[Any, Any], Any] | None = None) -> "Runner":
        """Forward every batch, then ``step(batch, output)``; progress after each."""
        if self._stack is None:
            with self:
                return self.run(batches, step)
        t0 = time.perf_counter()
        try:
            with out_of_memory_as_device_error():
                for batch in batches:
                    out = self.forward(batch)
                    if step is not None:
                        step(batch, out)
                    del out
                    if self.progress is not None:
                        self.progress(1)
        finally:
            self.seconds += time.perf_counter() - t0
        return self


def run(model, batches: Iterable[Any], *, step: Callable[[Any, Any], Any] | None = None, **kw) -> Runner:
    """``Runner(model, **kw).run(batches, step)``: hooks attached for the loop only."""
    with Runner(model, **kw) as r:
        return r.run(batches, step)


# ----------------------------------------------------------------------------------------------- probes
def token_layout(site, x, mask):
    """``x`` of a text site as ``[batch, pos, channels]`` with the mask that applies to it (or None)."""
    if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        return x, mask
    if x.dim() == 2 and mask is not None and x.shape[0] == mask.numel():
        return x.view(*mask.shape, x.shape[-1]), mask  # flattened [batch*pos, channels]
    if x.dim() == 2:
        return x, None  # plain MLP: [batch, channels], one token per sample
    if x.dim() == 3:
        return x, None  # a sequence of another length (e.g. a vision model): count every position
    raise ModelError(f"site {site.where} gives a {x.dim()}-D tensor {tuple(x.shape)}",
                     "pick a site with [batch, pos, channels] activations via --site")


def run_probes(model, batches: Iterable[Any], sites: Sequence, make_probe: Callable[[Any, int, Any], Any],
               *, forward: Callable[[Any, Any], Any] | None = None,
               progress: Callable[[int], None] | None = None, adapter: BatchAdapter | None = None) -> dict[str, Any]:
    """Attach ``make_probe(site, width, device)`` probes to ``sites`` and stream ``batches`` through ``model``.

    Returns the probes by canonical name (a site never called has none). A site whose width and device are known
    beforehand (``premade_probes``) gets its probe made before the first forward, and keeps it if the first tensor
    it sees has that width and device; otherwise, and for every other site, the probe is made from that tensor."""
    from probes import relu_pass

    probes: dict[str, Any] = {}
    ready = premade_probes(model, sites, make_probe)

    def probe_for(name: str):  # the probe a site's hook will update (the premade one before its first call)
        p = probes.get(name)
        return p if p is not None else ready.get(name, (None, None, None))[2]

    def claim(name: str):  # the premade probe becomes the site's (its first call, counted in its ReLU's pass)
        if name not in probes:
            probes[name] = ready.pop(name)[2]

    def observe(x, hc: HookCall) -> None:
        x, m = token_layout(hc.site, x, hc.mask)
        name = hc.site.canonical_name
        p = probes.get(name)
        if p is None:
            width, device, p = ready.pop(name, (None, None, None))
            if p is None or width != int(x.shape[-1]) or device != x.device:
                p = make_probe(hc.site, int(x.shape[-1]), x.device)
            probes[name] = p
        p.update(x.detach(), m)

    def after_forward(batch, out) -> None:  # probes that defer their bookkeeping do it now, outside the forward
        for p in probes.values():
            flush = getattr(p, "flush", None)
            if flush is not None:
                flush()

    taken = relu_pass.plan(model, sites, probe_for)  # ReLU sites counted on the way, with a hook of their own
    own = {site.canonical_name for site, _ in taken}
    runner = Runner(model, fwd_hooks=[(s, observe) for s in sites if s.canonical_name not in own],
                    adapter=adapter or TokenBatches(), forward=forward, progress=progress)
    with runner, relu_pass.counted_relus(taken, probe_for, claim, observe, runner.state):
        runner.run(batches, step=after_forward)
    return probes


def premade_probes(model, sites: Sequence, make_probe: Callable[[Any, int, Any], Any]) -> dict[str, tuple]:
    """``(width, device, probe)`` by canonical name, made before any forward for the sites whose width is known
    and whose device is certain: the device of the site module's own parameters, else the model's when all its
    parameters are on one device. Made inside the first forward instead, a probe's small state tensors cost
    that forward more than their making (measured on the bundled model, 4 probes: 1.06x against 1.02x a bare
    forward with probes that do nothing; ``benchmarks/README.md``, 2026-12-04 late)."""
    import torch

    whole: list = []  # the model's one device (or None), looked up only for a site module without parameters

    def model_device():
        if not whole:
            devices = {p.device for p in model.parameters()} if isinstance(model, torch.nn.Module) else set()
            whole.append(next(iter(devices)) if len(devices) == 1 else None)
        return whole[0]

    out: dict[str, tuple] = {}
    for site in sites:
        width = getattr(site, "width", None)
        if not width or site.canonical_name in out:
            continue
        module = getattr(site, "module", None)
        own = next(module.parameters(recurse=False), None) if isinstance(module, torch.nn.Module) else None
        device = own.device if own is not None else model_device()
        if device is not None:
            out[site.canonical_name] = (int(width), device, make_probe(site, int(width), device))
    return out
