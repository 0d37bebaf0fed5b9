#!/usr/bin/env python
"""Probe overhead: forward passes with no hooks vs with every activation probe attached.

Same model, same batches, one process; the two variants are interleaved (ABBA order) so drift
in machine load hits both alike, and the verdict is the median of the paired ratios (probed pass /
the bare pass next to it). Targets (issue 16, goal 3): all probes
on <= 1.10x the bare forward time on the bundled model (<= 1.15x on a GLU model with both default
sites per layer, ``--model glu``), and probe memory flat when the token count grows 10x. The probes
are built as ``actsparse measure`` builds them (window tags for the error bars included).

Model: the project's embedded checkpoint (``probes.embedded.default_checkpoint()``) when it is
there, else a freshly initialised GPT-2-small-like model (d_model 768, d_ff 3072, ReLU) at
reduced depth with a byte-level BPE tokenizer trained on the calibration corpus. ``glu``: a
freshly initialised Llama-style model (SiLU gate; d_model 512, d_ff 1536, 4 layers by default)
with the embedded checkpoint's tokenizer. Corpus: the embedded calibration corpus. ``--model``
picks one explicitly or names a checkpoint path.

    HF_HUB_OFFLINE=1 python benchmarks/bench_probes.py [--model auto|embedded|gpt2-small-relu|glu|PATH]
        [--batch-size 8] [--max-length 256] [--n-batches 4] [--repeats 7] [--mem-tokens 4096]
        [--profile] [--baseline-probe OLD_SPARSITY_PY] [--json out.json] [--processes N]
        [--malloc command|default]

``--processes N`` runs the timing in N fresh processes and takes the median of their paired ratios: within one
process the ABBA pairs share a heap and cache state, which moved the figure by +-5 % from process to process
on a 2-core VM.

``--malloc command`` (the default) sets glibc's mmap and trim thresholds at the start as ``actsparse measure`` does
for a CPU run (``probes.malloc_policy``), so both variants run with the process settings a user's command has;
``--malloc default`` leaves glibc's own (freed activations returned to the system and faulted in again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from probes import corpus as corpus_mod  # noqa: E402
from probes.runner import forward_batch, run_probes  # noqa: E402
from probes.measure import DEFAULT_KINDS  # noqa: E402
from probes.sites import find_sites  # noqa: E402
from probes.sparsity import ActivationSparsityProbe  # noqa: E402
from probes.uncertainty import WindowTags  # noqa: E402

TARGET_RATIO = 1.10  # issue 16 goal 3: the bundled (embedded) model and other ReLU models
TARGET_RATIO_GLU = 1.15  # ... a GLU model with both default sites per layer (mlp_post, mlp_gate_act)


# ------------------------------------------------------------------ model and data
def _calibration_corpus() -> str:
    try:
        from probes.embedded import default_corpus

        return default_corpus()
    except Exception:  # embedded module missing in an older tree
        return str(ROOT / "probes" / "data" / "calibration.txt")


def _gpt2_small_relu(n_layer: int, corpus: str, device):
    """A GPT-2-small-shaped model (random weights, ReLU) and a BPE tokenizer trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=[eot], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([Path(corpus).read_text(encoding="utf-8")], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, pad_token=eot, unk_token=eot)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=n_layer, n_head=12, n_inner=3072,
                     activation_function="relu", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval().to(device)
    return model, tok, "gpt2", f"gpt2-small-relu (random init, {n_layer} layers, d_model 768, d_ff 3072)"


def _glu(n_layer: int, d_model: int, d_ff: int, device):
    """A Llama-style GLU model (random init, SiLU gate; sites ``mlp_post`` and ``mlp_gate_act`` per layer)
    sized so that the MLP matters, with the embedded checkpoint's tokenizer (word level)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from probes.embedded import default_checkpoint
    from probes.loading import load_checkpoint

    tok = load_checkpoint(default_checkpoint(), device="cpu", dtype="float32").tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layer,
                      num_attention_heads=max(1, d_model // 64), num_key_value_heads=max(1, d_model // 64),
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id or 0,
                      bos_token_id=tok.bos_token_id or 0, eos_token_id=tok.eos_token_id or 0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().to(device)
    return model, tok, "llama", (f"glu (Llama-style, random init, {n_layer} layers, d_model {d_model}, d_ff {d_ff}, "
                                 "SiLU gate)")


def load_model(spec: str, n_layer: int, corpus: str, device, d_model: int = 512, d_ff: int = 1536):
    from probes.loading import load_checkpoint

    if spec == "glu":
        return _glu(n_layer, d_model, d_ff, device)

    if spec == "auto":
        try:
            from probes.embedded import default_checkpoint

            spec = default_checkpoint()
        except Exception:
            spec = "gpt2-small-relu"
    elif spec == "embedded":
        from probes.embedded import default_checkpoint

        spec = default_checkpoint()
    if spec == "gpt2-small-relu":
        return _gpt2_small_relu(n_layer, corpus, device)
    lm = load_checkpoint(spec, device=str(device), dtype="float32")
    return lm.model, lm.tokenizer, lm.family, spec


def make_batches(tok, corpus: str, max_length: int, batch_size: int, n_tokens: int, device):
    wins = corpus_mod.corpus_windows(corpus, tok, max_length, max_tokens=n_tokens).windows
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return list(corpus_mod.batches(wins, batch_size, pad, device)), corpus_mod.n_counted(wins)


# ------------------------------------------------------------------ timing
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TAGS = WindowTags()  # as in probes.measure: every batch row tagged with its global window index


def make_probe(site, width, device, cls=ActivationSparsityProbe):
    return cls(width, device=device, tags=TAGS)


def load_baseline(path: str):
    """``ActivationSparsityProbe`` from another version of ``probes/sparsity.py`` (``--baseline-probe``), e.g.
    ``git show HEAD:probes/sparsity.py > /tmp/sparsity_before.py``: timed in the same process, interleaved."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_sparsity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ActivationSparsityProbe


def tagged(batches):
    """The batches with ``TAGS`` following them (window ids 0.. in order), as ``measure`` runs them."""
    bs = max((int(b.input_ids.shape[0]) for b in batches), default=1)
    return TAGS.follow(batches, range(sum(int(b.input_ids.shape[0]) for b in batches)), bs)


def time_bare(model, batches, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            forward_batch(model, b)
    _sync(device)
    return time.perf_counter() - t0


def time_probed(model, batches, sites, device, cls=ActivationSparsityProbe):
    _sync(device)
    t0 = time.perf_counter()
    probes = run_probes(model, tagged(batches), sites, lambda s, w, d: make_probe(s, w, d, cls))
    _sync(device)
    return time.perf_counter() - t0, probes


def timing(model, batches, sites, device, repeats: int, target: float = TARGET_RATIO, baseline=None) -> dict:
    time_bare(model, batches, device)  # warm-up: allocator, kernels, lazy inits
    time_probed(model, batches, sites, device)
    variants = ["bare", "probed"] + (["baseline"] if baseline is not None else [])
    if baseline is not None:
        time_probed(model, batches, sites, device, baseline)
    out = {v: [] for v in variants}
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # ABBA (ABC CBA with a baseline probe)
        for which in order:
            if which == "bare":
                out[which].append(time_bare(model, batches, device))
            else:
                out[which].append(time_probed(model, batches, sites, device,
                                              ActivationSparsityProbe if which == "probed" else baseline)[0])
    bare, probed = out["bare"], out["probed"]
    extra = {}
    if baseline is not None:
        base = out["baseline"]
        extra = {"baseline_s": base, "baseline_median_s": statistics.median(base),
                 "baseline_paired_ratio_median": statistics.median(p / b for p, b in zip(base, bare)),
                 "baseline_ratio_of_minimums": min(base) / min(bare)}
    mb, mp = statistics.median(bare), statistics.median(probed)
    paired = statistics.median(p / b for p, b in zip(probed, bare))
    # On a shared machine the load swings within a run: the paired ratio (each probed pass over the bare pass
    # next to it, ABBA) is the verdict; the ratio of the minimums (each variant's least disturbed pass) beside it.
    return {"bare_s": bare, "probed_s": probed, "bare_median_s": mb, "probed_median_s": mp,
            "ratio": mp / mb, "paired_ratio_median": paired, "ratio_of_minimums": min(probed) / min(bare),
            "target_ratio": target, "meets_target": paired <= target, **extra}


# ------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def state_bytes(probes: dict) -> int:
    return sum(t.nbytes for p in probes.values() for t in p.state.values())


_LIBC = None


def _exact_rss_mode() -> bool:
    """glibc: serve every allocation >= 128 KiB by mmap (fixed threshold, no dynamic growth), so a freed
    tensor leaves the process at once and peak RSS tracks live memory rather than heap layout."""
    global _LIBC
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        ok = libc.mallopt(m_mmap_threshold, 128 * 1024) == 1
        _LIBC = libc if ok else None
        _trim()
        return ok
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    """Give free heap pages back (glibc ``malloc_trim``), so the next peak starts from live memory."""
    import gc

    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _peak_delta(run, device) -> tuple[int | None, object]:
    """Peak memory above the starting point while ``run()`` executes (RSS on CPU, allocator on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    _trim()
    ok = _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    out = run()
    hwm = _status_kb("VmHWM")
    return ((hwm - rss0) * 1024 if ok and hwm is not None and rss0 is not None else None), out


def memory(model, tok, corpus, sites, args, device) -> list[dict]:
    """Probe state and peak memory for N and 10N tokens, with the same batch shapes in both runs.

    ``probe_state_bytes`` is exact (sum of the state tensors' nbytes). The peak deltas include the
    forward pass's own activations and allocator caching, so the bare forward's peak over the same
    batches is reported beside the probed one; their difference is what the probes add.
    """
    exact = device.type == "cpu" and _exact_rss_mode()
    bs = args.mem_batch_size
    n = max(args.mem_tokens // (bs * args.max_length), 1) * bs * args.max_length  # whole batches only
    out = []
    for tokens in (n, 10 * n):
        batches, counted = make_batches(tok, corpus, args.max_length, bs, tokens, device)
        with torch.inference_mode():
            forward_batch(model, batches[0])  # warm the allocator with this batch shape
        bare_peak, _ = _peak_delta(lambda b=batches: time_bare(model, b, device), device)
        probed_peak, probes = _peak_delta(lambda b=batches: run_probes(model, tagged(b), sites, make_probe), device)
        out.append({"tokens": counted, "n_batches": len(batches), "batch_size": bs, "n_probes": len(probes),
                    "probe_state_bytes": state_bytes(probes), "peak_delta_bare_bytes": bare_peak,
                    "peak_delta_probed_bytes": probed_peak, "peak_kind": "cuda allocator" if device.type == "cuda"
                    else "process RSS (VmHWM)" + (", glibc mmap threshold 128 KiB" if exact else "")})
        batches = probes = None  # free them before the 10x run
    return out


# ------------------------------------------------------------------ where update() spends its time
def profile_update(model, batches, sites, device, top: int = 15) -> dict:
    """Capture each site's tensor for the batches once, then profile ``ActivationSparsityProbe.update`` alone."""
    from probes.hooks import attach_sites

    captured = []
    current = {}

    def grab(site, x):
        captured.append((site.canonical_name, x.detach().clone(), current["mask"]))

    with torch.inference_mode(), attach_sites(sites, grab):
        for b in batches:
            current["mask"] = b.count_mask
            forward_batch(model, b)
    probes = {name: ActivationSparsityProbe(x.shape[-1], device=x.device) for name, x, _ in captured}

    def run_all():
        for name, x, m in captured:
            probes[name].update(x, m)

    run_all()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    run_all()
    _sync(device)
    total = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run_all()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key.replace("cuda", "device"), getattr(e, key, 0)))
    ops = []
    for e in rows[:top]:
        t = getattr(e, key.replace("cuda", "device"), None) or getattr(e, key, 0)
        ops.append({"op": e.key, "calls": e.count, "self_ms": t / 1000})
    sections = _manual_sections(captured, device)
    return {"update_total_s": total, "n_updates": len(captured), "top_ops": ops, "sections_s": sections,
            "relu_pass_s": _relu_pass_sections(model, batches, sites)}


def _relu_pass_sections(model, batches, sites) -> dict:
    """The path ``run_probes`` takes at sites counted in their ReLU's pass (``probes.relu_pass``): each ReLU's input
    captured once, then the pass (``relu_counted``: the ReLU and the count), the site's taking of its output
    (``take_relu_pass``) and the adding after the forward (``flush``), timed apart. Empty where no site takes it."""
    from probes import relu_pass

    taken = relu_pass.plan(model, sites, lambda n: None)
    if not taken:
        return {}
    inputs, current = [], {}
    handles = [m.register_forward_pre_hook(lambda mod, args, _s=site: inputs.append(
        (_s.canonical_name, args[0].detach().clone(), current["mask"]))) for site, m in taken]
    try:
        with torch.inference_mode():
            for b in batches:
                current["mask"] = b.count_mask
                forward_batch(model, b)
    finally:
        for h in handles:
            h.remove()
    probes = {name: ActivationSparsityProbe(x.shape[-1], device=x.device) for name, x, _ in inputs}
    t = {"relu_pass (ReLU + count)": 0.0, "take (at the site's hook)": 0.0, "flush (after the forward)": 0.0}
    for rep in range(2):  # the first round warms up
        for name, x, m in inputs:
            p = probes[name]
            with torch.inference_mode():
                c0 = time.perf_counter()
                y = p.relu_counted(x, m)
                c1 = time.perf_counter()
                p.take_relu_pass(y, m)
                c2 = time.perf_counter()
                p.flush()
                c3 = time.perf_counter()
            if rep:
                t["relu_pass (ReLU + count)"] += c1 - c0
                t["take (at the site's hook)"] += c2 - c1
                t["flush (after the forward)"] += c3 - c2
    return t


def _manual_sections(captured, device) -> dict:
    """The steps of ``update`` timed one by one (the probe's own helpers, in order) over all captured tensors."""
    from probes import sparsity as sp

    if not hasattr(ActivationSparsityProbe, "_planes"):  # an older probe (a "before" run): no such steps
        return {}
    if captured:
        first = captured[0][1]
        if hasattr(sp, "_native_ok") and sp._native_ok(first.reshape(-1, first.shape[-1]).float(), 3):
            return _native_sections(captured, device)
    t = dict.fromkeys(("mask_select", "abs_max", "count_planes", "chunks", "channel_active", "sums_f32_f64",
                       "window_rows_hist"), 0.0)

    def tick(name, t0):
        _sync(device)
        t[name] += time.perf_counter() - t0
        return time.perf_counter()

    for probe, x, full, lens, valid, mask_s in _updates(captured):
        t["mask_select"] += mask_s
        c = time.perf_counter()
        a = valid.abs()
        amax = a.max()
        bool(torch.isfinite(amax))
        c = tick("abs_max", c)
        per_token, zero = probe._planes(valid, a)
        c = tick("count_planes", c)
        probe._update_chunks(zero, lens)
        c = tick("chunks", c)
        zero.sum(0)
        c = tick("channel_active", c)
        valid.sum(1).double().sum()
        a.sum(1).double().sum()
        torch.linalg.vecdot(valid, valid).double().sum()
        c = tick("sums_f32_f64", c)
        sp._window_sums(per_token, lens, full)
        frac = (x.shape[-1] - per_token[0]).double() / x.shape[-1]
        torch.bincount((frac * 1000).long().clamp_(0, 999), minlength=1000)
        tick("window_rows_hist", c)
    return t


def _updates(captured):
    """Per captured 3-D tensor: ``(probe, x, full_rows, lens, valid, seconds of the mask step)``, one probe per
    width, with ``update``'s own mask layout and row selection."""
    from probes import sparsity as sp

    probe = None
    for _, x, m in captured:
        if x.dim() != 3:
            continue
        if probe is None or probe.width != x.shape[-1]:
            probe = ActivationSparsityProbe(x.shape[-1], device=x.device)
        c = time.perf_counter()
        full, mm, lens = sp._mask_layout(m, x)
        valid = x.reshape(-1, x.shape[-1]) if full else x[mm]
        yield probe, x, full, lens, valid, time.perf_counter() - c


def _native_sections(captured, device) -> dict:
    """The steps of ``update`` on the fused-kernel path (``probes.fastcount``), timed one by one."""
    from probes import fastcount
    from probes.sparsity import HIST_BINS

    t = dict.fromkeys(("mask_select", "native_kernel_and_state", "window_rows (after the forward)"), 0.0)
    for probe, x, full, lens, valid, mask_s in _updates(captured):
        t["mask_select"] += mask_s
        c2 = time.perf_counter()
        rows, _ = fastcount.accumulate(valid, probe.eps_grid, lens, probe.chunk_k, torch.get_num_threads(), HIST_BINS,
                                       probe._state_addresses())
        c3 = time.perf_counter()
        t["native_kernel_and_state"] += c3 - c2
        probe._add_windows(rows, lens)
        t["window_rows (after the forward)"] += time.perf_counter() - c3
    return t


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="auto", help="auto | embedded | gpt2-small-relu | glu | checkpoint path")
    ap.add_argument("--layers", type=int, default=4, help="depth of the gpt2-small-relu and glu models")
    ap.add_argument("--d-model", type=int, default=512, help="hidden size of the glu model")
    ap.add_argument("--d-ff", type=int, default=1536, help="MLP width of the glu model")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--n-batches", type=int, default=2, help="batches per timed pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of each variant (interleaved)")
    ap.add_argument("--mem-tokens", type=int, default=1024, help="N for the N vs 10N memory check "
                    "(rounded down to whole batches)")
    ap.add_argument("--mem-batch-size", type=int, default=2, help="batch size of the memory check")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="site kinds to probe (default: measure's)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--baseline-probe", default=None, metavar="FILE", help="another version of probes/sparsity.py "
                    "(e.g. from git show HEAD:probes/sparsity.py): its probe is timed too, interleaved with the others")
    ap.add_argument("--profile", action="store_true", help="profile ActivationSparsityProbe.update (always done "
                    "when the ratio misses the target)")
    ap.add_argument("--only", choices=("all", "timing", "memory"), default="all", help="run one part only")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here ('-' = stdout)")
    ap.add_argument("--malloc", choices=("command", "default"), default="command", help="command: glibc's "
                    "mmap / trim thresholds as `actsparse measure` sets them on the CPU (probes.malloc_policy), for "
                    "both variants; default: glibc's own")
    ap.add_argument("--processes", type=int, default=1, help="run the timing in this many fresh processes, one "
                    "after the other, and give the median of their paired ratios (one process's figure moves by "
                    "+-5 %% with its heap and cache state: probes that do nothing measured 1.03x-1.09x)")
    args = ap.parse_args(argv)
    if args.processes > 1:
        return _across_processes(args, argv or sys.argv[1:])

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc = {"set": False, "why": "--malloc default"}
    if args.malloc == "command" and device.type == "cpu":
        from probes.malloc_policy import keep_freed_memory

        malloc = keep_freed_memory()  # as actsparse_cli.loading_opts.load does for a CPU run
    corpus = _calibration_corpus()
    model, tok, family, label = load_model(args.model, args.layers, corpus, device, args.d_model, args.d_ff)
    max_len = min(args.max_length, getattr(model.config, "n_positions", args.max_length))
    args.max_length = max_len
    sites = find_sites(model, family, tuple(k for k in args.kinds.split(",") if k))
    n_tok = args.n_batches * args.batch_size * max_len
    batches, counted = make_batches(tok, corpus, max_len, args.batch_size, n_tok, device)
    n_params = sum(p.numel() for p in model.parameters())

    res = {"model": label, "n_parameters": n_params, "device": str(device), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "platform": platform.platform(), "python": platform.python_version(),
           "corpus": corpus, "batch_size": args.batch_size, "max_length": max_len, "n_batches": len(batches),
           "tokens_per_pass": counted, "n_sites": len(sites),
           "site_kinds": sorted({s.kind for s in sites}), "site_widths": sorted({s.width for s in sites if s.width}),
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "memory_policy": malloc}
    if args.only in ("all", "timing"):
        glu = any(s.kind == "mlp_gate_act" for s in sites)
        baseline = load_baseline(args.baseline_probe) if args.baseline_probe else None
        res["timing"] = timing(model, batches, sites, device, args.repeats, TARGET_RATIO_GLU if glu else TARGET_RATIO,
                               baseline)
        if baseline is not None:
            res["baseline_probe"] = str(Path(args.baseline_probe).resolve())
    if args.only in ("all", "memory"):
        res["memory"] = memory(model, tok, corpus, sites, args, device)
    if args.profile or ("timing" in res and not res["timing"]["meets_target"]):
        res["profile"] = profile_update(model, batches, sites, device)
    from probes import fastcount

    res["statistics_kernel"] = (fastcount.status() if device.type == "cpu"
                                else {"kernel": "torch", "detail": f"on {device}"})
    from probes import relu_pass

    res["relu_pass"] = {"enabled": relu_pass.enabled_by_env(),  # sites counted in their ReLU's pass (run_probes)
                        "sites": [s.canonical_name for s, _ in relu_pass.plan(model, sites, lambda n: None)]}
    res["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print_report(res)
    if args.json_path:
        text = json.dumps(res, indent=2)
        if args.json_path == "-":
            print(text)
        else:
            Path(args.json_path).write_text(text + "\n")
    return 0


def _across_processes(args, argv: list[str]) -> int:
    """The timing of ``argv`` (less ``--processes``, ``--json`` and ``--only``) in ``args.processes`` fresh processes
    in turn; prints each process's paired ratio and their median (the verdict), and writes them to ``--json``."""
    import subprocess
    import tempfile

    drop = {"--processes", "--json", "--only"}
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in drop:
            skip = "=" not in a
            continue
        rest.append(a)
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.processes):
            out = Path(d) / f"run{i}.json"
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest, "--only", "timing", "--json",
                                str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"process {i + 1} failed:\n{r.stderr[-2000:]}")
            res = json.loads(out.read_text())
            runs.append(res)
            t = res["timing"]
            print(f"process {i + 1}: paired ratio {t['paired_ratio_median']:.3f}x, ratio of minimums "
                  f"{t['ratio_of_minimums']:.3f}x (bare median {t['bare_median_s'] * 1e3:.1f} ms)", flush=True)
    ratios = [r["timing"]["paired_ratio_median"] for r in runs]
    target = runs[0]["timing"]["target_ratio"]
    med = statistics.median(ratios)
    print(f"{runs[0]['model']}: median over {len(runs)} processes of the paired ratio = {med:.3f}x "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}) -> {'meets' if med <= target else 'MISSES'} the <= {target}x "
          "target")
    if args.json_path:
        text = json.dumps({"processes": runs, "paired_ratios": ratios, "median_paired_ratio": med,
                           "target_ratio": target, "meets_target": med <= target}, indent=2)
        if args.json_path == "-":
            print(text)
        else:
            Path(args.json_path).write_text(text + "\n")
    return 0


def print_report(res: dict) -> None:
    t = res.get("timing")
    load = f", load avg {res['load_average'][0]:.1f}" if res.get("load_average") else ""
    print(f"model   {res['model']}  ({res['n_parameters'] / 1e6:.1f}M params, {res['device']}, "
          f"{res['threads']} threads{load})")
    print(f"data    {res['n_batches']} batches x {res['batch_size']} x {res['max_length']} tokens "
          f"= {res['tokens_per_pass']} counted tokens/pass; {res['n_sites']} sites {res['site_kinds']} "
          f"widths {res['site_widths']}")
    mp = res.get("memory_policy") or {}
    print("malloc  " + (f"{mp.get('allocator')}: mmap threshold {mp['mmap_threshold'] >> 20} MiB, trim threshold "
                        f"{mp['trim_threshold'] >> 20} MiB (as measure sets them; --malloc default: glibc's own)"
                        if mp.get("set") else f"glibc's defaults ({mp.get('why', 'not set')})"))
    if res.get("statistics_kernel"):
        k = res["statistics_kernel"]
        print(f"counts  {k['kernel']} ({k['detail']}; ACTSPARSE_NATIVE=0 for the torch path)")
    if res.get("relu_pass") is not None:
        rp = res["relu_pass"]
        print(f"relu    {len(rp['sites'])} of the sites counted in their ReLU's pass (probes.relu_pass; "
              f"ACTSPARSE_RELU_PASS=0 to count at the hook)")
    if t:
        print()
        print(f"{'variant':<22}{'median s':>10}{'min s':>10}{'max s':>10}{'tok/s':>12}")
        for name, key in (("forward, no hooks", "bare_s"), ("forward + all probes", "probed_s"),
                          ("  ... baseline probes", "baseline_s")):
            if key not in t:
                continue
            xs = t[key]
            print(f"{name:<22}{statistics.median(xs):>10.4f}{min(xs):>10.4f}{max(xs):>10.4f}"
                  f"{res['tokens_per_pass'] / statistics.median(xs):>12.0f}")
        verdict = "meets" if t["meets_target"] else "MISSES"
        print(f"paired ratio (median over ABBA pairs of probed / bare) = {t['paired_ratio_median']:.3f}x  -> {verdict} "
              f"the <= {t['target_ratio']}x target")
        print(f"  ratio of medians {t['ratio']:.3f}x, ratio of minimums {t['ratio_of_minimums']:.3f}x; load avg at "
              f"end {res['load_average_end'][0]:.1f}" if res.get("load_average_end") else "")
        if "baseline_s" in t:
            print(f"baseline probes ({res.get('baseline_probe')}), same passes interleaved: paired ratio "
                  f"{t['baseline_paired_ratio_median']:.3f}x, ratio of minimums {t['baseline_ratio_of_minimums']:.3f}x")
    if "memory" in res:
        _print_memory(res)
    _print_profile(res)


def _print_memory(res: dict) -> None:
    print()
    print(f"{'tokens':>8}{'batches':>9}{'probes':>8}{'probe state bytes':>19}{'peak bare':>12}{'peak probed':>13}"
          f"{'probes add':>12}")

    def mib(v):
        return f"{v / 2 ** 20:.1f} MiB" if v is not None else "n/a"

    for m in res["memory"]:
        b, p = m["peak_delta_bare_bytes"], m["peak_delta_probed_bytes"]
        print(f"{m['tokens']:>8}{m['n_batches']:>9}{m['n_probes']:>8}{m['probe_state_bytes']:>19}{mib(b):>12}"
              f"{mib(p):>13}{mib(p - b if None not in (p, b) else None):>12}")
    a, b = res["memory"]
    print(f"probe state {'flat' if a['probe_state_bytes'] == b['probe_state_bytes'] else 'NOT flat'} "
          f"over {b['tokens'] / max(a['tokens'], 1):.0f}x tokens (peak memory: {a['peak_kind']})")


def _print_profile(res: dict) -> None:
    if "profile" in res:
        p = res["profile"]
        print()
        print(f"ActivationSparsityProbe.update alone: {p['update_total_s']:.4f} s for {p['n_updates']} updates "
              f"(one pass); top ops by self time:")
        for o in p["top_ops"][:10]:
            print(f"  {o['op']:<32}{o['calls']:>7} calls{o['self_ms']:>10.2f} ms")
        print("  sections (manual timing of the same steps):")
        tot = sum(p["sections_s"].values()) or 1.0
        for k, v in sorted(p["sections_s"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:<18}{v * 1000:>9.2f} ms  {100 * v / tot:5.1f} %")
        if p.get("relu_pass_s"):
            print("  at sites counted in their ReLU's pass (what run_probes runs there instead of update):")
            tot = sum(p["relu_pass_s"].values()) or 1.0
            for k, v in p["relu_pass_s"].items():
                print(f"    {k:<26}{v * 1000:>9.2f} ms  {100 * v / tot:5.1f} %")


if __name__ == "__main__":
    from probes.errors import ActsparseError

    try:
        raise SystemExit(main())
    except ActsparseError as e:  # e.g. --model embedded before the embedded checkpoint exists
        print(f"bench_probes: error: {e.one_line()}", file=sys.stderr)
        raise SystemExit(e.exit_code)
