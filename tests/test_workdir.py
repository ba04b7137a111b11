"""The workdir: write failures as clear errors, the lock, the completion marker, damaged resume states,
weights fingerprints (issue 16, points 2-4)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vitsparse_jax.runtime import errors, fingerprint
from vitsparse_jax.runtime import workdir as workdir_mod
from vitsparse_jax.runtime.errors import StateError, WorkdirError, WorkdirLocked
from vitsparse_jax.runtime.workdir import COMPLETE_FILE, Workdir, atomic_write_bytes

# --------------------------------------------------------------------------- write failures name the file

@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EACCES, "permission denied")])
def test_a_failed_write_names_the_file_the_cause_and_the_fix(tmp_path, monkeypatch, code, words):
    wd = Workdir(tmp_path / "run")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WorkdirError) as info:
        wd.write_json("results.json", {"a": 1})
    text = str(info.value)
    assert words in text and str(wd.path("results.json")) in text and "--config.workdir" in text
    assert errors.is_user_error(info.value)
    assert not wd.path("results.json").exists()
    assert [p.name for p in wd.root.iterdir()] == []          # no temporary file left behind


def test_a_workdir_that_is_a_file_or_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file, not a folder"):
        Workdir(tmp_path / "file")
    with pytest.raises(WorkdirError, match="cannot create the workdir .*file/sub"):
        Workdir(tmp_path / "file" / "sub" / "run")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if not os.access(readonly, os.W_OK):        # (root may write anyway)
            with pytest.raises(WorkdirError, match="cannot create the workdir .*ro/run: permission denied"):
                Workdir(readonly / "run")
    finally:
        readonly.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]   # checked without creating anything


def test_a_new_workdir_is_made_by_the_lock_and_removed_with_it_when_nothing_was_written(tmp_path):
    wd = Workdir(tmp_path / "a" / "b" / "run")
    assert not (tmp_path / "a").exists()                 # Workdir(path) only checks
    with wd.lock():
        assert wd.path(".lock").exists()
        Workdir(wd.root / "model")                       # a sub-workdir: nothing written in it either
    assert not (tmp_path / "a").exists()                 # no folder, no .lock, no parent left
    with wd.lock():
        wd.write_json("results.json", {"a": 1})
    assert sorted(p.name for p in wd.root.iterdir()) == [".lock", "results.json"]
    (tmp_path / "existing").mkdir()
    with Workdir(tmp_path / "existing").lock():
        pass
    assert list((tmp_path / "existing").iterdir()) == []  # an existing folder stays, without a .lock


# ------------------------------------------------------------------------------------------- the lock

def _hold_lock_in_subprocess(path, ready):
    code = textwrap.dedent(f"""
        import time, pathlib
        from vitsparse_jax.runtime.workdir import Workdir
        with Workdir({str(path)!r}).lock("the other run --config.x=1"):
            pathlib.Path({str(ready)!r}).write_text("locked")
            time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_second_run_is_refused_with_the_holder_named_and_the_lock_ends_with_its_process(tmp_path):
    ready = tmp_path / "ready"
    holder = _hold_lock_in_subprocess(tmp_path / "run", ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and holder.poll() is None, "the lock holder did not start"
            time.sleep(0.1)
        with pytest.raises(WorkdirLocked) as info:
            with Workdir(tmp_path / "run").lock():
                pass
        text = str(info.value)
        assert f"pid {holder.pid}" in text and "the other run --config.x=1" in text and "in use" in text
        assert "--config.workdir" in text
    finally:
        holder.kill()                                   # SIGKILL: no cleanup code runs ...
        holder.wait(timeout=30)
    with Workdir(tmp_path / "run").lock() as me:        # ... and still the lock is free (no stale lock)
        assert me["pid"] == os.getpid()


# ------------------------------------------------------------------------------- the completion marker

def test_the_marker_lists_every_file_and_any_later_write_removes_it_first(tmp_path):
    wd = Workdir(tmp_path)
    wd.write_json("results.json", {"a": 1})
    wd.write_text("report.md", "# r\n")
    wd.save_state({"x": np.zeros(3)}, {"next_index": 3})
    sub = Workdir(tmp_path / "model")
    sub.save_state({"x": np.zeros(3)}, {"next_index": 3})
    wd.write_completion({"config": {"seed": 0}})
    marker = wd.read_completion()
    assert set(marker["files"]) == {"results.json", "report.md"}   # not the resume states
    assert marker["files"]["report.md"]["size"] == 4 and len(marker["files"]["report.md"]["sha256"]) == 64
    # a cache that changes no result (a weights file's sha256 sidecar) leaves it in place
    atomic_write_bytes(tmp_path / "w.safetensors.sha256", b"{}", invalidate=False)
    assert wd.path(COMPLETE_FILE).exists()
    # any write into the workdir (also by another Workdir object, also a state) removes it before writing
    sub.save_state({"x": np.ones(3)}, {"next_index": 3})
    assert not wd.path(COMPLETE_FILE).exists()
    wd.write_completion({"config": {"seed": 0}})
    wd.write_text("results.csv", "a\n")
    assert wd.read_completion() is None


def _write_that_fails_at(monkeypatch, failing: int) -> list[str]:
    """Makes the `failing`-th result write (counted from 1) fail with a full disk, through the project's own
    write function; returns the names written."""
    original, written = workdir_mod.atomic_write_bytes, []

    def write(path, data, *, invalidate=True, result=True):
        if invalidate and result:
            written.append(os.path.basename(path))
            if len(written) == failing:
                raise workdir_mod.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return original(path, data, invalidate=invalidate, result=result)

    monkeypatch.setattr(workdir_mod, "atomic_write_bytes", write)
    return written


def test_a_final_write_that_fails_part_way_puts_every_file_back(tmp_path, monkeypatch):
    wd = Workdir(tmp_path / "run")
    wd.write_json("results.json", {"old": 1})
    wd.write_text("report.md", "old\n")
    wd.save_state({"x": np.zeros(3)}, {"next_index": 3})
    wd.write_completion({"config": {"seed": 0}})
    before = {p.name: p.read_bytes() for p in wd.root.iterdir()}
    written = _write_that_fails_at(monkeypatch, 4)
    with pytest.raises(WorkdirError, match="disk is full"):
        with wd.final_set():
            wd.save_state({"x": np.ones(3)}, {"next_index": 3})   # a resume state: kept whatever happens
            wd.write_json("results.json", {"new": 1})               # replaces an old file
            Workdir(wd.root / "model").write_text("new.csv", "a\n")  # a new file in a new folder
            wd.write_text("report.md", "new\n")
            wd.write_text("tables.md", "never written\n")          # the 4th: the disk is full
    assert written == ["results.json", "new.csv", "report.md", "tables.md"]
    after = {p.name: p.read_bytes() for p in wd.root.iterdir()}
    assert after.keys() == before.keys()                  # nothing new, no leftovers, the marker is back
    assert {k: v for k, v in after.items() if k != "resume_state.npz"} == {
        k: v for k, v in before.items() if k != "resume_state.npz"}
    assert wd.load_state()[0]["x"].tolist() == [1, 1, 1]  # the state written in the block stays
    assert wd.read_completion()["files"].keys() == {"results.json", "report.md"}
    monkeypatch.undo()
    wd.path(".results.json.before-final-write-1").write_text("left by a final write that was killed")
    with wd.final_set():                                  # the same write on a free disk: the new set
        wd.write_json("results.json", {"new": 1})
        wd.write_text("report.md", "new\n")
        wd.write_completion({"config": {"seed": 1}})
    assert sorted(p.name for p in wd.root.iterdir()) == [COMPLETE_FILE, "report.md", "results.json",
                                                           "resume_state.npz"]   # no moved-aside copies left
    assert wd.read_json("results.json") == {"new": 1} and wd.read_completion()["config"] == {"seed": 1}


# ------------------------------------------------------------------------------- damaged resume states

@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04 truncated"])
def test_a_damaged_state_names_the_file_and_says_to_delete_it(tmp_path, content):
    wd = Workdir(tmp_path)
    wd.path("resume_state.npz").write_bytes(content)
    with pytest.raises(StateError) as info:
        wd.load_state()
    text = str(info.value)
    assert str(wd.path("resume_state.npz")) in text and "rm " in text and "--config.resume=False" in text


def test_a_truncated_state_is_a_state_error(tmp_path):
    wd = Workdir(tmp_path)
    wd.save_state({"x": np.arange(1000)}, {"next_index": 3})
    data = wd.path("resume_state.npz").read_bytes()
    wd.path("resume_state.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="damaged"):
        wd.load_state()


# ---------------------------------------------------------------------------------- weights fingerprint

def test_weights_hash_is_kept_beside_the_file_and_redone_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"a" * 1000)
    first = fingerprint.weights(path)
    assert first["sha256"] == __import__("hashlib").sha256(b"a" * 1000).hexdigest()
    sidecar = json.loads((tmp_path / "m.safetensors.sha256").read_text())
    assert sidecar["sha256"] == first["sha256"] and sidecar["size"] == 1000
    fingerprint._memory.clear()
    assert fingerprint.weights(path) == first                       # from the sidecar
    # replaced at the same path by a file of the same size and the same mtime (cp -p, rsync -t)
    st = path.stat()
    other = tmp_path / "other"
    other.write_bytes(b"b" * 1000)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    fingerprint._memory.clear()
    assert fingerprint.weights(path)["sha256"] == __import__("hashlib").sha256(b"b" * 1000).hexdigest()
    assert fingerprint.weights("untrained (seed 0)") == {"weights": "untrained (seed 0)"}


def test_a_read_only_checkpoint_folder_still_gets_a_hash(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"abc")

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(workdir_mod.tempfile, "mkstemp", refuse)
    fingerprint._memory.clear()
    assert fingerprint.weights(path)["sha256"] == hashlib.sha256(b"abc").hexdigest()   # computed, not cached
    assert not (tmp_path / "m.safetensors.sha256").exists()


def test_figure_dpi_comes_from_the_environment_and_is_checked(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from PIL import Image

    from vitsparse_jax.runtime.workdir import FIGURE_DPI_ENV, Workdir, figure_dpi

    sizes = {}
    for dpi in ("50", "100"):
        monkeypatch.setenv(FIGURE_DPI_ENV, dpi)
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot([0, 1])
        (png,) = Workdir(tmp_path / dpi).save_figure(fig, "f")   # PNG only unless PDF is asked for
        sizes[dpi] = Image.open(png).size
    assert abs(sizes["100"][0] / sizes["50"][0] - 2) < 0.1
    monkeypatch.delenv(FIGURE_DPI_ENV)
    assert figure_dpi() == 150
    monkeypatch.setenv(FIGURE_DPI_ENV, "high")
    with pytest.raises(ValueError, match="VITSPARSE_JAX_FIGURE_DPI='high'"):
        figure_dpi()
