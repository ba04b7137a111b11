"""Batches: same per-image results on 1 and 4 devices and on 2 processes; every image exactly once.

Run as a script, this file is one process of the 2-process jax.distributed test.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from vitsparse_jax import data
from vitsparse_jax.data import sources
from vitsparse_jax.runtime import parallel

CFG = {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic", "num_classes": 1000,
       "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
NUM_IMAGES = 21
BAD = {5: "truncated", 12: "garbage"}  # image index -> kind of unreadable file


def make_folder(root: str) -> None:
    """21 images of varied sizes in two wnid folders; images 5 and 12 unreadable."""
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        wnid = "n01440764" if i < 11 else "n01443537"  # labels 0 and 1, sorted order = index order
        os.makedirs(os.path.join(root, wnid), exist_ok=True)
        h, w = rng.integers(20, 90, size=2)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        payload = buf.getvalue()
        if BAD.get(i) == "truncated":
            payload = payload[: len(payload) // 2]
        elif BAD.get(i) == "garbage":
            payload = b"not an image at all" * 8
        with open(os.path.join(root, wnid, f"{i:03d}.jpg"), "wb") as f:
            f.write(payload)


sources_decode = data.decode_image


class CountingFolder(sources.FolderSource):
    """Records which images this process read from disk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []
        self._reads_lock = threading.Lock()

    def read(self, i: int) -> sources.Record:
        with self._reads_lock:
            self.reads.append(i)
        return super().read(i)


@jax.jit
def per_image(batch: dict[str, jax.Array]) -> jax.Array:
    """A per-image output computed on device from the normalised crop."""
    x = data.normalize(batch["image"], CFG)
    return (x * x).mean(axis=(1, 2, 3)) + x[:, 3, 5, 1]


def run(source: sources.Source, mesh, batch_size: int, **kw) -> dict[str, np.ndarray]:
    """Every batch's fields + per_image output, gathered to the host and concatenated."""
    out: dict[str, list[np.ndarray]] = {}
    for batch in data.batches(source, CFG, batch_size, mesh, **kw):
        host = parallel.to_host({**batch, "out": per_image(batch)})
        for k, v in host.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


def by_index(result: dict[str, np.ndarray]) -> dict[int, tuple]:
    return {int(i): (result["image"][r], result["label"][r], bool(result["valid"][r]), result["out"][r])
            for r, i in enumerate(result["index"]) if i >= 0}


def assert_same_per_image(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    a, b = by_index(a), by_index(b)
    assert a.keys() == b.keys()
    for i in a:
        np.testing.assert_array_equal(a[i][0], b[i][0], err_msg=f"image {i}")
        assert a[i][1:3] == b[i][1:3], i
        np.testing.assert_array_equal(a[i][3], b[i][3], err_msg=f"output {i}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("images"))
    make_folder(root)
    return root


@pytest.fixture(scope="module")
def one_device(folder) -> dict[str, np.ndarray]:
    return run(sources.FolderSource(folder), parallel.make_mesh(jax.devices()[:1]), batch_size=4)


def test_batches_are_sharded_over_the_data_axis(folder):
    assert jax.device_count() == 4, "tests/conftest.py sets 4 fake CPU devices"
    mesh = parallel.make_mesh()
    batch = next(data.batches(sources.FolderSource(folder), CFG, 8, mesh))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert {k: v.dtype for k, v in batch.items() if k != "image"} == {
        "label": np.int32, "index": np.int32, "valid": np.bool_, "digest": np.uint8}
    for v in batch.values():
        assert v.sharding.spec == P("data") and len(v.addressable_shards) == 4


def test_four_devices_give_the_same_per_image_outputs_as_one(folder, one_device):
    four = run(sources.FolderSource(folder), parallel.make_mesh(), batch_size=8)
    assert_same_per_image(four, one_device)


def test_every_image_exactly_once_and_padding_masked(folder, one_device):
    source = sources.FolderSource(folder)
    result = run(source, parallel.make_mesh(), batch_size=8)  # 3 batches = 24 rows for 21 images
    assert len(result["index"]) == 24
    np.testing.assert_array_equal(result["index"][:NUM_IMAGES], np.arange(NUM_IMAGES))  # dataset order
    pad = result["index"] < 0
    assert pad.sum() == 3 and not result["valid"][pad].any() and (result["label"][pad] == -1).all()
    skipped = (result["index"] >= 0) & ~result["valid"]
    assert sorted(result["index"][skipped]) == sorted(BAD) == sorted(source.skipped)
    assert "truncated" in source.skipped[5] and source.describe()["skipped"] == 2
    np.testing.assert_array_equal(result["label"][:NUM_IMAGES], [0] * 11 + [1] * 10)  # labels of bad ones too
    assert not result["image"][~result["valid"]].any()


def test_start_resumes_exactly(folder):
    mesh = parallel.make_mesh()
    full = run(sources.FolderSource(folder), mesh, batch_size=8)
    resumed = run(sources.FolderSource(folder), mesh, batch_size=8, start=9)
    np.testing.assert_array_equal(resumed["index"], list(range(9, NUM_IMAGES)) + [-1] * 4)
    assert_same_per_image(resumed, {k: v[9:NUM_IMAGES] for k, v in full.items()})
    stopped = run(sources.FolderSource(folder), parallel.make_mesh(), batch_size=4, start=4, stop=9)
    np.testing.assert_array_equal(stopped["index"], [4, 5, 6, 7, 8, -1, -1, -1])


def test_cache_reuses_crops_and_failures(folder, one_device, tmp_path, monkeypatch):
    from vitsparse_jax.data import pipeline

    mesh = parallel.make_mesh()
    first = run(CountingFolder(folder), mesh, batch_size=8, cache_dir=tmp_path)
    again, decoded = CountingFolder(folder), []
    monkeypatch.setattr(pipeline, "decode_image", lambda data: decoded.append(data) or sources_decode(data))
    second = run(again, mesh, batch_size=8, cache_dir=tmp_path)
    # read again (the bytes' digest keys the cache), decoded never: all from the cache
    assert decoded == [] and sorted(again.reads) == list(range(NUM_IMAGES)) and sorted(again.skipped) == sorted(BAD)
    monkeypatch.undo()
    assert_same_per_image(second, first)
    assert_same_per_image(second, one_device)
    other = dict(CFG, crop_pct=0.9)  # other preprocessing -> other cache entries
    assert len(os.listdir(tmp_path)) == 1
    next(data.batches(sources.FolderSource(folder), other, 4, mesh, cache_dir=tmp_path))
    assert len(os.listdir(tmp_path)) == 2


def test_bad_batch_size_and_labels_are_errors(folder):
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        data.batches(sources.FolderSource(folder), CFG, 6, mesh)
    with pytest.raises(ValueError, match="model has 1 classes"):
        data.batches(sources.FolderSource(folder), dict(CFG, num_classes=1), 8, mesh)


# ----------------------------------------------------------------------------- two processes, localhost

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(folder, one_device, tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "--folder", folder, "--port", str(port),
                               "--process_id", str(p), "--out", str(tmp_path / f"p{p}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)[-4000:]
    results = [dict(np.load(tmp_path / f"p{p}.npz")) for p in range(2)]
    for res in results:  # each process saw the whole (gathered) result ...
        assert_same_per_image({k: v for k, v in res.items() if k != "reads"}, one_device)
    reads = [set(res["reads"].tolist()) for res in results]
    assert not reads[0] & reads[1] and reads[0] | reads[1] == set(range(NUM_IMAGES))
    # ... but read only its own half of each global batch of 8: rows 0-3 on process 0, 4-7 on process 1
    assert reads[0] == {i for i in range(NUM_IMAGES) if i % 8 < 4}


def _worker(args: argparse.Namespace) -> None:
    parallel.initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id, timeout_s=60)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    source = CountingFolder(args.folder)
    result = run(source, parallel.make_mesh(), batch_size=8)
    np.savez(args.out, reads=np.array(sorted(source.reads)), **result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--folder", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    _worker(parser.parse_args())
