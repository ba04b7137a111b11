"""User errors (what is wrong and what to do, no traceback) versus internal errors (a traceback).

The command line (`vitsparse_jax.main`, `python -m checkpoints_convert`) prints a user error as one or two
lines and exits with `EXIT_USER_ERROR`; `--verbose` (or `VITSPARSE_JAX_VERBOSE=1`) shows the traceback.
A user error is:

- a `UserError` (raised by the checks of the workdir, the resume state and the lock), or
- a `ValueError` or `OSError` raised by the project's own code (`vitsparse_jax/`, `checkpoints_convert/`,
  `configs/`): the config and input checks raise those with a message that names the offending field,
  file or value and says what to do. The same types raised inside a library (numpy, jax, ...) are internal
  errors and keep their traceback.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

EXIT_USER_ERROR = 2        # like a usage error (argparse, absl)
EXIT_STOPPED = 75          # EX_TEMPFAIL: stopped on request without a signal (stop_after_batches); rerun continues
VERBOSE_ENV = "VITSPARSE_JAX_VERBOSE"

_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep
                      for d in ("vitsparse_jax", "checkpoints_convert", "configs"))


class UserError(Exception):
    """A problem with what the user gave (config, files, workdir); the message says what to do."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be created or written (read-only, full, not a folder, no permission)."""


class WorkdirLocked(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


class StateError(UserError, ValueError):
    """A saved resume state cannot be used: damaged, or written by another config or other inputs."""


def verbose_requested(argv: list[str] | None = None) -> bool:
    """--verbose on the command line (also before flags are parsed) or VITSPARSE_JAX_VERBOSE=1."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in (argv or []))


def _raised_in_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and os.path.abspath(last).startswith(_PROJECT_DIRS)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, (ValueError, OSError)) and _raised_in_project(exc)


def message(exc: BaseException) -> str:
    """The exception's text; an OSError without one gets its errno text and file name."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{name}"
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return text or type(exc).__name__


def report(exc: BaseException, *, prog: str = "error") -> int:
    """Prints a user error as `error: <message>` on stderr; returns the exit code."""
    print(f"{prog}: {message(exc)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def print_traceback(exc: BaseException) -> None:
    traceback.print_exception(exc, file=sys.stderr)
