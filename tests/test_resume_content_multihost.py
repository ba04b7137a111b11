"""The resume content check on two processes (jax.distributed on localhost, 2 CPU devices each; issue 23,
point 6): each process reads only its own rows of every batch, the digests travel with the batch to process 0,
whose state decides; at resume each process re-hashes a share of the processed images and all of them agree.

Run as a script, this file is one process of the test (phases: interrupt, resume).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NUM_IMAGES, BATCH = 12, 8
CFG = {"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 10}
NOT_REFUSED = 3   # a worker's exit status when a changed image was resumed anyway


def make_folder(root: Path) -> None:
    """12 labelled 8x8 BMPs: every file has the same byte size, whatever its pixels."""
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / str(i % 2) / f"{i:03d}.bmp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phase(tmp: Path, phase: str) -> list[tuple[int, str]]:
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "--root", str(tmp), "--port", str(port),
                               "--process_id", str(p), "--phase", phase],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    out = []
    try:
        for proc in procs:
            out.append((proc, proc.communicate(timeout=240)[0]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, log) for proc, log in out]


def test_two_processes_refuse_together_an_image_changed_on_the_other_host(tmp_path):
    from vitsparse_jax.data import FolderSource

    make_folder(tmp_path / "images")
    shutil.copytree(tmp_path / "images", tmp_path / "pristine", copy_function=shutil.copy2)
    done = _phase(tmp_path, "interrupt")
    assert [status for status, _ in done] == [0, 0], "\n\n".join(log for _, log in done)[-4000:]

    # image 5: row 5 of the first global batch of 8, read by process 1 only (rows 4-7 live on its devices)
    source = FolderSource(tmp_path / "images")
    name = source.files[5]
    path, st = tmp_path / "images" / name, (tmp_path / "images" / name).stat()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "other.bmp")
    os.replace(tmp_path / "other.bmp", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert FolderSource(tmp_path / "images").identity == source.identity

    # the resume phase: refused on both processes; then process 0 puts the original back and both resume
    resumed = _phase(tmp_path, "resume")
    assert [status for status, _ in resumed] == [0, 0], "\n\n".join(log for _, log in resumed)[-4000:]
    messages = [log.split("refused: ")[1].splitlines()[0].split(" cannot be resumed: ")[-1] for _, log in resumed]
    assert messages[0] == messages[1] and name in messages[0] and "1 of the 8 images" in messages[0], messages
    sums = np.load(tmp_path / "p0.npy")
    expected = [np.asarray(Image.open(tmp_path / "images" / f)).astype(np.float64).sum() for f in source.files]
    np.testing.assert_allclose(sums, expected)                        # every image once, resumed exactly


def _worker(args: argparse.Namespace) -> int:
    import jax

    from vitsparse_jax import data
    from vitsparse_jax.runtime import parallel, resumable
    from vitsparse_jax.runtime.workdir import Workdir

    parallel.initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id, timeout_s=60)
    me = jax.process_index()
    root = Path(args.root)
    source = data.FolderSource(root / "images")
    mesh = parallel.make_mesh()

    def process(batch, acc):
        image, index = parallel.to_host((batch["image"], batch["index"]))
        rows = np.asarray(index) >= 0
        acc = dict(acc)
        acc["sum"] = acc["sum"].copy()
        acc["sum"][np.asarray(index)[rows]] = np.asarray(image, np.float64)[rows].sum(axis=(1, 2, 3))
        return acc

    def run(stop_after_batches):   # each process its own workdir: process 0's state decides for both
        return resumable.run_resumable(
            Workdir(root / f"run{me}"), key={"exp": "sum"}, total=len(source), batch_size=BATCH, progress=False,
            batches_from=lambda start: data.batches(source, CFG, BATCH, mesh, start=start, num_workers=2),
            process=process, init=lambda: {"sum": np.zeros(len(source))}, is_writer=me == 0,
            stop_after_batches=stop_after_batches, source=source)

    if args.phase == "interrupt":
        try:
            run(1)
        except resumable.Interrupted:
            return 0
        return 1
    try:
        run(None)
        return NOT_REFUSED    # an image changed: the resume must be refused
    except resumable.StateError as e:
        print(f"refused: {e}", flush=True)
    if me == 0:               # the original content back (a copy that keeps its time)
        name = source.files[5]
        shutil.copy2(root / "pristine" / name, root / "images" / name)
    parallel.agree(True)      # both wait for it
    acc = run(None)
    if me == 0:
        np.save(root / "p0.npy", acc["sum"])
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--phase", choices=("interrupt", "resume"), required=True)
    sys.exit(_worker(parser.parse_args()))
