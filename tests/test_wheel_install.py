"""A user outside the checkout: the wheel built from this tree (not an editable install), installed without
dependencies into a separate folder over this environment, runs a tiny job from an empty folder with
`--config=ablate`, and again with `--config=configs/ablate.py` (that folder has no configs/: the installed copy
is used), which finds the same config: the run is complete and a dry run says nothing would run. The job's
last line names report.html and results.json under the current folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "configs", "vitsparse_jax", "checkpoints_convert")
TINY = ("--config.data.num_images=8", "--config.data.batch_size=8", "--config.ablation.p=0.1",
        "--config.ablation.n=1", "--config.ablation.draws=1", "--config.ablation.bootstrap=10",
        "--config.ablation.whole_layer_reference=False", "--config.ablation.explore_images=1",
        "--config.progress=False", "--config.workdir=runs/tiny")


def _setuptools_or_skip() -> None:
    """The wheel is built without build isolation (no network): setuptools must be installed (the test extra
    has it). Missing: skipped here, a failure on CI."""
    try:
        import setuptools
    except ImportError:
        setuptools = None
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:1]) if setuptools else (0,)
    if version < (77,):
        reason = "building the wheel needs setuptools >= 77 (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_the_installed_wheel_runs_a_job_from_an_empty_folder(tmp_path):
    _setuptools_or_skip()
    src, wheels, target, empty = (tmp_path / name for name in ("src", "wheels", "site", "empty"))
    src.mkdir()
    for name in SOURCES:   # a copy: building in the checkout would write build/ and *.egg-info into it
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(src)], tmp_path, env)
    wheel, = wheels.glob("vitsparse_jax-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], tmp_path, env)
    assert (target / "vitsparse_jax" / "configs" / "ablate.py").is_file()
    assert (target / "vitsparse_jax" / "assets" / "images" / "grace_hopper.jpg").is_file()

    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "VITSPARSE_JAX_FIGURE_DPI": "60"}
    main = [sys.executable, "-m", "vitsparse_jax.main"]
    first = _run([*main, "--config=ablate", *TINY], empty, env)
    runs = empty / "runs" / "tiny"
    assert first.stdout.strip().splitlines()[-1] == (
        f"report: {runs}/report.html, report.md; results: {runs}/results.json, results.csv, tables.md")

    again = _run([*main, "--config=configs/ablate.py", *TINY, "--show_config", "--dry_run"], empty, env)
    header = again.stdout.splitlines()[0]
    assert header.startswith(f"# {target}/vitsparse_jax/configs/ablate.py,"), header   # the wheel's copy
    assert "nothing would run: already complete" in again.stdout, again.stdout[-2000:]
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]
