"""Watch sparsity, spikes, drift, massive activations and gradient sparsity while a model trains.

``ActsparseCallback`` (a ``transformers.TrainerCallback``) and ``ActsparseLightningCallback`` (a
``lightning.pytorch.Callback``, optional extra ``actsparse[lightning]``) take the same options
(``TrainingOptions``) and drive one ``TrainingMonitor``. Every ``every_n_steps`` optimizer steps
(and once before the first step, ``log_at_start``) the monitor measures the model being trained
with the engine's own probes, no second implementation:

- ``sparsity``: ``probes.sparsity.ActivationSparsityProbe`` at the sites of ``probes.sites.find_sites``
  (the rows of ``probes.measure.measure``, so they equal ``actsparse measure`` on a checkpoint saved at
  that step, on the same calibration batches);
- ``spikes``: ``probes.spikes.LinearInputProbe`` on every linear layer's input (Bug-or-Feature^2's
  spike_max / median), in the same calibration forward passes;
- ``drift``: ``probes.drift.weight_stats`` of every weight tensor with 2+ dimensions (the rows of
  ``actsparse drift``: Bug-or-Feature^2's mean, % negative, std and extreme fraction);
- ``massive``: ``probes.massive.massive`` (Sun et al. 2024's top-1 / median per layer) under its
  preset, as ``actsparse track`` runs it (opt-in: its preset draws its own sequences);
- ``grad``: ``probes.gradients.GradientSparsityProbe`` (arXiv 2309.03004: deriv_sparsity and
  eff_grad_sparsity@tau) from the TRAINING STEP'S OWN backward pass: the hooks of
  ``probes.gradients.site_hooks`` are attached only for the forward/backward of a logging step
  (all its gradient-accumulation micro-batches) and removed before the optimizer step; g = dL/da
  comes from the loss the trainer minimises (a mean over the step's loss targets: the reference
  protocol of cdgyp/sparsity codes/modules/hooks.py ``EffectiveGradientSparsity``). The manifest
  says which batch: ``grad_batches``. Padding (attention_mask 0) never counts.

Calibration data is a FIXED set of batches chosen once, at the start of training, so numbers are
comparable across steps: ``calibration="corpus"`` cuts token windows from ``data`` (default: the
bundled calibration text) exactly as ``actsparse measure --data --max-tokens --max-length
--batch-size`` does (``probes.data.token_windows``); ``"eval"`` takes the first
``calibration_batches`` batches of the trainer's evaluation dataloader; an iterable of batches
(dicts with ``input_ids`` and optionally ``attention_mask``) is used as given.

Outputs, all inside ``output_dir`` (nothing is written anywhere else): ``output_dir/trends/``, a
``track``-shaped actsparse output folder (long tables with a ``step`` column: ``trends``,
``trend_sparsity``, ``trend_weights``, ``trend_drift``, ``trend_spikes``, ``trend_gradients``,
``trend_massive``; ``manifest.json`` with ``"command": "track"``), rewritten atomically
(``reports.bundle``) after every logged step and given its figures at the end of training, so
``actsparse report`` and ``actsparse compare`` read it like the output of ``actsparse track`` on the
run's checkpoints; ``output_dir/tensorboard/`` (TensorBoard event files: per-layer and model-level
scalars, histograms of per-channel firing rates and MLP weights), and Weights & Biases / MLflow
metrics when the package is installed and a run is active.

Safety: an analysis that raises logs ONE warning (``ActsparseTrainingWarning``) and is disabled for
the rest of the run; training never stops because of the monitor. Under DDP (``torchrun``) every
rank measures its share of the calibration batches and its own training micro-batches, the probe
states are merged over ranks (``probes.distributed``) and rank 0 alone writes and logs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from probes.errors import ActsparseError, unknown_name
from probes.gradients import DEFAULT_TAUS, EPS_D
from probes.measure import DEFAULT_KINDS
from probes.sparsity import DEFAULT_CHUNK_K, DEFAULT_EPS_GRID

ANALYSES = ("sparsity", "spikes", "drift", "grad", "massive")
DEFAULT_ANALYSES = ("sparsity", "spikes", "drift", "grad")
DEFAULT_EVERY = 100
CALIBRATION_KINDS = ("corpus", "eval")
WRITER = "reports.training:write_training_outputs"  # the folder writer (reports layer), by reference


class ActsparseTrainingWarning(RuntimeWarning):
    """An analysis of the training monitor failed; it is disabled for the rest of the run."""


@dataclass
class TrainingOptions:
    """What the training callbacks measure, how often, on what, and where they write."""

    output_dir: str = "actsparse-training"
    every_n_steps: int = DEFAULT_EVERY
    also_at_steps: Sequence[int] = ()  # extra logging steps (e.g. dense early: 1, 2, 5, 10, 20)
    analyses: Sequence[str] = DEFAULT_ANALYSES
    calibration: Any = "corpus"  # "corpus", "eval", or an iterable of batches
    # the corpus calibration set: the fields of probes.data.DataOptions, as `actsparse measure` reads them
    data: str | None = None
    text_field: str = "text"
    encoding: str = "utf-8"
    max_tokens: int | None = 2048  # counted calibration tokens (the cost of a log: about 2 training steps)
    max_length: int | None = None
    batch_size: int = 4
    seed: int = 0
    calibration_batches: int = 4  # "eval": batches taken from the evaluation dataloader
    kinds: Sequence[str] = DEFAULT_KINDS
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID
    chunk_k: int = DEFAULT_CHUNK_K
    taus: Sequence[float] = DEFAULT_TAUS
    eps_d: float = EPS_D
    spikes: str = "down"  # "down": inputs of the MLP down projections (the activations); "all": every linear
    massive_preset: str = "sun2024"
    log_at_start: bool = True  # also measure before the first optimizer step (step 0; no gradients)
    tensorboard: bool = True
    histograms: bool = True
    wandb: bool | None = None  # None: when wandb is installed and a run is active
    mlflow: bool | None = None  # None: when mlflow is installed and a run is active
    figures: bool = True  # draw the trend figures when training ends

    def check(self) -> None:
        """Refuse bad options before training starts (one-line ``ActsparseError`` with a fix)."""
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ActsparseError(f"every_n_steps={self.every_n_steps!r} must be a positive integer",
                                 f"use e.g. every_n_steps={DEFAULT_EVERY}", exit_code=2)
        names = [self.analyses] if isinstance(self.analyses, str) else list(self.analyses)
        for a in names:
            if a not in ANALYSES:
                raise unknown_name("analysis", a, ANALYSES)
        if not names:
            raise ActsparseError("no analysis chosen", f"use analyses= any of {', '.join(ANALYSES)}", exit_code=2)
        self.analyses = tuple(dict.fromkeys(names))
        if isinstance(self.calibration, str) and self.calibration not in CALIBRATION_KINDS:
            raise ActsparseError(f"calibration={self.calibration!r} is not a calibration source",
                                 "use calibration='corpus' (with data=...), 'eval', or a list of batches", exit_code=2)
        if self.batch_size < 1 or self.calibration_batches < 1:
            raise ActsparseError("batch_size and calibration_batches must be at least 1",
                                 "use batch_size=4, calibration_batches=4", exit_code=2)
        if self.spikes not in ("all", "down"):
            raise ActsparseError(f"spikes={self.spikes!r} is not a spikes mode", "use spikes='all' or 'down'",
                                 exit_code=2)

    def describe(self) -> dict[str, Any]:
        d = asdict(self) if not _is_iterable_batches(self.calibration) else {
            **{k: v for k, v in asdict(self).items() if k != "calibration"}, "calibration": "<batches given>"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _is_iterable_batches(c: Any) -> bool:
    return not isinstance(c, str) and c is not None


# ============================================================================ the model being trained
def wrap_model(model, tokenizer=None):
    """The training model as a ``probes.loading.LoadedModel`` (no copy; train/eval mode untouched)."""
    from probes.loading import LoadedModel

    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None) or "module"
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = "cpu", None
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or \
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, family=family, device=device, dtype=dtype,
                       is_causal_lm=bool(causal), is_encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
                       source={"training": True})


def as_batch(b: Any, device: Any):
    """A dataloader batch (dict or object with ``input_ids``) as a ``probes.corpus.Batch`` on ``device``;
    positions with ``attention_mask`` 0 never count."""
    import torch

    from probes.corpus import Batch

    get = b.get if isinstance(b, dict) else (lambda k, d=None: getattr(b, k, d))
    ids = get("input_ids")
    if ids is None or not torch.is_tensor(ids):
        raise ActsparseError("a calibration batch has no input_ids tensor",
                             "give batches as dicts with input_ids (and attention_mask), or use calibration='corpus'",
                             exit_code=2)
    att = get("attention_mask")
    att = torch.ones_like(ids) if att is None else att
    labels = get("labels")
    labels = torch.where(att.bool(), ids, torch.full_like(ids, -100)) if labels is None else labels
    return Batch(ids.to(device), att.to(device), att.bool().to(device), labels.to(device))


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout) for the body; every module's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _dist_context():
    """A ``probes.distributed.DistContext`` over torch.distributed's group when one is up (DDP), else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from probes import distributed

    return distributed.DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                                   local_rank=distributed.local_rank(), backend=dist.get_backend(), _open=True)


# ============================================================================ the monitor
class TrainingMonitor:
    """The framework-independent part of the callbacks: ``setup``, then per step ``begin_step`` /
    ``end_backward`` / ``after_step``, and ``close`` at the end."""

    def __init__(self, options: TrainingOptions | None = None, **kw: Any):
        opts = options or TrainingOptions(**kw)
        if options is not None and kw:
            raise TypeError("give either options= or keyword options, not both")
        opts.check()
        self.opts = opts
        self.out = Path(opts.output_dir)
        self._also = {int(s) for s in opts.also_at_steps}
        self.enabled = {a: a in opts.analyses for a in ANALYSES}
        self.disabled: dict[str, str] = {}  # analysis -> why (the one warning it gave)
        self.rows: dict[str, list[dict[str, Any]]] = {k: [] for k in ("sparsity", "spikes", "drift", "grad",
                                                                       "massive")}
        self.steps: list[int] = []
        self.grad_batches: dict[int, dict[str, Any]] = {}
        self.timing: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        self.loaded = None
        self.batches: list[Any] = []
        self.dist = None
        self.is_main = True
        self._grad: dict[str, Any] | None = None
        self._tb = None
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def setup(self, model, tokenizer=None, eval_batches: Iterable[Any] | None = None) -> None:
        """Once, before training: the model, the fixed calibration batches, the writers."""
        if self._ready:
            return
        self.loaded = wrap_model(model, tokenizer)
        self.dist = _dist_context()
        self.is_main = self.dist is None or self.dist.is_main
        opts = self.opts
        if any(self.enabled[a] for a in ("sparsity", "spikes", "massive")):
            self._guard("calibration", lambda: self._calibration(eval_batches))
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if opts.tensorboard:
                self._guard("tensorboard", self._open_tensorboard)
        self._ready = True

    def _calibration(self, eval_batches) -> None:
        import torch

        from probes.data import DataOptions, token_windows

        opts, lm = self.opts, self.loaded
        src = opts.calibration
        if src == "corpus":
            if lm.tokenizer is None:
                raise ActsparseError("calibration='corpus' needs the tokenizer",
                                     "pass tokenizer= (or processing_class= to the Trainer), or use "
                                     "calibration='eval'", exit_code=2)
            torch.manual_seed(opts.seed)
            td = token_windows(lm, DataOptions(data=opts.data, text_field=opts.text_field, encoding=opts.encoding,
                                               batch_size=opts.batch_size, max_length=opts.max_length,
                                               max_tokens=opts.max_tokens, seed=opts.seed),
                               causal=lm.is_causal_lm)
            self.batches = list(td.batches())
            self.info["calibration"] = {"source": "corpus", **td.describe(), "batch_size": opts.batch_size,
                                        "n_batches": len(self.batches),
                                        "same_as": "actsparse measure --data CORPUS --max-tokens N --max-length L "
                                                   "--batch-size B on a checkpoint of the same step"}
        else:
            given = eval_batches if src == "eval" else src
            if given is None:
                raise ActsparseError("calibration='eval' but no evaluation dataloader was there at the start of "
                                     "training", "pass calibration=trainer.get_eval_dataloader() (with "
                                     "trainer.add_callback), or use calibration='corpus'", exit_code=2)
            it = iter(given)
            batches = []
            limit = opts.calibration_batches if src == "eval" else math.inf
            while len(batches) < limit:
                try:
                    b = next(it)
                except StopIteration:
                    break
                batches.append(as_batch(b, lm.device))
            if not batches:
                raise ActsparseError("the calibration data gave no batches", "give at least one batch")
            self.batches = batches
            self.info["calibration"] = {"source": "eval dataloader" if src == "eval" else "batches given",
                                        "n_batches": len(batches),
                                        "n_counted_tokens": int(sum(int(b.count_mask.sum()) for b in batches)),
                                        "counted": "attention_mask 1 (padding never counts)"}
        self.info["calibration"]["n_counted_tokens"] = int(sum(int(b.count_mask.sum()) for b in self.batches))

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    # ------------------------------------------------------------------ safety
    def _guard(self, name: str, fn, *a):
        """Run ``fn``; on an exception warn once and disable ``name`` (never raise into the training loop)."""
        if name in self.disabled:
            return None
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - the training run must go on
            line = e.one_line() if isinstance(e, ActsparseError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            self.disabled[name] = line
            if name in self.enabled:
                self.enabled[name] = False
            if name == "calibration":
                for a in ("sparsity", "spikes", "massive"):
                    self.enabled[a] = False
            warnings.warn(f"actsparse: {name} failed and is disabled for the rest of this run: {line}",
                          ActsparseTrainingWarning, stacklevel=2)
            return None

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        return step > 0 and (step % self.opts.every_n_steps == 0 or step in self._also)

    # ------------------------------------------------------------------ gradients from the step's own backward
    def begin_step(self, model, step: int) -> None:
        """Before the forward of optimizer step ``step``: attach the gradient hooks if it is a logging step."""
        if self.enabled["grad"] and self.due(step) and self._grad is None:
            self._guard("grad", self._attach_grad, model, step)

    def _attach_grad(self, model, step: int) -> None:
        from probes.gradients import GradOptions, find_grad_sites, site_hooks
        from probes.hooks import HookState, hooks

        t0 = time.perf_counter()
        sites = getattr(self, "_grad_sites", None)
        if sites is None:
            lm = self.loaded
            sites = self._grad_sites = find_grad_sites(model, lm.family, lm.config)
        probes: dict = {}
        dims: dict = {}
        fwd, bwd = site_hooks(sites, probes, dims, GradOptions(taus=tuple(self.opts.taus), eps_d=self.opts.eps_d))
        state = HookState()
        g: dict[str, Any] = {"step": step, "sites": sites, "probes": probes, "state": state, "n_forwards": 0,
                             "n_sequences": 0, "n_tokens": 0}

        def begin(module, args, kwargs):  # the count mask of this micro-batch: attention_mask (padding never counts)
            att = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = att.bool() if att is not None and att.dim() == 2 else None
            state.begin(mask)
            g["n_forwards"] += 1
            if ids is not None and hasattr(ids, "shape"):
                g["n_sequences"] += int(ids.shape[0])
                g["n_tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
            return None

        def end(module, args, output):  # the forward is over: keep the calls per site (HookState.calls)
            state.end()

        stack = contextlib.ExitStack()
        try:
            for h in (model.register_forward_pre_hook(begin, with_kwargs=True), model.register_forward_hook(end)):
                stack.callback(h.remove)
            stack.enter_context(hooks(fwd, bwd, state))
        except BaseException:
            stack.close()
            raise
        g["stack"] = stack
        g["seconds"] = time.perf_counter() - t0
        self._grad = g

    def end_backward(self) -> None:
        """After the backward pass(es) of the step, before the optimizer step: remove the hooks."""
        g = self._grad
        if g is not None and "stack" in g:
            g.pop("stack").close()

    def _grad_rows(self, step: int) -> None:
        from probes import distributed
        from probes.vision import call_name

        g, self._grad = self._grad, None
        if g is None:
            return
        if "stack" in g:
            g.pop("stack").close()
        t0 = time.perf_counter()
        probes = g["probes"]
        state = g["state"]
        calls = dict(state.calls)
        batch = {"n_forwards": g["n_forwards"], "n_sequences": g["n_sequences"], "n_counted_tokens": g["n_tokens"]}
        if self.dist is not None:
            cpu = {k: distributed.probe_to_cpu(p) for k, p in probes.items()}
            probes, per_rank = self.dist.merge_probes(cpu, extra={"calls": calls, "batch": batch})
            calls = {}
            for e in per_rank:
                for n, k in e["calls"].items():
                    calls[n] = max(calls.get(n, 0), k)
            batch = {k: sum(e["batch"][k] for e in per_rank) for k in batch}
            batch["world_size"] = self.dist.world_size
        dtype = str(self.loaded.dtype).replace("torch.", "")
        for s in g["sites"]:
            n_calls = calls.get(s.canonical_name, 0)
            for k in range(n_calls):
                p = probes.get((s.canonical_name, k))
                if p is None:
                    continue
                self.rows["grad"].append({"step": step, **s.row(),
                                          "canonical_name": call_name(s.canonical_name, k, n_calls), "call": k,
                                          "dtype": dtype, **p.to_row()})
        self.grad_batches[step] = {**batch, "what": f"the training batch(es) of optimizer step {step}: its own "
                                                   "forward and backward (every gradient-accumulation micro-batch)"}
        self.timing["grad"] = self.timing.get("grad", 0.0) + g["seconds"] + time.perf_counter() - t0

    # ------------------------------------------------------------------ calibration analyses
    def after_step(self, model, step: int) -> None:
        """After optimizer step ``step`` (or with ``step`` 0 before training): measure if it is a logging step."""
        if not (self.due(step) or (step == 0 and self.opts.log_at_start)):
            return
        if self._grad is not None:
            self._guard("grad", self._grad_rows, step)
        self._grad = None
        if step in self.steps:
            return
        self.steps.append(step)
        new: dict[str, list[dict[str, Any]]] = {k: [] for k in self.rows}
        before = {k: len(v) for k, v in self.rows.items()}
        if self.enabled["sparsity"] or self.enabled["spikes"]:
            self._guard("sparsity" if self.enabled["sparsity"] else "spikes", self._forward_probes, model, step)
        # weights are the same on every rank, and massive runs its own preset: rank 0 alone (no collective)
        if self.enabled["drift"] and self.is_main:
            self._guard("drift", self._drift, model, step)
        if self.enabled["massive"] and self.is_main:
            self._guard("massive", self._massive, model, step)
        for k in self.rows:
            new[k] = self.rows[k][before[k]:]
        new["grad"] = [r for r in self.rows["grad"] if r["step"] == step]
        if self.is_main:
            self._guard("logging", self._log, step, new)
            self._guard("output", self._write, False)

    def _forward_probes(self, model, step: int) -> None:
        """One pass over the calibration batches: activation sparsity at the sites, spikes at linear inputs."""
        from probes import distributed
        from probes.runner import TokenBatches, run, token_layout
        from probes.sites import find_sites
        from probes.sparsity import ActivationSparsityProbe
        from probes.spikes import spike_hooks, spike_rows

        t0 = time.perf_counter()
        opts, lm = self.opts, self.loaded
        sites = getattr(self, "_sites", None)
        if sites is None:
            sites = self._sites = find_sites(model, lm.family, opts.kinds)
        act: dict[str, Any] = {}
        spk: dict[str, Any] = {}

        def observe(x, hc) -> None:
            x, m = token_layout(hc.site, x, hc.mask)
            p = act.get(hc.site.canonical_name)
            if p is None:
                p = act[hc.site.canonical_name] = ActivationSparsityProbe(int(x.shape[-1]), opts.eps_grid,
                                                                          opts.chunk_k, device=x.device)
            p.update(x.detach(), m)

        fwd = [(s, observe) for s in sites] if self.enabled["sparsity"] else []
        down = set()
        if self.enabled["spikes"]:
            if opts.spikes == "down":
                from probes.grad_sites import find_grad_sites

                down = {s.down_module_path for s in find_grad_sites(model, lm.family, lm.config) if s.down_module_path}
            fwd += spike_hooks(model, opts.spikes, down, spk)
        batches = self.batches if self.dist is None else self.batches[self.dist.rank::self.dist.world_size]
        with _eval_mode(model):
            run(model, batches, fwd_hooks=fwd, adapter=TokenBatches(is_encoder_decoder=lm.is_encoder_decoder))
        if self.dist is not None:
            merged, _ = self.dist.merge_probes({**{("a", k): v for k, v in act.items()},
                                                **{("s", k): v for k, v in spk.items()}})
            act = {k[1]: v for k, v in merged.items() if k[0] == "a"}
            spk = {k[1]: v for k, v in merged.items() if k[0] == "s"}
        dtype = str(lm.dtype).replace("torch.", "")
        for s in sites:
            p = act.get(s.canonical_name)
            if p is not None:
                self.rows["sparsity"].append({"step": step, **s.row(), "dtype": dtype, **p.to_row()})
        self.rows["spikes"] += [{"step": step, **r} for r in spike_rows(spk, down, dtype)]
        self._last_act = act
        self.timing["calibration_forward"] = self.timing.get("calibration_forward", 0.0) + time.perf_counter() - t0

    def _drift(self, model, step: int) -> None:
        from probes.drift import layer_of, tensor_kind, tensor_role, weight_stats

        t0 = time.perf_counter()
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.dim() < 2:
                continue
            kind = tensor_kind(name, p.dim())
            self.rows["drift"].append({"step": step, "name": name, "kind": kind,
                                       "role": tensor_role(name) if kind == "linear" else kind,
                                       "layer": layer_of(name), "shape": "x".join(str(s) for s in p.shape),
                                       "dtype": str(p.dtype).replace("torch.", ""), **weight_stats(p.detach())})
        self.timing["drift"] = self.timing.get("drift", 0.0) + time.perf_counter() - t0

    def _massive(self, model, step: int) -> None:
        from probes.massive import MassiveOptions, massive

        t0 = time.perf_counter()
        opts = self.opts
        if self.loaded.tokenizer is None:
            raise ActsparseError("the massive analysis needs the tokenizer", "pass tokenizer=, or drop 'massive'")
        with _eval_mode(model):
            res = massive(self.loaded, MassiveOptions(preset=opts.massive_preset, data=opts.data,
                                                      text_field=opts.text_field, encoding=opts.encoding,
                                                      max_length=opts.max_length, max_tokens=opts.max_tokens))
        self.rows["massive"] += [{"step": step, **r} for r in res.layers]
        self.info["massive"] = {k: res.info.get(k) for k in ("preset", "protocol", "n_sequences", "n_counted_tokens")}
        self.timing["massive"] = self.timing.get("massive", 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ tables
    def tables(self) -> dict[str, Any]:
        """The long tables (one row per step and site / tensor), named as ``actsparse track`` names them."""
        import pandas as pd

        from probes.track import CheckpointStep, _drift_by_role, _emergence_fits, _trends

        steps = sorted(self.steps)
        index = {s: i for i, s in enumerate(steps)}
        cks = [CheckpointStep(f"{self.out}@step-{s}", s, "training callback") for s in steps]

        def long(rows):
            if not rows:
                return None
            df = pd.DataFrame(rows)
            df.insert(1, "checkpoint_index", df["step"].map(index))
            df.insert(2, "checkpoint", df["checkpoint_index"].map(lambda i: cks[int(i)].path))
            return df

        t: dict[str, Any] = {}
        sp = long(self.rows["sparsity"])
        if sp is not None:
            t["trend_sparsity"] = sp
        dr = long(self.rows["drift"])
        if dr is not None:
            t["trend_weights"] = dr
            t["trend_drift"] = _drift_by_role(dr)
        ma = long(self.rows["massive"])
        if ma is not None:
            t["trend_massive"] = ma
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t["emergence_fit"] = pd.DataFrame(_emergence_fits(ma))
        for name, key in (("trend_spikes", "spikes"), ("trend_gradients", "grad")):
            df = long(self.rows[key])
            if df is not None:
                t[name] = df
        tokens = {}
        if sp is not None:
            tok = int(self.info.get("calibration", {}).get("n_counted_tokens") or 0)
            tokens = {i: tok for i in range(len(steps))}
        trends = _trends(cks, t, tokens)
        gr = t.get("trend_gradients")
        if gr is not None and len(trends):
            for kind, h in gr.groupby("kind", sort=False):
                m = h.groupby("step")
                trends[f"deriv_sparsity_mean_{kind}"] = trends["step"].map(m["deriv_sparsity"].mean())
                col = f"eff_grad_sparsity@{DEFAULT_TAUS[1]:g}"
                if col in h:
                    trends[f"eff_grad_sparsity@{DEFAULT_TAUS[1]:g}_mean_{kind}"] = trends["step"].map(m[col].mean())
        sk = t.get("trend_spikes")
        if sk is not None and len(trends):
            trends["spike_max_max"] = trends["step"].map(sk.groupby("step")["spike_max"].max())
        return {"trends": trends, **t}

    def manifest_info(self) -> dict[str, Any]:
        steps = sorted(self.steps)
        cal = self.info.get("calibration", {})
        return {"analyses": [a for a in ANALYSES if a in self.opts.analyses], "n_checkpoints": len(steps),
                "steps": steps, "checkpoints": [{"path": f"{self.out}@step-{s}", "step": s,
                                                 "step_source": "training callback"} for s in steps],
                "live": "measured during training by probes.training (the model in memory after each logged "
                        "optimizer step)", "every_n_steps": self.opts.every_n_steps,
                **({"corpus": cal.get("corpus"), "corpus_is_default": cal.get("corpus_is_default"),
                    "n_counted_tokens_per_checkpoint": cal.get("n_counted_tokens"),
                    "n_counted_tokens": cal.get("n_counted_tokens"), "max_length": cal.get("max_length"),
                    "n_windows": cal.get("n_windows"), "window_scheme": cal.get("window_scheme")} if cal else {}),
                "calibration": cal,
                "gradients": {"source": "the training step's own backward pass (hooks attached only on logging steps, "
                                        "removed before the optimizer step)",
                              "loss": "the loss the trainer minimises: a mean over the step's loss targets (the "
                                      "reference protocol, cdgyp/sparsity EffectiveGradientSparsity)",
                              "dropout": "active (training mode), as in the step itself",
                              "taus": list(self.opts.taus), "eps_d": self.opts.eps_d,
                              "grad_batches": {str(k): v for k, v in sorted(self.grad_batches.items())}},
                "world_size": self.dist.world_size if self.dist is not None else 1,
                "disabled": dict(self.disabled),
                "seconds": {k: round(v, 3) for k, v in self.timing.items()},
                **({"massive": self.info["massive"], "massive_preset": self.opts.massive_preset}
                   if "massive" in self.info else {})}

    def _write(self, figures: bool) -> None:
        from probes.analysis import load

        t0 = time.perf_counter()
        load(WRITER)(self.out / "trends", self.tables(), self.manifest_info(), self.opts.describe(), figures=figures)
        self.timing["write"] = self.timing.get("write", 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ logging
    def scalars(self, step: int, new: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
        """The scalars of one logged step: per layer and model-level, as ``actsparse/...`` tags."""
        out: dict[str, float] = {}

        def put(tag, v):
            try:
                v = float(v)
            except (TypeError, ValueError):
                return
            if math.isfinite(v):
                out[tag] = v

        def per_kind(rows, metrics, prefix):
            by_kind: dict[str, list] = {}
            for r in rows:
                by_kind.setdefault(str(r.get("kind")), []).append(r)
            for kind, rs in by_kind.items():
                for m in metrics:
                    vals = [float(r[m]) for r in rs if r.get(m) is not None and r[m] == r[m]]
                    for r in rs:
                        if r.get("layer") is not None and r.get(m) is not None:
                            put(f"actsparse/{prefix}/{kind}/{m}/layer_{int(r['layer']):02d}"
                                + (f"_call{r['call']}" if r.get("call") else ""), r[m])
                    if vals:
                        put(f"actsparse/{prefix}/{kind}/{m}/mean", sum(vals) / len(vals))

        per_kind(new["sparsity"], ("zero_frac", "nonzero_pct_per_token", "dead_frac"), "sparsity")
        per_kind(new["grad"], ("deriv_sparsity", f"eff_grad_sparsity@{DEFAULT_TAUS[1]:g}"), "grad")
        for r in new["spikes"]:
            put(f"actsparse/spikes/spike_ratio_nonzero_batchmedian/{r['module_path']}",
                r["spike_ratio_nonzero_batchmedian"])
        if new["spikes"]:
            put("actsparse/spikes/spike_max/max", max(float(r["spike_max"]) for r in new["spikes"]))
        if new["drift"]:
            lin = [r for r in new["drift"] if r["kind"] in ("linear", "conv")]
            for role in sorted({r["role"] for r in lin}) + ["all_linear"]:
                rs = lin if role == "all_linear" else [r for r in lin if r["role"] == role]
                n = sum(r["n"] for r in rs)
                if n:
                    put(f"actsparse/drift/{role}/mean_weighted", sum(r["mean"] * r["n"] for r in rs) / n)
                    put(f"actsparse/drift/{role}/neg_pct_weighted", sum(r["neg_pct"] * r["n"] for r in rs) / n)
            for r in lin:
                put(f"actsparse/drift_tensor/{r['name']}/mean", r["mean"])
                put(f"actsparse/drift_tensor/{r['name']}/neg_pct", r["neg_pct"])
        res = [r for r in new["massive"] if r.get("kind") == "resid_post"]
        for r in res:
            put(f"actsparse/massive/resid_post/ratio_top1_median/layer_{int(r['layer']):02d}", r["ratio_top1_median"])
        if res:
            put("actsparse/massive/resid_post/ratio_top1_median/max", max(float(r["ratio_top1_median"]) for r in res))
        return out

    def _log(self, step: int, new: dict[str, list[dict[str, Any]]]) -> None:
        sc = self.scalars(step, new)
        if self._tb is not None and "tensorboard" not in self.disabled:
            self._guard("tensorboard", self._tensorboard, step, sc)
        if self.opts.wandb is not False:
            self._guard("wandb", self._wandb, step, sc)
        if self.opts.mlflow is not False:
            self._guard("mlflow", self._mlflow, step, sc)

    def _tensorboard(self, step: int, sc: dict[str, float]) -> None:
        tb = self._tb
        for tag, v in sc.items():
            tb.add_scalar(tag, v, step)
        if self.opts.histograms:
            for name, p in (getattr(self, "_last_act", None) or {}).items():
                n = int(p.state["n_tokens"])
                if n:
                    tb.add_histogram(f"actsparse/firing_rate/{name}", (p.state["channel_active"].double() / n).cpu(),
                                     step)
            self._last_act = None
            if self.enabled["drift"] and self.loaded is not None:
                from probes.drift import tensor_role

                for name, w in self.loaded.model.named_parameters():
                    if w.dim() >= 2 and tensor_role(name) in ("mlp_up", "mlp_down"):
                        tb.add_histogram(f"actsparse/weights/{name}", w.detach().float().cpu(), step)
        tb.flush()

    def _wandb(self, step: int, sc: dict[str, float]) -> None:
        try:
            import wandb  # noqa: PLC0415
        except ImportError:
            return
        if getattr(wandb, "run", None) is None:
            if self.opts.wandb:
                raise ActsparseError("wandb=True but no wandb run is active", "call wandb.init() first, or wandb=None")
            return
        wandb.log({**sc, "actsparse/step": step}, commit=False)

    def _mlflow(self, step: int, sc: dict[str, float]) -> None:
        try:
            import mlflow  # noqa: PLC0415
        except ImportError:
            return
        if mlflow.active_run() is None:
            if self.opts.mlflow:
                raise ActsparseError("mlflow=True but no MLflow run is active",
                                     "call mlflow.start_run() first, or mlflow=None")
            return
        import re

        mlflow.log_metrics({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in sc.items()}, step=step)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """At the end of training: the last write, with the trend figures; close the TensorBoard writer."""
        if self._grad is not None and "stack" in self._grad:
            self._grad.pop("stack").close()
        self._grad = None
        if self.is_main and self.steps:
            self._guard("output", self._write, self.opts.figures)
        if self._tb is not None:
            with contextlib.suppress(Exception):
                self._tb.close()
            self._tb = None


# ============================================================================ transformers.Trainer
def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class ActsparseCallback(_trainer_callback_base()):
    """``transformers.Trainer`` callback: ``Trainer(..., callbacks=[ActsparseCallback(output_dir="runs/x/actsparse",
    every_n_steps=100)])``. Options: ``TrainingOptions`` (by keyword, or ``options=``)."""

    def __init__(self, options: TrainingOptions | None = None, *, tokenizer=None, **kw: Any):
        self.monitor = TrainingMonitor(options, **kw)
        self.tokenizer = tokenizer

    def on_train_begin(self, args, state, control, model=None, processing_class=None, eval_dataloader=None, **kw):
        tok = self.tokenizer or processing_class or kw.get("tokenizer")
        m = self.monitor
        eval_batches = eval_dataloader
        if m.opts.calibration == "eval" and eval_batches is None:
            trainer_eval = getattr(kw.get("trainer", None), "get_eval_dataloader", None)
            eval_batches = trainer_eval() if trainer_eval else None
        m.setup(model, tok, eval_batches)
        if m.opts.log_at_start and state.global_step == 0:
            m.after_step(model, 0)

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.monitor.begin_step(model, state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.monitor.end_backward()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.monitor.after_step(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.monitor.close()


# ============================================================================ Lightning
def _lightning_callback_base():
    try:
        from lightning.pytorch.callbacks import Callback
        return Callback
    except ImportError:
        try:
            from pytorch_lightning.callbacks import Callback
            return Callback
        except ImportError:
            return None


class _LightningHooks:
    """Lightning callback with the options of ``ActsparseCallback``: ``L.Trainer(callbacks=[
    ActsparseLightningCallback(output_dir=..., tokenizer=tok)])``. ``calibration="eval"`` takes the
    trainer's validation dataloader. Needs ``pip install 'actsparse[lightning]'``; Lightning is imported
    only when this class is first used (``from probes.training import ActsparseLightningCallback``)."""

    def __init__(self, options: TrainingOptions | None = None, *, tokenizer=None, **kw: Any):
        super().__init__()
        self.monitor = TrainingMonitor(options, **kw)
        self.tokenizer = tokenizer

    @staticmethod
    def _model(pl_module):
        import torch

        inner = getattr(pl_module, "model", None)  # a LightningModule wrapping a transformers model
        return inner if isinstance(inner, torch.nn.Module) else pl_module

    def on_train_start(self, trainer, pl_module):
        m = self.monitor
        eval_batches = None
        if m.opts.calibration == "eval":
            vd = getattr(trainer, "val_dataloaders", None)
            eval_batches = vd[0] if isinstance(vd, (list, tuple)) and vd else vd
        m.setup(self._model(pl_module), self.tokenizer or getattr(pl_module, "tokenizer", None), eval_batches)
        if m.opts.log_at_start and trainer.global_step == 0:
            m.after_step(self._model(pl_module), 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        acc = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if batch_idx % acc == 0:
            self.monitor.begin_step(self._model(pl_module), trainer.global_step + 1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.monitor.end_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        acc = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if (batch_idx + 1) % acc == 0:
            self.monitor.after_step(self._model(pl_module), trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self.monitor.close()


_LIGHTNING_CLASS: list = []


def __getattr__(name: str):  # PEP 562: build the Lightning callback (and import Lightning) on first use
    if name != "ActsparseLightningCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _LIGHTNING_CLASS:
        base = _lightning_callback_base()
        if base is None:
            raise ActsparseError("ActsparseLightningCallback needs Lightning", "pip install 'actsparse[lightning]'")
        _LIGHTNING_CLASS.append(type("ActsparseLightningCallback", (_LightningHooks, base),
                                     {"__module__": __name__, "__doc__": _LightningHooks.__doc__}))
    return _LIGHTNING_CLASS[0]


__all__ = ["ANALYSES", "DEFAULT_ANALYSES", "ActsparseCallback", "ActsparseLightningCallback",
           "ActsparseTrainingWarning", "TrainingMonitor", "TrainingOptions"]
