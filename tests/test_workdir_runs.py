"""Workdir consistency through the real command line, in this process (`vitsparse_jax.main.cli`; issue 16,
point 4): a finished run says it is complete, a refused run changes nothing, a second run in the same workdir
is refused naming the first, and the completion marker is removed before a rerun writes anything.

The finished run is the session's shared ablation (tests/shared_runs.py: the built-in default on 8 digits);
each test works on its own copy. Log lines (the pass's "images 0..8 of 8") are read through `caplog`."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from configs import ablate as ablate_config
from tests.shared_runs import RUNS
from vitsparse_jax import main
from vitsparse_jax.runtime.workdir import COMPLETE_FILE, Workdir

SMALL = [*RUNS["ablate"], "--config.progress=False"]   # the shared run's command (after --config.workdir)
PASS_LINE = "images 0..8 of 8"                          # logged when a pass over the 8 images starts


@pytest.fixture
def finished(finished_runs) -> Path:
    """The shared finished ablation (read only: tests copy it)."""
    return finished_runs.path("ablate")


@pytest.fixture(autouse=True)
def _in_process(monkeypatch, caplog):
    monkeypatch.delenv("VITSPARSE_JAX_VERBOSE", raising=False)
    caplog.set_level(logging.INFO)                      # the pass's log lines (python -m prints them on stderr)


def snapshot(workdir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_finished_run_started_again_says_it_is_complete_and_computes_nothing(finished, tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    marker = json.loads((workdir / COMPLETE_FILE).read_text())
    assert set(marker["files"]) >= {"results.json", "results.csv", "report.md", "config.json", "versions.json"}
    status = run_in_process(workdir, "--config.progress=True")   # how it is driven does not matter
    err = capsys.readouterr().err
    assert status == 0, err[-3000:]
    assert "already complete" in err and str(workdir / "report.md") in err
    assert "--config.resume=False" in err and PASS_LINE not in err + caplog.text   # no pass ran
    assert snapshot(workdir) == before                    # nothing rewritten


def run_in_process(workdir: Path, *args: str) -> int:
    return main.cli(["vitsparse_jax.main", *SMALL, f"--config.workdir={workdir}", *args])


def test_a_finished_run_started_with_another_setting_says_once_what_differs_and_what_to_do(finished, tmp_path,
                                                                                           capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    status = run_in_process(workdir, "--config.ablation.draws=2")   # another config: the saved rows do not fit
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir} holds the finished results of another config "
                           "(ablation.draws: 3 -> 2)"), last
    assert "--config.workdir" in last and "--config.resume=False" in last
    # one message: not "running this one", then an error about an "unfinished run"
    assert err.count("holds the") == 1 and "running this one" not in err and "unfinished" not in err, err
    assert snapshot(workdir) == before                    # config.json, results and marker untouched


def test_a_setting_that_reuses_the_saved_passes_says_so_once(finished, tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    status = run_in_process(workdir, "--config.ablation.bootstrap=20")   # a change of the report only
    err = capsys.readouterr().err
    assert status == 0, err[-3000:]
    said = [line for line in (err + caplog.text).splitlines() if "holds the finished results" in line]
    assert len(said) == 1 and "another config (ablation.bootstrap: 1000 -> 20)" in said[0], err
    assert "reusing the saved passes" in said[0] and "will replace them" in said[0]
    assert PASS_LINE not in err + caplog.text            # nothing computed again
    assert json.loads((workdir / COMPLETE_FILE).read_text())["config"]["ablation"]["bootstrap"] == 20


def _disk_full_at(monkeypatch, when) -> list[str]:
    """The result write `when` (its number from 1, or its file name) fails with a full disk, through the
    project's own write function. Returns the names written."""
    import errno

    from vitsparse_jax.runtime import workdir as workdir_mod

    original, written = workdir_mod.atomic_write_bytes, []

    def write(path, data, *, invalidate=True, result=True):
        if invalidate and result:
            written.append(os.path.basename(path))
            if when in (len(written), written[-1]):
                raise workdir_mod.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return original(path, data, invalidate=invalidate, result=result)

    monkeypatch.setattr(workdir_mod, "atomic_write_bytes", write)
    return written


STATES = ("resume_state.npz",)


def test_a_full_disk_at_the_marker_leaves_the_old_complete_set_as_it_was(finished, tmp_path, capsys, monkeypatch):
    # a finished workdir started again with a report-only change; every new file is written, then the marker
    # cannot be: the old complete set stays, byte for byte, with its marker
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    with monkeypatch.context() as mp:
        written = _disk_full_at(mp, COMPLETE_FILE)
        status = run_in_process(workdir, "--config.ablation.bootstrap=20")
    err = capsys.readouterr().err
    assert status == 2 and "the disk is full" in err.strip().splitlines()[-1], err[-3000:]
    assert written[-1] == COMPLETE_FILE and {"results.json", "report.md", "config.json"} <= set(written), written
    assert snapshot(workdir) == before                    # every file and COMPLETE.json as they were
    assert not [p for p in workdir.rglob(".*") if p.name != ".lock"]   # no moved-aside copies left


def test_a_full_disk_part_way_leaves_nothing_new_beside_the_saved_state(finished, tmp_path, capsys, caplog,
                                                                        monkeypatch):
    # the passes are saved, no result file yet (as after a crash in the final write)
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    for p in list(workdir.rglob("*")):
        if p.is_file() and p.name not in STATES + (".lock",):
            p.unlink()
    with monkeypatch.context() as mp:
        written = _disk_full_at(mp, 4)                    # three result files written, the 4th fails
        status = run_in_process(workdir)
    assert status == 2 and "the disk is full" in capsys.readouterr().err, written
    left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
    assert all(name == ".lock" or name.endswith(STATES) for name in left), left   # nothing new beside the states
    caplog.clear()
    assert run_in_process(workdir) == 0                   # a free disk: the same command writes the set
    assert PASS_LINE not in capsys.readouterr().err + caplog.text   # from the saved passes, nothing computed again
    assert (workdir / COMPLETE_FILE).exists()


def test_a_second_run_in_the_same_workdir_is_refused_naming_the_first(tmp_path, capsys):
    workdir = Workdir(tmp_path / "run")
    with workdir.lock("python -m vitsparse_jax.main --config=configs/ablate.py (the first run)"):
        status = run_in_process(workdir.root)              # its own open file: the flock refuses it
        assert not any(p.name != ".lock" for p in workdir.root.iterdir())   # nothing written
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"in use by another run (pid {os.getpid()} on host" in last and "(the first run)" in last


def get_config():
    """The shared run's config (SMALL) as main.run takes it."""
    config = ablate_config.get_config()
    config.progress = False
    config.data.update(num_images=8, batch_size=8)
    return config


def test_the_marker_goes_before_a_rerun_writes_and_comes_back_last(finished, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    config = get_config()
    config.workdir = str(workdir)
    config.ablation.bootstrap = 20                          # a change in the report only: rows are reused
    seen = []
    original = Workdir.write_text

    def spy(self, name, text):   # after each result file is written: the old marker must be gone already
        written = original(self, name, text)
        seen.append((name, (Path(self.root) / COMPLETE_FILE).exists()))
        return written

    monkeypatch.setattr(Workdir, "write_text", spy)
    main.run(config)
    assert seen and not any(present for _, present in seen), seen    # no result written beside a marker
    marker = json.loads((workdir / COMPLETE_FILE).read_text())
    assert marker["config"]["ablation"]["bootstrap"] == 20
    for name, entry in marker["files"].items():              # the marker describes the files as they are
        assert (workdir / name).stat().st_size == entry["size"], name
