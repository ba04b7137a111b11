"""Entry point: python -m vitsparse_jax.main --config=configs/ablate.py [--config.x=y ...].

  --show_config   every field of the config: its value (after the --config.x=y overrides) and what it does
  --dry_run       the models, where their weights come from, the data, how many images and passes; no compute
  --helpfull      every flag
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vitsparse_jax.runtime import errors
from vitsparse_jax.runtime.config_defaults import expand_config_paths
from vitsparse_jax.runtime.workdir import Workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:preset]); set any field with --config.<name>=<value> "
    "and list them all with --show_config.", lock_config=True)
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every field of the config with its current value and a one-line help, then exit.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print which models, weights (built-in, converted file, hub, untrained), data, and how many "
    "images and forward / backward passes the run would do, then exit: nothing is computed or written.")
# Results files named by the line that ends a run, in this order (those the experiment wrote).
RESULT_FILES = ("results.json", "results.csv", "tables.md", "receptive_fields.csv", "metrics.csv")


def run(config) -> dict:
    from vitsparse_jax.experiments import REGISTRY

    if config.experiment not in REGISTRY:
        raise ValueError(f"unknown experiment {config.experiment!r}; one of {', '.join(REGISTRY)}")
    from vitsparse_jax.runtime import parallel

    parallel.initialize_distributed(**config.distributed)  # before anything touches a device
    import jax

    from vitsparse_jax.runtime import session

    expand_config_paths(config)   # `~` and $VARS in every path field
    workdir = Workdir(config.workdir)
    # lock, 'already complete' check, stop signals; config.json, versions.json and COMPLETE.json at the end
    with session.Session(config, workdir, data_identity=_data_identity) as s:
        if s.complete is not None:
            if jax.process_index() == 0:
                print(s.describe_complete(), file=sys.stderr, flush=True)
            return s.complete
        results = REGISTRY[config.experiment](config, workdir)
        s.finish()
    return results


def _data_identity(config) -> str:
    """The identity of config.data's images now (for the 'already complete' check)."""
    from vitsparse_jax import data

    return data.make_eval_source(config.data).identity


def finished_line(workdir: Workdir) -> str:
    """The line that ends every run: where its report and results files are."""
    files = [name for name in RESULT_FILES if workdir.path(name).exists()]
    report = workdir.path("report.md")
    results = f"; results: {workdir.path(files[0])}" + "".join(f", {name}" for name in files[1:]) if files else ""
    return f"report: {report}{results}"


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


def setup_logging() -> None:
    """absl logging at INFO, through tqdm, without jax's backend-probing INFO lines."""
    logging.getLogger("absl").setLevel(logging.INFO)
    logging.getLogger("jax._src.xla_bridge").addFilter(_drop_backend_probe)
    logging.getLogger("fontTools").setLevel(logging.WARNING)   # font subsetting of every PDF figure, at INFO
    handler = absl_logging.get_absl_handler().python_handler
    if handler.stream is sys.stderr:
        handler.stream = _TqdmStream()


def main(argv: list[str]) -> None:
    """The run, with the flags parsed (raises on errors; `cli` turns them into exit statuses)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/ablate.py")
    setup_logging()
    config = _CONFIG.value
    if _SHOW_CONFIG.value or _DRY_RUN.value:
        expand_config_paths(config)
        if _SHOW_CONFIG.value:
            from vitsparse_jax.runtime import config_help

            flag = flags.FLAGS["config"]
            print(config_help.describe_config(config, config_flags.get_config_filename(flag),
                                              config_flags.get_override_values(flag)), end="")
        if _DRY_RUN.value:
            from vitsparse_jax.experiments import dry_run

            print(dry_run.describe(config), end="")
        return
    run(config)
    import jax

    if jax.process_index() == 0:
        print(finished_line(Workdir(config.workdir)), flush=True)


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
    two lines and exit status 2; --verbose shows the traceback."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None:
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
                text = (f"cannot load the config file {spec}: {cause}. Give one of the files in configs/, e.g. "
                        "--config=configs/ablate.py (a preset after a colon: configs/ablate.py:paper)")
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
    try:
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)   # the last parse's --config.x override flags (ml_collections adds them)
        flags.FLAGS.unparse_flags()
        try:
            rest = _parse_flags(argv)
        except SystemExit as e:   # a flag or config error (printed), or --help
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return run_parsed(rest)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    app.run(run_parsed, flags_parser=_parse_flags)
