"""One error type for every bad input, with a one-line message, a fix and an exit code.

Exit codes (documented in the README):
  2  bad checkpoint or path (missing, unreadable, corrupt, wrong kind of file, config/weights mismatch)
  3  model problem (unknown architecture, no site found, NaN/Inf weights, no loss available)
  4  data problem (empty corpus, corpus shorter than one window, bad data spec, --max-length above the
     model's position limit)
  5  output problem (folder exists without --force, unwritable)
  6  device problem (CUDA requested with no GPU, out of memory)
  7  a `compare --fail-on` rule is broken (or a `--strict` mismatch)
  130 interrupted (Ctrl-C); nothing is left half written
  143 terminated (SIGTERM: `timeout`, CI cancellation); nothing is left half written
"""

from __future__ import annotations

from typing import Iterable

EXIT_CHECKPOINT = 2
EXIT_MODEL = 3
EXIT_DATA = 4
EXIT_OUTPUT = 5
EXIT_DEVICE = 6
EXIT_RULE_BROKEN = 7
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every cleanup path for Ctrl-C runs for it too."""


class ActsparseError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do about it."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, problem: str, fix: str | None = None, exit_code: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        msg = self.problem.strip().replace("\n", " ")
        if self.fix:
            msg += f" -- fix: {self.fix.strip()}"
        return msg

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.one_line()


class CheckpointError(ActsparseError):
    exit_code = EXIT_CHECKPOINT


class ModelError(ActsparseError):
    exit_code = EXIT_MODEL


class DataError(ActsparseError):
    exit_code = EXIT_DATA


class OutputError(ActsparseError):
    exit_code = EXIT_OUTPUT


class DeviceError(ActsparseError):
    exit_code = EXIT_DEVICE


def did_you_mean(name: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` (up to ``n`` names: ``'x' or 'y'``) for the ``choices`` closest to ``name``
    (``difflib.get_close_matches``), or ``""`` when none is close: to append to a problem text."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)
    if not close:
        return ""
    names = [repr(c) for c in close]
    return "; did you mean " + (names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}") + "?"


def unknown_name(what: str, name: str, choices: Iterable[str], *, error: type[ActsparseError] = ActsparseError,
                 exit_code: int | None = None, n: int = 1) -> ActsparseError:
    """The error for a ``name`` that is not one of ``choices``, to ``raise``: "unknown WHAT 'name'; did you
    mean 'x'? -- fix: use one of a, b, c" (the valid names in the order given)."""
    choices = [str(c) for c in choices]
    return error(f"unknown {what} {name!r}{did_you_mean(name, choices, n=n)}", f"use one of {', '.join(choices)}",
                 exit_code=exit_code)
