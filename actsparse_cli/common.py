"""Options shared by every command and the one place that turns errors into exit codes.

Messages go to stderr, data (tables) to stdout, as sqlite-utils does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from actsparse_cli.display import OutputFormat
from probes.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ActsparseError, DeviceError, Terminated

PANEL_LOAD = "Loading"
PANEL_DATA = "Data"
PANEL_OUT = "Output"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# ---- loading options (lm-eval style)
Checkpoint = Annotated[str, typer.Argument(help="Model folder, hub id, .safetensors/.bin/.pt/.gguf file, "
                                           "or a sharded *.index.json.", show_default=False)]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="HF config (folder, config.json or hub id) "
                                                  "for a bare state dict.", rich_help_panel=PANEL_LOAD)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Model family for a bare state dict "
                                                "built from tensor shapes: gpt2, nanogpt, llama, mistral, qwen2 "
                                                "(others: use --config); timm:NAME or torchvision:NAME for vision "
                                                "models (needs that package).", rich_help_panel=PANEL_LOAD)]
DeviceArg = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.",
                                        rich_help_panel=PANEL_LOAD)]
class DeviceMapChoice(str, Enum):
    auto = "auto"
    balanced = "balanced"
    sequential = "sequential"
    cpu = "cpu"


DeviceMapOpt = Annotated[Optional[DeviceMapChoice], typer.Option(
    "--device-map", help="Spread a large Hugging Face model over the GPUs and CPU with accelerate "
    "(from_pretrained's device_map); inputs go to the input embeddings' device. Needs `pip install accelerate`.",
    rich_help_panel=PANEL_LOAD)]
DtypeArg = Annotated[DtypeChoice, typer.Option("--dtype", help="Model dtype; statistics are always float32.",
                                               rich_help_panel=PANEL_LOAD)]
TrustArg = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the checkpoint's repo to run.",
                                        rich_help_panel=PANEL_LOAD)]
UnsafePickleArg = Annotated[bool, typer.Option("--unsafe-pickle", help="Allow full unpickling (runs code in the "
                                               "file). Off: torch.load(weights_only=True).",
                                               rich_help_panel=PANEL_LOAD)]
# ---- output options
OutArg = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder (written atomically).",
                                                rich_help_panel=PANEL_OUT)]
ForceArg = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.",
                                        rich_help_panel=PANEL_OUT)]
QuietArg = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar, table or messages on the terminal "
                                        "(errors and compare's verdict line still show). Where -o is optional, -q "
                                        "needs -o or --format: alone it would show and write nothing, and is "
                                        "refused.", rich_help_panel=PANEL_OUT)]
DebugArg = Annotated[bool, typer.Option("--debug", help="Show full tracebacks.", rich_help_panel=PANEL_OUT)]


# --format: what stdout carries (actsparse_cli/display.py). None: a table, or nothing under -q.
FormatOpt = Annotated[Optional[OutputFormat], typer.Option(
    "--format", help="What stdout carries: table (default; fits the terminal, or COLUMNS), json (every table "
    "written, as in the files, plus a small info), csv (the main table, as its file) or md (markdown tables). "
    "Messages go to stderr. With -q and no -o, --format is what makes the run print something.",
    rich_help_panel=PANEL_OUT, show_default=False)]


# ---- data options shared by the commands that run a model over a corpus
CheckpointOpt = Annotated[Optional[str], typer.Argument(help="Model folder, hub id or weight file. Default: the "
                                                        "project's bundled ReLU model.", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Corpus: .txt, .jsonl, or hf:NAME[:CONFIG][:SPLIT]. "
                                                "Default: the bundled calibration corpus.", rich_help_panel=PANEL_DATA)]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Text field of .jsonl / hf: corpora.",
                                           rich_help_panel=PANEL_DATA)]
EncodingOpt = Annotated[str, typer.Option("--encoding", help="Text encoding of a .txt / .jsonl corpus (a Python "
                                          "codec name: utf-8, latin-1, cp1252, utf-16, ...). Decoding is strict: a "
                                          "byte that does not decode is an error naming its offset. A leading "
                                          "byte-order mark is dropped.", rich_help_panel=PANEL_DATA)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.",
                                        rich_help_panel=PANEL_DATA)]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-length", min=2, help="Window length. Default: the model's "
                                                  "limit, at most 2048.", rich_help_panel=PANEL_DATA)]
MaxTokOpt = Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Stop after this many counted tokens.",
                                                  rich_help_panel=PANEL_DATA)]
StrideOpt = Annotated[Optional[int], typer.Option("--stride", min=1, help="New tokens per window (default: "
                                                  "--max-length, i.e. non-overlapping).", rich_help_panel=PANEL_DATA)]
# numpy's RandomState (massive's document sampling, spectrum's --randomize) takes 0..2**32-1; torch takes more.
SEED_MAX = 2**32 - 1
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed, 0 to 2**32-1 "
                                      "(torch.manual_seed before the first pass; recorded in the manifest).",
                                      rich_help_panel=PANEL_DATA)]
SkipOpt = Annotated[int, typer.Option("--skip-first", min=0, help="Do not count the first N positions of "
                                      "each window (BOS / attention-sink tokens).",
                                      rich_help_panel=PANEL_DATA)]

def run_inputs(checkpoint=None, data=None, config=None, tokenizer=None, *more) -> list[str]:
    """Every path a model-running command reads, with the embedded defaults for what was not given,
    for the output guard (``reports.bundle.check_output_dir``: ``-o`` may not be, hold or lie
    inside any of them)."""
    from probes.embedded import DEFAULT_CHECKPOINT, DEFAULT_CORPUS

    paths = [checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT,
             data if data is not None else DEFAULT_CORPUS, config, tokenizer, *more]
    return [str(p) for p in paths if p is not None and str(p) != ""]


def float_check(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[Any], Any]:
    """A Typer callback refusing (exit 2, usage error) a float option, or any value of a repeatable
    one, that is NaN, infinite or outside [lo, hi] (``lo_open``/``hi_open``: that end excluded).

    Click's own ``min``/``max`` let NaN through (every comparison with NaN is false)."""
    import math

    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    allowed = ("a finite number" if lo is None and hi is None else
               f"a number > {lo:g}" if hi is None and lo_open else
               f"a number >= {lo:g}" if hi is None else
               f"a number in {left}{lo:g}, {hi:g}{right}" if lo is not None else
               f"a number {'<' if hi_open else '<='} {hi:g}")

    def check(value: Any) -> Any:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is None:
                continue
            ok = math.isfinite(v) and not (
                lo is not None and (v <= lo if lo_open else v < lo)) and not (
                hi is not None and (v >= hi if hi_open else v > hi))
            if not ok:
                raise typer.BadParameter(f"{v:g} is not allowed; give {allowed}")
        return value

    return check


def fail(message: str, code: int) -> None:
    typer.echo(f"actsparse: error: {message}", err=True)
    raise typer.Exit(code)


def _is_oom(e: BaseException | None) -> bool:
    """A torch out-of-memory error (CUDA's, or any backend's "out of memory" RuntimeError).

    Looks torch up in ``sys.modules`` only: a command that never imported torch (``--help``) cannot
    have run out of memory in it, and must not pay for importing it here."""
    torch = sys.modules.get("torch")
    if e is None or torch is None:
        return False
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(t, type))
    if types and isinstance(e, types):
        return True
    # CPU allocations that fail say "can't allocate memory" / "not enough memory" instead
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in
                                               ("out of memory", "can't allocate memory", "not enough memory"))


def _oom_fix(kwargs: dict) -> str:
    """A concrete next step for an out-of-memory error, from the command's own options."""
    bs, ml = kwargs.get("batch_size"), kwargs.get("max_length")
    shorter = f"--max-length {ml // 2}" if isinstance(ml, int) and ml >= 4 else "a smaller --max-length"
    if "batch_size" not in kwargs:
        if "device" in kwargs:
            return "use --device cpu, or a GPU with more free memory"
        return "free some memory (other programs, a smaller checkpoint shard) or use a machine with more"
    if isinstance(bs, int) and bs > 1:
        return f"retry with --batch-size {bs // 2} (or {shorter}, or --dtype bfloat16)"
    if bs == 1:
        return f"retry with {shorter} or --dtype bfloat16 (--batch-size is already 1), or use --device cpu"
    return f"retry with --batch-size 1 (or {shorter}, or --dtype bfloat16)"


def _out_of_memory(e: BaseException, kwargs: dict) -> ActsparseError | None:
    """OOM, raw or already wrapped in a DeviceError by a batch loop, as a DeviceError naming a --batch-size."""
    if isinstance(e, ActsparseError):
        if not _is_oom(e.__cause__):
            return None
        problem = e.problem
    elif _is_oom(e):
        problem = "out of memory"
    else:
        return None
    bs = kwargs.get("batch_size")
    if isinstance(bs, int) and "batch" in problem and "--batch-size" not in problem:
        problem += f" (--batch-size {bs})"
    return DeviceError(problem, _oom_fix(kwargs))




class _HeldLoadReports(logging.Filter):
    """Holds back transformers' multi-line LOAD REPORT warning while a command runs.

    A load that then fails prints one line (with --debug, the report too); a load that succeeds
    gets its report re-emitted unchanged, so nothing is lost."""

    LOGGERS = ("transformers.modeling_utils", "transformers.modeling_layers")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover - a malformed record is not ours to judge
            return True
        if "LOAD REPORT" in msg:
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> "_HeldLoadReports":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def release(self) -> None:
        for r in self.records:
            logging.getLogger(r.name).handle(r)
        self.records.clear()


# typer >= 0.16 raises its own copy of click's exceptions (typer.BadParameter is not a
# click.ClickException there); both kinds are usage errors that keep click's message and code.
# click itself is not imported for this (4-5 ms of every start): where it is not loaded nothing can
# have raised its exceptions, so its class joins the tuple when an error is handled and click is loaded.
_TYPER_CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _click_errors() -> tuple:
    click = sys.modules.get("click")
    return tuple({*_TYPER_CLICK_ERRORS, *((click.exceptions.ClickException,) if click is not None else ())})


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


_DEPTH = [0]  # handle_errors nesting: the outermost call owns the SIGTERM handler and the output locks


@contextlib.contextmanager
def _command_scope():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread for the command's
    duration; at the end, every output folder the command locked is released."""
    import signal
    import threading

    outer = _DEPTH[0] == 0
    prev = None
    if outer and threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, _raise_terminated)
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
        if outer:
            guard = sys.modules.get("reports.bundle")
            if guard is not None:
                guard.release()
            follow = sys.modules.get("probes.threads")
            if follow is not None:  # torch's thread count follows the free cores only while a command runs
                follow.stop_following()


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """Under ``-q``, transformers' warnings and progress bars stay off stderr while the command runs
    (errors still show). transformers sets its logger's level from TRANSFORMERS_VERBOSITY when it is
    first imported, which is inside the command; if it is already imported, its own switches."""
    if not quiet:
        yield
        return
    import os

    env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    hf = sys.modules.get("transformers.utils.logging")
    bars = hf.is_progress_bar_enabled() if hf is not None else False
    if hf is not None:
        hf.set_verbosity_error()
        hf.disable_progress_bar()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tf_logger.setLevel(level)
        if bars and hf is not None:
            hf.enable_progress_bar()


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ActsparseError into a one-line message and its exit code; no traceback unless --debug.

    Out-of-memory errors (torch's, raw or wrapped by a batch loop) become exit 6 with a
    --batch-size to try, for every command. SIGTERM is handled like Ctrl-C (exit 143)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug", False))
        quiet = bool(kwargs.get("quiet", False))
        held = _HeldLoadReports()
        _QUIET.append(quiet)
        try:
            with _command_scope(), held, _quiet_libraries(quiet):
                result = fn(*args, **kwargs)
        except ActsparseError as e:
            err = _out_of_memory(e, kwargs) or e
            if debug:
                held.release()
                traceback.print_exc()
            fail(err.one_line(), err.exit_code)
        except KeyboardInterrupt as e:
            if debug:
                traceback.print_exc()
            if isinstance(e, Terminated):
                fail("terminated (SIGTERM); no output was written", EXIT_TERMINATED)
            fail("interrupted; no output was written", EXIT_INTERRUPTED)
        except (typer.Exit, typer.Abort, *_click_errors()):
            raise  # usage errors (typer.BadParameter) keep click's message and exit code 2
        except Exception as e:  # an internal error: still one line unless --debug
            if debug:
                held.release()
                traceback.print_exc()
            oom = _out_of_memory(e, kwargs)
            if oom is not None:
                fail(oom.one_line(), oom.exit_code)
            fail(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                 "(rerun with --debug for the traceback and report it)", 1)
        finally:
            _QUIET.pop()
        if not quiet:  # -q: transformers' load report is dropped with the rest of its chatter
            held.release()
        return result

    return wrapper


_QUIET: list[bool] = []  # the running commands' -q, innermost last (analyze runs others inside)


def is_quiet() -> bool:
    return bool(_QUIET and _QUIET[-1])


@contextlib.contextmanager
def status_line(text: str):
    """A transient status line on stderr (a terminal only; nothing under -q or in a log) while a
    silent step runs, such as loading a model."""
    if is_quiet():
        yield
        return
    with stderr_console().status(text):
        yield


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def warn_notes(info: dict, quiet: bool) -> None:
    """One ``warning:`` line on stderr per note a run recorded in its manifest (e.g. a clamped --stride)."""
    if quiet:
        return
    for note in info.get("notes") or ():
        typer.echo(f"warning: {note}", err=True)


def stdout_console():
    """The stdout console: COLUMNS when set (also when piped), else the terminal's width, else 160."""
    from actsparse_cli.display import stdout_console as console

    return console()


def is_interactive() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def batch_progress(quiet: bool, description: str):
    """A rich progress bar on stderr that appears only once the run knows its batches, so an error
    while reading the corpus prints one line and nothing else. Yields ``progress(total, advance)``."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    state: dict = {}

    def update(total: int, advance: int) -> None:
        if "prog" not in state:
            prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console())
            prog.start()
            state["prog"], state["task"] = prog, prog.add_task(description, total=total)
        state["prog"].update(state["task"], total=total, advance=advance)

    try:
        yield update
    finally:
        if "prog" in state:
            state["prog"].stop()


# ---- help and usage errors: the command classes every command uses (set in actsparse_cli/main.py)
# typer >= 0.16 parses with its own copy of click (typer._click); older typers use click itself, and
# click's class counts where click is loaded (as above: not imported for this).
def _missing_errors() -> tuple:
    return tuple({c for m in (getattr(typer, "_click", None), sys.modules.get("click")) if m is not None
                  for c in (getattr(getattr(m, "exceptions", None), "MissingParameter", None),) if isinstance(c, type)})


def _no_flag_placeholders(params: list) -> list:
    """Flags take no value: no ``<bool>`` placeholder in the help (Typer prints an option's metavar
    instead of its type when one is set), so that nobody writes ``--grad true``."""
    for p in params:
        if getattr(p, "is_flag", False) and not getattr(p, "count", False) and getattr(p, "metavar", None) is None:
            p.metavar = ""
    return params


def missing_parameter_line(e: BaseException, ctx) -> str:
    """A missing argument or option as ``PROBLEM -- fix: FIX`` (the documented one-line form)."""
    import re

    command = ctx.info_name or ""
    param = getattr(e, "param", None)
    help_text = re.split(r"\.\s+(?=[A-Z])", (getattr(param, "help", None) or "").strip())[0].rstrip(".")
    about = f": {help_text[:1].lower()}{help_text[1:]}" if help_text else ""
    if param is not None and getattr(param, "param_type_name", "") == "option":
        opts = getattr(param, "opts", None) or [f"--{param.name}"]
        value = "FOLDER" if param.name == "output" else "VALUE"
        return (f"{command}: missing option {'/'.join(opts)}{about} -- fix: add {opts[0]} {value} "
                f"(see `actsparse {command} --help`)")
    usage = []
    for p in getattr(ctx.command, "params", []):
        if getattr(p, "param_type_name", "") == "argument":
            name = (p.name or "").upper() + (" ..." if p.nargs != 1 else "")
            usage.append(name if p.required else f"[{name}]")
    name = (getattr(param, "name", None) or "argument").upper()
    return (f"{command}: missing {name}{about} -- fix: `actsparse {command} {' '.join(usage) or name}` "
            f"(see `actsparse {command} --help`)")


class ActsparseCommand(TyperCommand):
    """A command whose flags show no value placeholder in the help and whose missing arguments or
    options give the one-line ``actsparse: error: ... -- fix: ...`` (exit 2) instead of Typer's box."""

    def get_params(self, ctx):
        return _no_flag_placeholders(super().get_params(ctx))

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _missing_errors() as e:
            if ctx.resilient_parsing:
                raise
            typer.echo(f"actsparse: error: {missing_parameter_line(e, ctx)}", err=True)
            raise typer.Exit(2) from None


class ActsparseGroup(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_placeholders(super().get_params(ctx))
