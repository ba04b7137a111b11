"""Stopping (issue 16, points 1 and 6), through the real command line.

- One process: SIGTERM / SIGINT stop after the current batch with one line (images done, how to continue),
  no traceback, and the conventional status (143 / 130); the same command then continues.
- Two processes (`jax.distributed` on localhost, 1 fake CPU device each): SIGTERM to one of them (a
  preempted host) stops both at the same batch, with the state saved once, consistent, and both exit 143
  (before the fix, the other process waited in the next collective until killed).
Bounded: every process has a timeout. Tiny: vit_pico on the built-in digits, a 1 x 1 x 1 grid.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = "vit_pico_patch4_32.digits"
ARGS = ["--config=configs/ablate.py", "--config.data.batch_size=4", "--config.progress=False",
        "--config.ablation.p=0.1", "--config.ablation.n=1", "--config.ablation.draws=1",
        "--config.ablation.bootstrap=10"]
STARTED = "images 0..400 of 400"      # the pass's first log line: signals from here on reach the loop
TIMEOUT = 420


def start(workdir: Path, log: Path, *extra: str, devices: int = 4) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VITSPARSE_JAX_VERBOSE"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "vitsparse_jax.main", *ARGS, f"--config.workdir={workdir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)


def wait_for(log: Path, text: str, procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            kill(procs)
            pytest.fail(f"{text!r} never appeared in {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        kill(procs)
        pytest.fail("a process did not stop in time (waiting in a collective?)")


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def saved_rows(workdir: Path) -> tuple[int, np.ndarray]:
    from vitsparse_jax.runtime.workdir import Workdir

    arrays, meta = Workdir(workdir / RUN).load_state()
    return int(meta["next_index"]), arrays["done"]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_batch_with_one_line_and_the_conventional_status(tmp_path, sig, status):
    workdir, log = tmp_path / "run", tmp_path / "log"
    proc = start(workdir, log)
    wait_for(log, STARTED, [proc])
    proc.send_signal(sig)
    assert finish([proc]) == [status], log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    line = last_line(log)
    assert line.startswith(f"stopped ({signal.Signals(sig).name}) at image ") and "of 400" in line
    assert "run the same command again to continue" in line and str(workdir / RUN) in line
    done, rows = saved_rows(workdir)
    assert f"at image {done} of 400" in line and 0 < done < 400
    assert rows[:done].all() and not rows[done:].any()      # exactly the images before the stop
    assert not (workdir / "results.json").exists() and not (workdir / "config.json").exists()
    if sig == signal.SIGTERM:                               # the same command continues to the end
        proc = start(workdir, tmp_path / "log2")
        assert finish([proc]) == [0], (tmp_path / "log2").read_text()[-3000:]
        assert f"resuming at image {done} of 400" in (tmp_path / "log2").read_text()
        assert (workdir / "COMPLETE.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(workdir: Path, logs: list[Path]) -> list[subprocess.Popen]:
    port = free_port()
    dist = [f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
    return [start(workdir, logs[i], *dist, f"--config.distributed.process_id={i}", devices=1) for i in range(2)]


def test_sigterm_to_one_host_stops_every_host_at_the_same_batch(tmp_path):
    workdir = tmp_path / "run"
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    procs = start_pair(workdir, logs)
    wait_for(logs[1], STARTED, procs)
    procs[1].send_signal(signal.SIGTERM)                    # process 1's host is preempted
    statuses = finish(procs)
    texts = [log.read_text() for log in logs]
    assert statuses == [143, 143], "\n\n".join(t[-2000:] for t in texts)
    assert not any("Traceback" in t for t in texts)
    lines = [last_line(log) for log in logs]
    assert lines[0] == lines[1] and lines[0].startswith("stopped (SIGTERM) at image "), lines
    done, rows = saved_rows(workdir)                        # saved once (process 0), consistent
    assert f"at image {done} of 400" in lines[0] and 0 < done < 400
    assert rows[:done].all() and not rows[done:].any()
    # the same two commands continue from there to the end
    logs2 = [tmp_path / "p0b.log", tmp_path / "p1b.log"]
    procs = start_pair(workdir, logs2)
    statuses = finish(procs)
    assert statuses == [0, 0], "\n\n".join(log.read_text()[-2000:] for log in logs2)
    assert f"resuming at image {done} of 400" in logs2[1].read_text()
    _, rows = saved_rows(workdir)
    assert rows.all() and (workdir / "COMPLETE.json").exists()
