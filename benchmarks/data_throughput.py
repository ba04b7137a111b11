"""Host-side eval data throughput: images/s per core on generated ImageNet-sized JPEGs.

    python benchmarks/data_throughput.py --num_images 512 --workers 1,2

Writes JPEGs (random crops of scikit-learn's two 640x427 sample photos, 400-640 x 300-427 px, about
ImageNet val's mean pixel count, quality 90) to a temporary folder, then times `data.batches` (read + decode + resize
+ center crop + device put, 1-device mesh) for each thread count, and the single-thread cost per stage.
Besides wall-clock images/s it reports the process CPU time per image, i.e. images/s per fully used core,
which does not depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from vitsparse_jax import data
from vitsparse_jax.runtime import parallel

VIT_CFG = {"input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic", "num_classes": 1000}


def write_jpegs(root: str, n: int, seed: int = 0) -> float:
    """n JPEGs under root/n01440764; returns the mean file size in kB."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "n01440764"), exist_ok=True)
    sizes = []
    for i in range(n):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 428))
        x0, y0 = int(rng.integers(0, 641 - w)), int(rng.integers(0, 428 - h))
        img = photos[i % 2].crop((x0, y0, x0 + w, y0 + h))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        sizes.append(len(buf.getvalue()))
        with open(os.path.join(root, "n01440764", f"{i:05d}.JPEG"), "wb") as f:
            f.write(buf.getvalue())
    return float(np.mean(sizes)) / 1e3


def time_batches(source: data.Source, batch_size: int, workers: int,
                 cache_dir: str | None = None) -> tuple[float, float]:
    """(wall-clock images/s, images per CPU-second of this process)."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    wall, cpu = time.perf_counter(), time.process_time()
    last = None
    for batch in data.batches(source, VIT_CFG, batch_size, mesh, num_workers=workers, cache_dir=cache_dir):
        last = batch
    jax.block_until_ready(last)
    return len(source) / (time.perf_counter() - wall), len(source) / (time.process_time() - cpu)


def stage_costs(source: data.Source, n: int = 64) -> dict[str, float]:
    """Single-thread CPU ms per image for read, decode (+convert RGB), resize + crop."""
    transform = data.EvalTransform.from_cfg(VIT_CFG)
    t = {"read": 0.0, "decode": 0.0, "resize_crop": 0.0}
    for i in range(n):
        t0 = time.thread_time()
        record = source.read(i)
        t1 = time.thread_time()
        img = data.decode_image(record.data)
        t2 = time.thread_time()
        transform(img)
        t3 = time.thread_time()
        t["read"] += t1 - t0
        t["decode"] += t2 - t1
        t["resize_crop"] += t3 - t2
    return {k: 1e3 * v / n for k, v in t.items()}


def measure(args: argparse.Namespace) -> dict:
    """Writes `args.num_images` JPEGs, times the pipeline for each of `args.workers` thread counts and, with
    `args.cache` (default on), from the crop cache; prints each figure and returns them all."""
    out: dict = {"num_images": args.num_images, "batch_size": args.batch_size,
                 "host_cores_available": data.default_num_workers()}
    print(f"host cores available: {out['host_cores_available']}; jax backend: {jax.default_backend()}")
    with tempfile.TemporaryDirectory() as tmp:
        kb = write_jpegs(os.path.join(tmp, "images"), args.num_images)
        # label_space="dataset": the folder's own class index; the ImageNet label map needs tensorflow_datasets
        source = data.FolderSource(os.path.join(tmp, "images"), label_space="dataset")
        out["mean_jpeg_kb"] = kb
        print(f"{args.num_images} JPEGs, mean {kb:.0f} kB; transform: bicubic, crop_pct 0.9, 224 px")
        time_batches(data.Subset(source, range(args.batch_size)), args.batch_size, 1)  # warm-up (jit, cache)
        costs = stage_costs(source, min(64, args.num_images))
        out["single_thread_cpu_ms_per_image"] = costs
        out["images_per_s_per_core"] = 1e3 / sum(costs.values())
        print("single thread, CPU ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
              + f" -> {out['images_per_s_per_core']:.0f} images/s per core")
        out["batches"] = []
        for w in [int(x) for x in str(args.workers).split(",")]:
            rate, per_cpu = time_batches(source, args.batch_size, w)
            out["batches"].append({"threads": w, "images_per_s": rate, "images_per_cpu_s": per_cpu})
            print(f"data.batches, {w} thread(s): {rate:.0f} images/s wall-clock; "
                  f"{per_cpu:.0f} images per CPU-second (= images/s per fully used core)")
        if getattr(args, "cache", True):
            cache, w = os.path.join(tmp, "cache"), data.default_num_workers()
            time_batches(source, args.batch_size, w, cache)  # fills the cache
            rate, per_cpu = time_batches(source, args.batch_size, w, cache)
            out["from_cache"] = {"threads": w, "images_per_s": rate, "images_per_cpu_s": per_cpu}
            print(f"from the crop cache, {w} thread(s): {rate:.0f} images/s wall-clock; "
                  f"{per_cpu:.0f} images per CPU-second")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="comma-separated decode thread counts")
    args = parser.parse_args()
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    measure(args)


if __name__ == "__main__":
    main()
