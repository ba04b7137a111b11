"""Entry point: python -m vitsparse_jax.main --config=ablate [--config.x=y ...] (or --config=configs/ablate.py).

  --show_config   every field of the config: its value (after the --config.x=y overrides) and what it does
  --dry_run       the models, where their weights come from, the data, how many images and passes; no compute
  --helpfull      every flag
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vitsparse_jax.runtime import config_files, errors
from vitsparse_jax.runtime.config_defaults import expand_config_paths
from vitsparse_jax.runtime.workdir import Workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config: a shipped one by name ({', '.join(config_files.shipped_names())}; a "
    "preset after a colon: ablate:paper) or a config file's path (configs/ablate.py[:preset]; the current "
    "folder's configs/ first). Set any field with --config.<name>=<value> and list them all with --show_config.",
    lock_config=True)
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every field of the config with its current value and a one-line help, then exit.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print which models, weights (built-in, converted file, hub, untrained), data, and how many "
    "images and forward / backward passes the run would do, then exit: nothing is computed or written.")
# Reports named by the line that ends a run, in this order (those the run wrote); each experiment names its
# result files (`result_files`).
REPORT_FILES = ("report.html", "report.md")


def run(config) -> dict:
    """The run of `config` (a parsed experiment config): `experiments.driver.run`, which owns the session,
    the checks, the passes and the result files."""
    from vitsparse_jax.experiments import driver

    return driver.run(config)


def finished_line(workdir: Workdir, result_files: Sequence[str]) -> str:
    """The line that ends every run: where its reports (report.html first: the page to open) and results
    files are, as absolute paths (a relative workdir is under the current directory)."""
    root = Path(os.path.abspath(workdir.root))

    def listing(names: Sequence[str]) -> str:
        found = [name for name in names if (root / name).exists()]
        return f"{root / found[0]}" + "".join(f", {name}" for name in found[1:]) if found else ""

    reports, results = listing(REPORT_FILES), listing(result_files)
    return f"report: {reports or root / 'report.md'}" + (f"; results: {results}" if results else "")


class _TqdmStream:
    """stderr for the absl log handler that writes through tqdm, so log lines do not break a progress bar."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:   # logging.shutdown closes handlers; stderr stays open
        pass


def _drop_backend_probe(record: logging.LogRecord) -> bool:
    """jax logs at INFO each platform it tries and lacks ('Unable to initialize backend 'tpu': ... libtpu.so
    ...'); those lines are noise on a CPU or GPU machine. Warnings and errors pass."""
    return not (record.levelno < logging.WARNING and str(record.msg).startswith("Unable to initialize backend"))


class _ShortFormatter(logging.Formatter):
    """'I 12:34:56 message': the level's letter and the time. absl's own prefix ('I1207 12:34:56.789012
    140363222711168 resumable.py:306] ') takes 57 columns, so most log lines wrapped beside a progress bar;
    --verbose keeps it (the file and line say where a line comes from)."""

    def __init__(self) -> None:
        super().__init__("%(levelname).1s %(asctime)s %(message)s", datefmt="%H:%M:%S")


def setup_logging(verbose: bool = False) -> None:
    """absl logging at INFO, through tqdm (a log line is written above a progress bar, never into it), with a
    short prefix (absl's own with `verbose`), without jax's backend-probing INFO lines."""
    logging.getLogger("absl").setLevel(logging.INFO)
    logging.getLogger("jax._src.xla_bridge").addFilter(_drop_backend_probe)
    logging.getLogger("fontTools").setLevel(logging.WARNING)   # font subsetting of every PDF figure, at INFO
    handler = absl_logging.get_absl_handler().python_handler
    if handler.stream in (sys.stderr, sys.__stderr__):   # not a log file (--log_dir); a notebook's stderr too
        handler.stream = _TqdmStream()
    handler.setFormatter(absl_logging.PythonFormatter() if verbose else _ShortFormatter())


def main(argv: list[str]) -> None:
    """The run, with the flags parsed (raises on errors; `cli` turns them into exit statuses)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required. " + config_files.usage_hint())
    setup_logging(verbose=_VERBOSE.value or errors.verbose_requested())
    config = _CONFIG.value
    if _SHOW_CONFIG.value or _DRY_RUN.value:
        expand_config_paths(config)
        if _SHOW_CONFIG.value:
            from vitsparse_jax.runtime import config_help

            flag = flags.FLAGS["config"]
            print(config_help.describe_config(config, config_flags.get_config_filename(flag),
                                              config_flags.get_override_values(flag)), end="")
        if _DRY_RUN.value:
            from vitsparse_jax.experiments import driver

            print(driver.describe(config), end="")
        return
    run(config)
    import jax

    if jax.process_index() == 0:
        from vitsparse_jax import experiments

        print(finished_line(Workdir(config.workdir), experiments.get(config.experiment).result_files), flush=True)


# --- errors and exit codes: user errors in one or two lines, stops with the conventional status -------------

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, f"Show the traceback of every error (also with {errors.VERBOSE_ENV}=1); without it, "
    "an error in the config or the inputs prints only what is wrong and what to do.")


def _unknown_field_message(exc: BaseException, argv: list[str]) -> str | None:
    """'unknown config field ...' for an override of a field the config lacks, None if it is not that."""
    import difflib
    import importlib.util

    from vitsparse_jax.runtime import config_help

    if not isinstance(exc, (AttributeError, KeyError)):
        return None
    spec, overrides = None, []
    for arg in argv[1:]:
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):].split("=", 1)[0])
    try:   # the config as the file builds it, without the overrides
        path, arg = config_help.split_config_arg(spec)
        module_spec = importlib.util.spec_from_file_location("_config_for_message", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception:  # noqa: BLE001
        return None
    for culprit in overrides:   # the first override with a part the config lacks
        parts, node = culprit.split("."), config
        for i, part in enumerate(parts):
            if hasattr(node, "keys") and part in node:
                node = node[part]
                continue
            section, field = parts[:i], part
            valid = sorted(node.keys()) if hasattr(node, "keys") else []
            where = f"config.{'.'.join(section)}" if section else "the config"
            close = difflib.get_close_matches(field, valid, n=1)
            hint = f" Did you mean --config.{'.'.join(section + close)}?" if close else ""
            listing = f" Fields of {where}: {', '.join(valid)}." if valid else f" {where} is not a section."
            return (f"unknown config field --config.{culprit}: {where} has no field {field!r}.{hint}{listing} "
                    "--show_config lists every field.")
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors (unknown field, bad value, missing file, bad preset) as one or
    two lines and exit status 2; --verbose shows the traceback. The --config value is resolved first:
    `--config=ablate` and `--config=configs/ablate.py` work from any directory (runtime/config_files.py)."""
    argv = config_files.resolve_argv(argv)
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is None:
            raise ValueError("--config is required. " + config_files.usage_hint())
        config.get("experiment")   # a config file that failed to load raises only when it is used
        return rest
    except Exception as e:  # noqa: BLE001
        if errors.verbose_requested(argv):
            raise
        text = _unknown_field_message(e, argv)
        if text is None:
            text = errors.message(e)
            if "Failed loading config file" in text or "earlier failure to load" in text:
                spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
                cause = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
                text = f"cannot load the config file {spec}: {cause}. {config_files.usage_hint()}"
            elif "Traceback" in text:   # a config file that raised: its last line, without the error's type
                text = text.strip().splitlines()[-1].strip()
                text = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", text)
        print(f"error: {text}\nPass --helpshort for the flags, --show_config for the config fields, "
              "--verbose for the traceback.", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_USER_ERROR)


def run_parsed(argv: list[str]) -> int:
    """`main` with the exit statuses of docs/design.md ("Guarantees"): 0 done, 2 user error (one message, no
    traceback unless --verbose), 75 stopped by stop_after_batches, 128 + N stopped by signal N (130 SIGINT,
    143 SIGTERM; the state is saved and the same command continues). An internal error raises (status 1 and
    its traceback under `python -m`)."""
    from vitsparse_jax.runtime import resumable, stopping

    try:
        with stopping.handle_signals():   # from the start: a signal during setup stops at the first batch
            main(argv)
    except resumable.Interrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped at once (Ctrl-C twice): the state saved last is kept; run the same command again to "
              "continue from it", file=sys.stderr, flush=True)
        return stopping.exit_code(2)
    except Exception as e:  # noqa: BLE001
        if _VERBOSE.value or errors.verbose_requested() or not errors.is_user_error(e):
            raise
        return errors.report(e)
    return 0


def cli(argv: Sequence[str]) -> int:
    """The command line in this process: `cli(["vitsparse_jax.main", "--config=configs/ablate.py", ...])`
    parses the flags (afresh: a second call does not see the first one's), runs, and returns the exit status
    of `run_parsed` (2 for a flag or config error). `python -m vitsparse_jax.main` is `app.run` over the same
    two steps."""
    argv, saved = list(argv), sys.argv
    sys.argv = argv   # ml_collections reads the --config.x overrides from sys.argv; the run records it as its command
    if not logging.getLogger().handlers:   # the caller set up no logging: log as `python -m` does (app.run
        absl_logging.use_absl_handler()    # installs this handler), not through the stdlib's basicConfig
    try:
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)   # the last parse's --config.x override flags (ml_collections adds them)
        flags.FLAGS.unparse_flags()
        try:
            rest = _parse_flags(argv)
        except SystemExit as e:   # a flag or config error (printed), or --help
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if flags.FLAGS["verbosity"].using_default_value:   # INFO unless --verbosity says otherwise, as app.run
            flags.FLAGS.verbosity = 0
        return run_parsed(rest)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    app.run(run_parsed, flags_parser=_parse_flags)
