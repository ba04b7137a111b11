"""Workdir consistency through the real command line (issue 16, point 4): a finished run says it is complete,
a refused run changes nothing, a second run in the same workdir is refused naming the first, and the
completion marker is removed before a rerun writes anything."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitsparse_jax import main
from vitsparse_jax.runtime.workdir import COMPLETE_FILE, Workdir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.data.num_images=16", "--config.data.batch_size=8", "--config.progress=False",
         "--config.ablation.p=0.1", "--config.ablation.n=1", "--config.ablation.draws=1",
         "--config.ablation.bootstrap=10"]


def cli(workdir: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vitsparse_jax.main", "--config=configs/ablate.py", f"--config.workdir={workdir}",
           *SMALL, *args]
    env = {k: v for k, v in os.environ.items() if k != "VITSPARSE_JAX_VERBOSE"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished") / "run"
    proc = cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def snapshot(workdir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_finished_run_started_again_says_it_is_complete_and_computes_nothing(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    marker = json.loads((workdir / COMPLETE_FILE).read_text())
    assert set(marker["files"]) >= {"results.json", "results.csv", "report.md", "config.json", "versions.json"}
    proc = cli(workdir, "--config.progress=True")          # how it is driven does not matter
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" in proc.stderr and str(workdir / "report.md") in proc.stderr
    assert "--config.resume=False" in proc.stderr and "images 0..16" not in proc.stderr   # no pass ran
    assert snapshot(workdir) == before                    # nothing rewritten


def test_a_refused_run_leaves_the_workdir_as_it_was(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    proc = cli(workdir, "--config.ablation.draws=2")       # another config: the saved rows do not fit
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "different config" in last and "grid.draws" in last
    assert "--config.workdir" in last and "--config.resume=False" in last
    assert snapshot(workdir) == before                    # config.json, results and marker untouched


def test_a_second_run_in_the_same_workdir_is_refused_naming_the_first(tmp_path):
    workdir = Workdir(tmp_path / "run")
    with workdir.lock("python -m vitsparse_jax.main --config=configs/ablate.py (the first run)"):
        proc = cli(workdir.root)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"in use by another run (pid {os.getpid()} on host" in last and "(the first run)" in last
    assert not any(p.name != ".lock" for p in workdir.root.iterdir())   # nothing written


def get_config():
    spec = importlib.util.spec_from_file_location("ablate_config", ROOT / "configs" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.progress = False
    config.data.update(num_images=16, batch_size=8)
    config.ablation.update(p=(0.1,), n=(1,), draws=1, bootstrap=10)
    return config


def test_the_marker_goes_before_a_rerun_writes_and_comes_back_last(finished, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    config = get_config()
    config.workdir = str(workdir)
    config.ablation.bootstrap = 20                          # a change in the report only: rows are reused
    seen = []
    original = Workdir.write_text

    def spy(self, name, text):
        seen.append((name, (Path(self.root) / COMPLETE_FILE).exists()))
        return original(self, name, text)

    monkeypatch.setattr(Workdir, "write_text", spy)
    main.run(config)
    assert seen and not any(present for _, present in seen), seen    # no result written beside a marker
    marker = json.loads((workdir / COMPLETE_FILE).read_text())
    assert marker["config"]["ablation"]["bootstrap"] == 20
    for name, entry in marker["files"].items():              # the marker describes the files as they are
        assert (workdir / name).stat().st_size == entry["size"], name
