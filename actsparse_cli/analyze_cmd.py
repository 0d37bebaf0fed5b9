"""``actsparse analyze``: every analysis that applies to a checkpoint, in one report bundle.

The command decides from the loaded model what applies (activation sparsity always; gradient
sparsity when the model has a loss; massive activations when it has a residual stream; PPL-p%
and, with ``--full``, the sparsity-vs-perplexity curve for causal LMs; weight spectra always;
weight drift when ``--base`` names an earlier checkpoint), runs each as the ordinary command would
(the same code, the same options and checks) into a private working folder beside ``-o``, and
writes one report bundle (``index.html``, ``summary.md``, tables, figures, manifest) into ``-o``.

Options come from three places, later ones winning: the profile (``--quick``, the default, or
``--full``), a TOML settings file (``--settings``), and the command line. A settings file
holds every option, lm-eval style, so a CI job is one line::

    checkpoint = "runs/ckpt-1000"      # top level: checkpoint, output, profile, base, skip, title,
    profile = "quick"                  # device, dtype
    [data]                             # the data options, for every step that reads a corpus
    data = "eval.txt"                  # (a classifier: data = "labeled.jsonl" and labels = "label";
    max_tokens = 32768                 #  gradients then run as a `grad` step on its loss)
    [measure]                          # a table per step: its command's options by name
    eps = [0.001, 0.01]
    [spectrum]
    split_fused = true
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from actsparse_cli.common import handle_errors

STEPS = ("measure", "curve", "spectrum", "drift")
TOP_KEYS = ("checkpoint", "output", "profile", "base", "skip", "title", "device", "dtype")
SECTIONS = ("data",) + STEPS
DATA_STEPS = ("measure", "curve")  # the steps that read a corpus: [data] goes to these

# Token budgets of the profiles (counted tokens per pass; PPL-p% makes several passes).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"max_tokens": 16384, "curve": False},
    "full": {"max_tokens": 131072, "curve": True},
}


def SettingsError(problem: str, fix: str):
    """A bad setting (file, key, value): a usage error, exit 2."""
    from probes.errors import ActsparseError

    return ActsparseError(problem, fix, exit_code=2)


def read_settings(path: Path) -> dict[str, Any]:
    """The TOML settings file, checked: known top-level keys and sections only."""
    from probes.formats import require_regular

    if not path.exists():
        raise SettingsError(f"--settings {path} does not exist", "give the path of a TOML settings file")
    require_regular(path, "--settings")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"--settings {path} is not valid TOML ({e})", "fix the line named, or check the "
                          "file is TOML (key = value, [section])") from None
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise SettingsError(f"unknown section [{key}] in {path}", f"use sections {', '.join(SECTIONS)}")
        elif key not in TOP_KEYS:
            raise SettingsError(f"unknown setting {key!r} at the top of {path}",
                              f"top-level settings are {', '.join(TOP_KEYS)}; command options go into a "
                              f"[section] ({', '.join(SECTIONS)})")
    return raw


_APP: list = []  # the Typer app this command was registered on (no import of actsparse_cli.main: no cycle)


def _group():
    from typer.main import get_command

    return get_command(_APP[0])


def _command(name: str):
    return _group().commands[name]


def option_args(step: str, values: dict[str, Any], where: str) -> list[str]:
    """Command-line arguments of ``actsparse STEP`` for ``values`` (option names as in ``--help``, with
    ``_`` or ``-``); an unknown name or a value of the wrong shape is an error naming the place."""
    cmd = _command(step)
    params = {p.name: p for p in cmd.params if getattr(p, "param_type_name", "") == "option"}
    args: list[str] = []
    for key, value in values.items():
        name = key.replace("-", "_")
        p = params.get(name)
        if p is None or name in ("output", "force", "quiet", "output_format"):
            known = ", ".join(sorted(n for n in params if n not in ("output", "force", "quiet", "output_format")))
            raise SettingsError(f"{where}: `actsparse {step}` has no option {key!r}", f"use one of: {known}")
        flag = max(p.opts, key=len)
        if p.is_flag:
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: {key} is a switch, {value!r} is not true or false",
                                  f"write {key} = true or {key} = false")
            if value:
                args.append(flag)
            elif p.secondary_opts:
                args.append(max(p.secondary_opts, key=len))
            continue
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, (dict, list)):
                raise SettingsError(f"{where}: {key} must be a value or a list of values", f"write {key} = VALUE")
            args += [flag, str(v).lower() if isinstance(v, bool) else str(v)]
    return args


def run_step(argv: list[str]) -> int:
    """Run ``actsparse ARGV`` in this process (the command's own parsing, checks and errors)."""
    group = _group()
    try:
        rc = group.main(args=argv, prog_name="actsparse", standalone_mode=False)
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except Exception as e:  # click's usage errors (typer ships its own click): one line, their exit code
        if not hasattr(e, "format_message"):
            raise
        typer.echo(f"actsparse: error: actsparse {argv[0]}: {e.format_message()}", err=True)
        return int(getattr(e, "exit_code", 2))
    return int(rc or 0) if isinstance(rc, int) else 0


def _applies(lm, step: str, labels: str | None = None) -> str | None:
    """None when ``step`` applies to the loaded model, else why not (one phrase). ``labels``: the label field
    of a labeled .jsonl (``[data] labels``), which gives a sequence classifier its loss."""
    if step == "grad":
        from probes.errors import ActsparseError
        from probes.gradients import GradOptions, check_loss

        try:
            check_loss(lm, GradOptions(labels=labels))
        except ActsparseError as e:
            return f"no loss to differentiate ({e.problem})"
        return None
    if step == "massive":
        from probes.residual import find_residual_sites

        try:
            sites = find_residual_sites(lm.model, lm.family)
        except Exception as e:  # noqa: BLE001 - any failure means: no residual stream we can find
            return f"no residual stream found ({e.__class__.__name__})"
        return None if sites else "no residual stream found"
    if step in ("pplp", "curve"):
        return None if lm.is_causal_lm else "not a causal LM (PPL-p% needs next-token perplexity)"
    return None


def plan(checkpoint: str, output: Path, settings: dict[str, Any], *, profile: str, base: str | None,
         skip: list[str], device: str | None, dtype: str | None, lm) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The steps to run as (name, argv without -o) and the lines saying what was left out and why."""
    prof = PROFILES[profile]
    data = dict(settings.get("data", {}))
    data.setdefault("max_tokens", prof["max_tokens"])
    # A classifier's label field ([data] labels with a .jsonl data file): gradients then run as their own
    # `grad` step with it (measure has no labels), on the classifier's loss.
    labels = data.pop("labels", None)
    loading = [a for k, v in (("--device", device), ("--dtype", dtype)) if v for a in (k, v)]
    notes: list[str] = []
    steps: list[tuple[str, list[str]]] = []

    def wanted(name: str) -> bool:
        if name in skip:
            notes.append(f"{name}: skipped (--skip {name})")
            return False
        return True

    if wanted("measure"):
        extra = []
        grad_step = None
        for sub, flag in (("grad", ["--grad"]), ("massive", ["--massive"]), ("pplp", ["--pplp", "1"])):
            if sub in skip:
                notes.append(f"{sub}: skipped (--skip {sub})")
                continue
            why = _applies(lm, sub, labels) if sub == "grad" else _applies(lm, sub)
            if why:
                notes.append(f"{sub}: does not apply: {why}")
            elif sub == "grad" and labels:
                grad_step = ("grad", ["grad", checkpoint] + option_args("grad", {**data, "labels": labels}, "[data]")
                             + loading)
            else:
                extra += flag
        own = dict(settings.get("measure", {}))
        args = ["measure", checkpoint] + option_args("measure", data, "[data]") + extra \
            + option_args("measure", own, "[measure]") + loading
        steps.append(("measure", args))
        if grad_step:
            steps.append(grad_step)
    if prof["curve"] or "curve" in settings:
        if wanted("curve"):
            why = _applies(lm, "curve")
            if why:
                notes.append(f"curve: does not apply: {why}")
            else:
                steps.append(("curve", ["curve", checkpoint] + option_args("curve", data, "[data]")
                              + option_args("curve", dict(settings.get("curve", {})), "[curve]") + loading))
    if wanted("spectrum"):
        steps.append(("spectrum", ["spectrum", checkpoint]
                      + option_args("spectrum", dict(settings.get("spectrum", {})), "[spectrum]")))
    if base is None:
        notes.append("drift: not run (give --base EARLIER_CHECKPOINT for weight drift)")
    elif wanted("drift"):
        steps.append(("drift", ["drift", base, checkpoint]
                      + option_args("drift", dict(settings.get("drift", {})), "[drift]")))
    return steps, notes


def register(app: typer.Typer) -> None:
    _APP[:] = [app]

    @app.command("analyze")
    @handle_errors
    def analyze(
        checkpoint: Annotated[Optional[str], typer.Argument(
            help="Model folder, hub id, .safetensors/.bin/.pt/.gguf file (default: the settings file's, "
                 "else the bundled model).", show_default=False)] = None,
        output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Report bundle folder to write "
                                                       "(default: the settings file's).", show_default=False)] = None,
        full: Annotated[Optional[bool], typer.Option("--full/--quick", help="Profile: --quick (default) runs every "
                                                     f"analysis that applies on {PROFILES['quick']['max_tokens']} "
                                                     f"tokens; --full on {PROFILES['full']['max_tokens']} tokens "
                                                     "and adds the sparsity-vs-perplexity curve.",
                                                     show_default=False)] = None,
        settings: Annotated[Optional[Path], typer.Option("--settings", help="TOML file with every option "
                                                         "(see `actsparse analyze --help` and the README).",
                                                         show_default=False)] = None,
        base: Annotated[Optional[str], typer.Option("--base", help="An earlier checkpoint of the same model: "
                                                    "adds weight drift from it.", show_default=False)] = None,
        skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Leave out these steps (repeatable): "
                                                          "measure, grad, massive, pplp, curve, spectrum, drift.",
                                                          show_default=False)] = None,
        device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps for the "
                                                      "steps that run the model (default: each command's).",
                                                      show_default=False)] = None,
        dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.",
                                                     show_default=False)] = None,
        title: Annotated[Optional[str], typer.Option("--title", help="Title of index.html and summary.md.",
                                                     show_default=False)] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands that would run, run none.")]
        = False,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing -o folder written by actsparse.")]
        = False,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No tables or progress; errors only.")] = False,
    ) -> None:
        """Run every analysis that applies to a checkpoint and write one report bundle (index.html).

        --quick (default) takes minutes on a laptop CPU for a 100M model; --full measures more tokens
        and adds the sparsity-vs-perplexity curve. A --settings TOML file holds any option of the
        underlying commands ([data], [measure], [curve], [spectrum], [drift])."""
        import shlex

        from reports.bundle import check_output_dir, scratch_dir
        from reports.bundle_report import build_report
        from reports.manifest import short_name

        from actsparse_cli.common import stderr_console

        conf = read_settings(settings) if settings is not None else {}
        for sec in SECTIONS:  # every option name and value shape checked before the model loads
            if conf.get(sec):
                values = dict(conf[sec])
                if sec == "data" and "labels" in values:  # a classifier's label field: checked as grad's option
                    option_args("grad", {"labels": values.pop("labels")}, f"[{sec}] of {settings}")
                option_args("measure" if sec == "data" else sec, values, f"[{sec}] of {settings}")
        checkpoint = checkpoint or conf.get("checkpoint")
        out = output if output is not None else (Path(conf["output"]) if conf.get("output") else None)
        if out is None and not dry_run:
            raise SettingsError("analyze needs an output folder", "pass -o FOLDER (or output = \"FOLDER\" in "
                              "the --settings file)")
        profile = ("full" if full else "quick") if full is not None else str(conf.get("profile", "quick"))
        if profile not in PROFILES:
            raise SettingsError(f"unknown profile {profile!r} in {settings}", "use profile = \"quick\" or \"full\"")
        base = base or conf.get("base")
        skips = [s.strip() for item in (skip or conf.get("skip", []) or []) for s in str(item).split(",") if s.strip()]
        bad = [s for s in skips if s not in STEPS + ("grad", "massive", "pplp")]
        if bad:
            raise SettingsError(f"--skip {bad[0]}: no such step", "use measure, grad, massive, pplp, curve, "
                              "spectrum or drift")
        device = device or conf.get("device")
        dtype = dtype or conf.get("dtype")
        title = title or conf.get("title")
        if checkpoint is None:
            from probes.embedded import default_checkpoint

            checkpoint = default_checkpoint()
        checkpoint = str(checkpoint)
        from actsparse_cli.common import run_inputs

        if out is not None and not dry_run:
            check_output_dir(out, force, inputs=run_inputs(checkpoint, None, None, None))  # fail before any work
        say = (lambda msg: None) if quiet else \
            (lambda msg: stderr_console().print(msg, markup=False, highlight=False, soft_wrap=True))
        say(f"analyze: loading {checkpoint} to see which analyses apply")
        from probes.loading import load_checkpoint, offer_loaded

        # Loaded as the steps will load it (their --device and --dtype), so that the first step that loads
        # the model (measure) takes this one instead of reading the checkpoint again.
        load_args = dict(device=device or "auto", dtype=dtype or "auto")
        lm = load_checkpoint(checkpoint, **load_args)
        try:
            steps, notes = plan(checkpoint, out or Path("OUT"), conf, profile=profile, base=base, skip=skips,
                                device=device, dtype=dtype, lm=lm)
            offer = offer_loaded(lm, checkpoint=checkpoint, **load_args) if not dry_run else None
        finally:
            del lm  # from here on only the offer holds the model, until the step that takes it ends
        if dry_run:
            for name, argv in steps:
                typer.echo("actsparse " + " ".join(shlex.quote(a) for a in argv) + f" -o OUT/{name}")
            for n in notes:
                typer.echo(f"# {n}")
            return
        with scratch_dir(out) as work:
            runs = []
            for i, (name, argv) in enumerate(steps, 1):
                say(f"analyze: step {i}/{len(steps)}: {name}")
                with offer if i == 1 else contextlib.nullcontext():  # the planning model: first step only
                    rc = run_step(argv + ["-o", str(work / name)] + (["-q"] if quiet else []))
                if rc != 0:
                    say(f"analyze: step {name} failed (exit {rc}); no report was written")
                    raise typer.Exit(rc)
                runs.append(work / name)
            say(f"analyze: writing the report into {out}/")
            build_report(runs, out, force=force, title=title or f"actsparse analyze: {short_name(checkpoint)}",
                         run={"command": "analyze", "profile": profile, "settings": str(settings) if settings else None,
                              "steps": [["actsparse", *argv, "-o", f"{{work}}/{name}"] for name, argv in steps],
                              "left_out": notes})
        for n in notes:
            say(f"analyze: {n}")
        say(f"wrote {out}/index.html")
        sys.stdout.flush()
