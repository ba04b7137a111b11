"""Figures drawn by worker processes (runtime/figure_pool.py): the same files as drawn in the run's own process,
errors raised with their figure, files undone with a failed final write, and a whole run with a worker."""
import json
import logging
import time

import numpy as np
import pytest

from vitsparse_jax import main
from vitsparse_jax.experiments.sparsity import figures as figs
from vitsparse_jax.runtime import figure_pool
from vitsparse_jax.runtime.workdir import Workdir

EDGES = np.linspace(0.0, 6.0, 31)
DENSITY = np.random.default_rng(0).random(30)


@pytest.fixture
def one_worker():
    figure_pool.start(1)
    yield
    figure_pool.stop()


def test_a_worker_draws_the_same_file_as_this_process(tmp_path, one_worker, caplog):
    here, there = Workdir(tmp_path / "here"), Workdir(tmp_path / "there")
    here.save_figure(figs.nu_density(EDGES, DENSITY, 2.0, "t"), "nu")
    with caplog.at_level(logging.INFO), figure_pool.drawing():
        there.figure("nu", figs.nu_density, EDGES, DENSITY, 2.0, "t")
        assert figure_pool._pending, "the figure went to the free worker"
    assert (there.path("nu.png")).read_bytes() == here.path("nu.png").read_bytes()
    for _ in range(50):   # the progress line comes from the job's completion callback, a moment later
        if "figure nu written (png" in caplog.text:
            break
        time.sleep(0.05)
    assert "figure nu written (png" in caplog.text


def test_with_every_worker_busy_the_figure_is_drawn_here(tmp_path, one_worker):
    wd = Workdir(tmp_path)
    with figure_pool.drawing():
        wd.figure("a", figs.nu_density, EDGES, DENSITY, 2.0, "a")
        wd.figure("b", figs.nu_density, EDGES, DENSITY, 2.0, "b")   # the worker is busy with a
        assert [job.stem for job in figure_pool._pending] == ["a"] and wd.path("b.png").is_file()
    assert wd.path("a.png").is_file()


def test_an_error_in_a_worker_is_raised_with_the_run(tmp_path, one_worker):
    with pytest.raises(ValueError, match="Size mismatch") as raised, figure_pool.drawing():
        Workdir(tmp_path).figure("bad", figs.nu_density, EDGES, DENSITY[:1], 2.0, "t")   # 31 edges, 1 value
    assert "figure bad" in "".join(getattr(raised.value, "__notes__", ["figure bad"]))


def density_or_die(*args):
    """A figure that kills the figure worker drawing it (drawn normally in the run's own process)."""
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:
        os._exit(1)
    return figs.nu_density(*args)


def test_a_dead_worker_s_figures_are_drawn_here(tmp_path, one_worker, caplog):
    wd = Workdir(tmp_path)
    with caplog.at_level(logging.WARNING), figure_pool.drawing():
        wd.figure("a", density_or_die, EDGES, DENSITY, 2.0, "a")
    assert wd.path("a.png").is_file() and "stopped unexpectedly" in caplog.text
    with figure_pool.drawing():   # the rest of the run draws here, without another warning
        wd.figure("b", figs.nu_density, EDGES, DENSITY, 2.0, "b")
        assert not figure_pool._pending and wd.path("b.png").is_file()


def test_a_failed_final_write_undoes_the_files_a_worker_wrote(tmp_path, one_worker):
    wd = Workdir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="later step"), wd.final_set(), figure_pool.drawing():
        wd.write_text("report.md", "# report\n")
        wd.figure("nu", figs.nu_density, EDGES, DENSITY, 2.0, "t")
        raise RuntimeError("a later step of the final write failed")
    assert not wd.path("nu.png").exists() and not wd.path("report.md").exists()


def test_a_run_with_a_figure_worker(tmp_path, monkeypatch):
    monkeypatch.setenv(figure_pool.WORKERS_ENV, "1")
    assert main.cli(["vitsparse_jax.main", "--config=sparsity", f"--config.workdir={tmp_path}",
                     "--config.data.num_images=8", "--config.progress=False"]) == 0
    figures = json.loads((tmp_path / "results.json").read_text())["figures"]
    assert figures and all((tmp_path / f"{stem}.png").is_file() for stem in figures)
    assert figure_pool._pool is None   # stopped with the run
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= len(figures)


def test_the_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(figure_pool.WORKERS_ENV, "3")
    assert figure_pool.workers() == 3
    monkeypatch.setenv(figure_pool.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="whole number"):
        figure_pool.workers()


def test_workers_end_with_a_run_killed_outright(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    script = ("import time\nfrom vitsparse_jax.runtime import figure_pool\nfigure_pool.start(1)\n"
              "figure_pool._pool.submit(figure_pool._ready).result()\n"
              "print(*figure_pool._pool._processes, flush=True)\ntime.sleep(60)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    (worker,) = map(int, run.stdout.readline().split())
    run.send_signal(signal.SIGKILL)
    run.wait()
    for _ in range(100):   # the worker sees its parent gone and exits
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("a figure worker outlived its killed run")
