"""One run in one workdir: the lock, the 'already complete' check, stop signals, and the final set.

    with session.Session(config, workdir, data_identity=...) as s:
        if s.complete is not None:          # the same config already finished here, inputs unchanged
            return s.complete
        with s.final_write():               # all or nothing: the result files, then
            results, inputs = experiment(config, workdir)
            s.finish(inputs)                # config.json, versions.json, then COMPLETE.json (last)

What it guarantees (docs/design.md, "Guarantees"):

- one run per workdir: process 0 holds an flock on `<workdir>/.lock` for the whole run; a second run
  stops at once with a message naming the holder (host, pid, start time, command);
- a finished run started again with the same config (fields other than workdir, resume, progress and
  distributed) and unchanged inputs (weights content, data identity) prints that it is complete and where
  the results are, and computes nothing;
- the result set is marked complete by `COMPLETE.json`, written after every other file; any later write
  into the workdir removes it first; `config.json` and `versions.json` are part of that set, so a refused
  run (another config, other inputs) leaves the workdir as it was;
- `final_write()`: the result files written in the block and the marker are one all-or-nothing write: if
  the block fails part-way (a full disk), every file it wrote is removed and every file it replaced is put
  back, so the workdir holds the complete new set with its marker, or what it held before plus the resume
  states;
- a finished run of another config (or other inputs) in the workdir is said once: by the first resume
  state check (reused, or refused with what differs and what to do), or when a pass starts with no state.

With several processes, process 0 decides (lock, completeness) and every process follows.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import Any, Callable, Iterator

import numpy as np

from vitsparse_jax.runtime import fingerprint, parallel, resumable, stopping
from vitsparse_jax.runtime.errors import WorkdirLocked
from vitsparse_jax.runtime.workdir import COMPLETE_FILE, Workdir, figure_options_of, to_json

log = logging.getLogger(__name__)
# Config fields that change neither the results nor the files (where they go, how a run is driven).
NOT_RESULTS = ("workdir", "resume", "progress", "distributed")


def results_config(config: Any) -> dict[str, Any]:
    """The config as results depend on it (for the completion marker)."""
    d = json.loads(to_json(config))
    return {k: v for k, v in d.items() if k not in NOT_RESULTS}


def config_differences(old: Any, new: Any, limit: int = 4) -> str:
    """'ablation.draws: 1 -> 2, seed: 0 -> 1' for two results configs (at most `limit` fields)."""
    def get(tree: Any, path: str) -> Any:
        for part in path.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return "(absent)"
            tree = tree[part]
        return tree

    def short(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) or value == "(absent)" else repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    paths = resumable.key_differences(old, new)
    parts = [f"{p}: {short(get(old, p))} -> {short(get(new, p))}" for p in paths[:limit]]
    return ", ".join(parts) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


class Session:
    """Context manager around one run (see the module docstring)."""

    def __init__(self, config: Any, workdir: Workdir, *,
                 data_identity: Callable[[Any], str | None] | None = None, command: str | None = None):
        self.config, self.workdir = config, workdir
        self.data_identity = data_identity
        if command is None:
            argv = list(sys.argv)
            if argv and argv[0].endswith(("vitsparse_jax/main.py", "vitsparse_jax\\main.py")):
                argv[0] = "python -m vitsparse_jax.main"
            command = " ".join(argv)
        self.command = command
        self.complete: dict[str, Any] | None = None
        self._stack = contextlib.ExitStack()

    @property
    def is_writer(self) -> bool:
        import jax

        return jax.process_index() == 0

    def __enter__(self) -> Session:
        stack = self._stack.__enter__()
        resumable.clear_finished_run()
        stack.callback(resumable.clear_finished_run)
        try:
            stack.enter_context(figure_options_of(self.config))   # config.figures / figure_dpi for save_figure
            stack.enter_context(stopping.handle_signals())
            self._lock(stack)
            complete = self._check_complete() if self.is_writer else None
            if parallel.from_first(np.int32(complete is not None)):
                self.complete = complete if complete is not None else {"complete": True}
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def _lock(self, stack: contextlib.ExitStack) -> None:
        error = None
        if self.is_writer:
            try:
                stack.enter_context(self.workdir.lock(self.command))
            except WorkdirLocked as e:
                error = e
        if not parallel.agree(error is None):
            raise error or WorkdirLocked(f"process 0 could not lock the workdir {self.workdir.root} (its output "
                                         "says who holds it)")

    def check_complete(self) -> dict[str, Any] | None:
        """The 'already complete' check alone, without the lock (--dry_run): the results of a finished run of
        this config with unchanged inputs, else None."""
        return self._check_complete()

    def _check_complete(self) -> dict[str, Any] | None:
        """The results of a finished run of this config with unchanged inputs, else None."""
        marker = self.workdir.read_completion()
        if marker is None or not self.config.get("resume", True):
            return None
        config = results_config(self.config)
        if marker.get("config") != config:   # said once, by the first pass (resumable.check_state_key)
            resumable.note_finished_run(self.workdir.root, "another config (" + config_differences(
                marker.get("config"), config) + ")")
            return None
        changed = self._changed_inputs(marker.get("inputs", []))
        if changed:
            resumable.note_finished_run(self.workdir.root, f"this config from other inputs ({', '.join(changed)} "
                                                           "changed since)")
            return None
        results = self.workdir.path("results.json")
        try:
            out = json.loads(results.read_text()) if results.exists() else dict(marker)
        except (OSError, ValueError):
            return None
        return out

    def _changed_inputs(self, inputs: list[dict[str, Any]]) -> list[str]:
        changed = []
        identities = {i["identity"] for i in inputs if "identity" in i}
        for entry in inputs:
            if "sha256" in entry and fingerprint.weights(entry["weights"]) != entry:
                changed.append(f"weights {entry['weights']}")
        if identities and self.data_identity is not None:
            try:
                now = self.data_identity(self.config)
            except Exception as e:  # noqa: BLE001  (the data cannot be opened any more: not complete)
                now = f"unavailable ({e})"
            if now is not None and now not in identities:
                changed.append("data")
        return changed

    def describe_complete(self) -> str:
        """One line: the run is complete and where its results are."""
        marker = self.workdir.read_completion() or {}
        files = [f for f in ("report.md", "results.json") if self.workdir.path(f).exists()]
        where = ", ".join(str(self.workdir.path(f)) for f in files) or str(self.workdir.root)
        return (f"already complete: {self.workdir.root} holds the results of this config "
                f"(finished {marker.get('finished', '?')}; {where}). Nothing to do; to compute them again use "
                f"--config.resume=False, or another --config.workdir.")

    @contextlib.contextmanager
    def final_write(self) -> Iterator[None]:
        """The run's final write, all or nothing (`Workdir.final_set`, process 0): the result files written in
        the block and `finish()` (which the block calls last). If the block raises part-way (a full disk, an
        error, a stop), what it wrote is removed and what it replaced is put back: the workdir then holds what
        it held before, plus the resume states, and never a partial set. Resume states written in the block
        stay, so the same command redoes only the writing."""
        with self.workdir.final_set() if self.is_writer else contextlib.nullcontext():
            yield

    def finish(self, inputs: list[dict[str, Any]]) -> None:
        """Writes config.json, versions.json and, last, COMPLETE.json (process 0). `inputs`: the weights and
        data fingerprints of every pass (`fingerprint.inputs` of each resume key, as the driver collects them)."""
        if not self.is_writer:
            return
        resumable.say_finished_run("computed this config")
        self.workdir.write_metadata(self.config)
        self.workdir.write_completion({
            "config": results_config(self.config),
            "inputs": list(inputs),
            "command": self.command,
            "note": f"{COMPLETE_FILE} is written after every other file of the run and removed before any "
                    "file of the workdir changes: the files listed here are one complete, consistent set."})
