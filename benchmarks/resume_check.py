"""What the resume content check costs: re-reading and re-hashing the images a pass already processed.

    python benchmarks/resume_check.py --num_files 50000 --size_kb 16

Writes `num_files` files of `size_kb` kB (random bytes: the check reads and hashes, it never decodes) into
1000 class folders of a temporary folder, then times, with `data.FolderSource` over them:
- the listing and the folder identity (what a resume checked before: names, sizes, mtimes);
- `resumable.verify_images` over every file (read + sha256 on a thread pool, as a resume does), twice: the
  second run is what a resume costs right after the interruption (files in the page cache);
- the digest alone per image (sha256 of bytes in memory, CPU time), the pipeline's added cost per image.
The first verify run reads files just written, so they are also in the page cache unless the machine is short
of memory: the cold-disk cost (one more read of the dataset) is not measured here.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from vitsparse_jax import data
from vitsparse_jax.runtime import fingerprint, resumable


def write_files(root: str, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size + n, dtype=np.uint8).tobytes()
    for i in range(n):
        folder = os.path.join(root, f"class{i % 1000:04d}")
        if i < 1000:
            os.makedirs(folder)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(block[i:i + size])          # every file different


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_files", type=int, default=50_000)
    parser.add_argument("--size_kb", type=float, default=16)
    parser.add_argument("--workers", type=int, default=None, help="re-hash threads (default: as a resume uses)")
    args = parser.parse_args()
    print("$", shlex.join(["python", *sys.argv]))
    print(f"host cores available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f}")
    size = int(args.size_kb * 1024)
    with tempfile.TemporaryDirectory(prefix="resume_check_") as root:
        t = time.perf_counter()
        write_files(root, args.num_files, size)
        print(f"{args.num_files} files of {size / 1024:.0f} kB ({args.num_files * size / 1e9:.2f} GB) written in "
              f"{time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        source = data.FolderSource(root)
        listed = time.perf_counter() - t
        t = time.perf_counter()
        source.identity
        identity = time.perf_counter() - t
        print(f"listing {listed:.2f} s; identity (names, sizes, mtimes: the check before) {identity:.2f} s")
        digests = np.stack([np.frombuffer(source.digest(i), np.uint8) for i in range(len(source))])
        for run in ("first", "second"):
            t, cpu = time.perf_counter(), time.process_time()
            resumable.verify_images(source, digests, "bench", workers=args.workers)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            print(f"verify_images ({run} run): {wall:.2f} s wall, {cpu:.2f} s CPU = "
                  f"{len(source) / wall:.0f} files/s, {len(source) * size / wall / 1e6:.0f} MB/s")
        payload = os.urandom(size)
        cpu = time.process_time()
        for _ in range(2000):
            fingerprint.content_digest(payload)
        print(f"content digest of one {size / 1024:.0f} kB image in memory (the pipeline's added cost per image): "
              f"{(time.process_time() - cpu) / 2000 * 1e6:.0f} us CPU")


if __name__ == "__main__":
    main()
