"""Finished tiny runs shared by the whole test session (fixture `finished_runs`, imported by conftest.py).

Each run is the shipped config on the built-in models, made small, through the real command line in this
process (`vitsparse_jax.main.cli`); it runs once per session, the first time a test asks for it. Under
pytest-xdist the workers share one copy: the first worker that needs a run computes it while holding a file
lock, the others wait for it and read it. A finished run is read-only by convention: a test that writes
into a workdir (a rerun, a damaged file) copies it first (`FinishedRuns.copy`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> the command's arguments after `--config.workdir=...` (`FinishedRuns.argv` adds the program and workdir)
RUNS: dict[str, tuple[str, ...]] = {
    # the built-in vit_pico (trained) on 8 digits; example image 2; per-image outputs on
    "sparsity": (f"--config={ROOT / 'configs' / 'sparsity.py'}", "--config.data.num_images=8",
                 "--config.data.batch_size=8", "--config.sparsity.example_index=2",
                 "--config.sparsity.per_image=True"),
    # the built-in vit_pico on 8 digits, the paper's grid (4 p x 3 n, 3 random draws)
    "ablate": (f"--config={ROOT / 'configs' / 'ablate.py'}", "--config.data.num_images=8",
               "--config.data.batch_size=8"),
    # the built-in vit_pico, trained and untrained, every layer, on 8 digits
    "receptive_field": (f"--config={ROOT / 'configs' / 'receptive_field.py'}", "--config.data.num_images=8",
                        "--config.data.batch_size=8"),
    # the shipped locality command (built-in vit_pico and vgg_pico, trained and untrained) on 6 digits
    "locality": (f"--config={ROOT / 'configs' / 'locality.py'}", "--config.data.num_images=6",
                 "--config.data.batch_size=8"),
}


class FinishedRuns:
    """The session's finished runs: `path(name)` computes a run on first use and returns its workdir."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def argv(self, name: str, workdir: Path | str | None = None, *extra: str) -> list[str]:
        """The command line of run `name` (for `main.cli`), in `workdir` (default: the shared one)."""
        workdir = self.root / name if workdir is None else workdir
        return ["vitsparse_jax.main", *RUNS[name], f"--config.workdir={workdir}", "--config.progress=False", *extra]

    def path(self, name: str) -> Path:
        workdir, done = self.root / name, self.root / f"{name}.done"
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # another worker computing it: wait for it
            if not done.exists():
                from vitsparse_jax.main import cli

                log = self.root / f"{name}.log"          # its output, not the output of the test that asked first
                with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    status = cli(self.argv(name))
                assert status == 0, f"the shared {name} run failed with status {status}:\n{log.read_text()[-3000:]}"
                done.touch()
        return workdir

    def copy(self, name: str, dest: Path) -> Path:
        """A private copy of run `name` at `dest` (for tests that write into it)."""
        shutil.copytree(self.path(name), dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory: pytest.TempPathFactory) -> FinishedRuns:
    if os.environ.get("PYTEST_XDIST_WORKER"):     # one folder for every worker of this session
        return FinishedRuns(tmp_path_factory.getbasetemp().parent / "finished_runs")
    return FinishedRuns(tmp_path_factory.mktemp("finished_runs"))
