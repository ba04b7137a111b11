"""The pass and the fixed cost of a run, per model (sparsity): where a run's time goes besides the device.

    python benchmarks/pass_phases.py                                    # ViT-B/16, ResNet-50, Swin-T
    python benchmarks/pass_phases.py --models vit_base_patch16_224 --images 64 --runs 3

For each model (timm's architecture, random weights: `weights=untrained`; the built-in digits, upscaled):

1. device only: the experiment's jitted device step (`sparsity.device_values_fn`: the forward pass with the
   attention or activation capture, reduced to per-image vectors) on one batch already on the device,
   images/s (median of --runs);
2. the pass, serial (depth 0: the host step waits for each batch) against overlapped (depth 1: the next batch
   on the device while the host adds this one), in this process, `driver.measure` over --images images, runs
   interleaved (A B A B), compilation left out (a first run of each): images/s, and of the overlapped pass the
   seconds it waited for the next batch from the data pipeline (decoding not ahead), waited for the device, and
   spent in its own host step;
3. the fixed cost: the command line (`python -m vitsparse_jax.main --config=configs/sparsity.py ...`) in a fresh
   process, twice: with an empty persistent compilation cache (cold) and again with it filled (warm); the
   phases from its results.json (`timing`): start-up and imports, checks, loading, compilation (programs,
   from the cache), the pass, extras, figures (and the other result files), report.html.

The host step alone (synthetic device outputs of the same shapes, one core) is `benchmarks/host_ceiling.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_common as bc

MODELS = ("vit_base_patch16_224", "resnet50", "swin_tiny_patch4_window7_224")


def config_for(model: str, images: int, batch_size: int, workdir: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sparsity_config", bc.REPO / "configs" / "sparsity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model, config.weights, config.progress, config.workdir = model, "untrained", False, workdir
    config.resume = False
    config.data.num_images, config.data.batch_size = images, batch_size
    return config


def device_only(loaded: Any, config: Any, runs: int) -> tuple[float, list[float]]:
    """Images/s of the device step alone on one global batch (median of `runs` calls), and the loads seen."""
    import jax

    from vitsparse_jax import data
    from vitsparse_jax.experiments.sparsity import experiment as sparsity
    from vitsparse_jax.runtime import parallel

    probe = sparsity.make_probe(loaded.module, config.sparsity, loaded.name)
    fn = sparsity.device_values_fn(loaded, probe)
    mesh = parallel.make_mesh()
    variables = parallel.replicate(loaded.variables, mesh)
    source = data.subset(data.DigitsSource("test"), num_images=config.data.batch_size)
    batch = next(iter(data.batches(source, loaded.pretrained_cfg, config.data.batch_size, mesh)))
    jax.block_until_ready(fn(variables, batch["image"]))      # compile
    seconds, loads = [], [bc.loadavg()]
    for _ in range(runs):
        time.sleep(bc.SETTLE_S)
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, batch["image"]))
        seconds.append(time.perf_counter() - start)
        loads.append(bc.loadavg())
    return config.data.batch_size / statistics.median(seconds), loads


def pass_rates(loaded: Any, config: Any, runs: int) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Serial and overlapped passes over config.data's images (interleaved, after one run of each)."""
    from vitsparse_jax.experiments import driver
    from vitsparse_jax.runtime import timing
    from vitsparse_jax.runtime.workdir import Workdir

    out: dict[str, list[dict[str, float]]] = {"serial": [], "overlapped": []}
    loads = [bc.loadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs + 1):
            for name, depth in (("serial", 0), ("overlapped", 1)):
                time.sleep(bc.SETTLE_S)
                timing.start_run()
                driver.measure(config, Workdir(Path(tmp) / f"{name}{r}"), loaded=[loaded], depth=depth)
                t = timing.summary()
                if r:   # the first run of each compiles (its program, then the persistent cache's copy)
                    p, seconds = t["pass"], t["phases_s"]["pass"]    # less the compilation in the pass
                    out[name].append({"rate": p["images"] / seconds, "data_s": p["data_s"], "wait_s": p["wait_s"],
                                      "host_s": p["host_s"], "seconds": seconds})
            loads.append(bc.loadavg())
    return {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in out.items()}, loads


def fixed_cost(model: str, images: int, batch_size: int, cache: str) -> tuple[dict[str, Any], list[float]]:
    """The command line in a fresh process; its results.json's timing."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vitsparse_jax.main", "--config=configs/sparsity.py", f"--config.model={model}",
               "--config.weights=untrained", f"--config.workdir={tmp}/run", "--config.progress=False",
               f"--config.data.num_images={images}", f"--config.data.batch_size={batch_size}"]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
        loads = [bc.loadavg()]
        subprocess.run(cmd, cwd=bc.REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loads.append(bc.loadavg())
        return json.loads((Path(tmp) / "run" / "results.json").read_text())["timing"], loads


def phases_row(model: str, cache: str, t: dict[str, Any], loads: list[float]) -> list[Any]:
    p, c = t["phases_s"], t["compilation"]
    return [model, cache, f"{t['wall_s']:.1f}", f"{p.get('pass', 0):.1f}", f"**{t['fixed_s']:.1f}**",
            f"{t['startup_s']:.1f}", f"{p.get('checks', 0) + p.get('loading', 0):.1f}",
            f"{c['seconds']:.1f} ({c['programs']}, {c['from_cache']} cached)", f"{p.get('extras', 0):.1f}",
            f"{p.get('figures', 0):.1f}", f"{p.get('report_html', 0):.1f}", bc.load_label(loads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=64, help="images of each pass")
    parser.add_argument("--batch_size", type=int, default=8, help="batch of the device-only and pass figures")
    parser.add_argument("--cli_batch_size", type=int, default=32, help="batch of the command line (the config's)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: device, pass, fixed")
    parser.add_argument("--json", default="", help="append one JSON record per model to this file")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    info = bc.start(with_torch=False)
    from vitsparse_jax.weights import loading

    rows, fixed_rows = [], []
    for model in filter(None, args.models.split(",")):
        config = config_for(model, args.images, args.batch_size, "")
        loaded = loading.load_model(model, "untrained", seed=0)
        record: dict[str, Any] = {"model": model, "images": args.images, "batch_size": args.batch_size}
        loads: list[float] = []
        if "device" not in skip:
            record["device_images_per_s"], more = device_only(loaded, config, args.runs)
            loads += more
        if "pass" not in skip:
            record["pass"], more = pass_rates(loaded, config, args.runs)
            loads += more
        if loads:
            o, s = record.get("pass", {}).get("overlapped", {}), record.get("pass", {}).get("serial", {})
            rows.append([model, args.batch_size, bc.fmt_rate(record.get("device_images_per_s", float("nan"))),
                         bc.fmt_rate(s.get("rate", float("nan"))), bc.fmt_rate(o.get("rate", float("nan"))),
                         "{:.1f} / {:.1f} / {:.2f}".format(*(o.get(k, float("nan")) for k in ("data_s", "wait_s",
                                                                                                 "host_s"))),
                         args.runs, bc.load_label(loads)])
        if "fixed" not in skip:
            with tempfile.TemporaryDirectory() as cache:
                for label in ("cold", "warm"):
                    t, more = fixed_cost(model, args.images, args.cli_batch_size, cache)
                    record[f"timing_{label}"] = t
                    fixed_rows.append(phases_row(model, label, t, more))
        bc.append_json(args.json, bc.record("pass_phases", info, loads, **record))
        del loaded
    if rows:
        print(f"\nthe pass ({args.images} images, images/s; median of {args.runs}):")
        bc.print_table_head(["model", "batch", "device only", "pass, serial", "pass, overlapped",
                             "overlapped: wait for data / device, host step (s)", "runs", "load"])
        for row in rows:
            print(bc.md_row(row))
    if fixed_rows:
        print(f"\nthe command line, {args.images} images, batch {args.cli_batch_size} (seconds; compilation: "
              "programs, of which from the persistent cache):")
        bc.print_table_head(["model", "XLA cache", "wall", "pass", "fixed cost", "start-up", "checks + loading",
                             "compilation", "extras", "figures + files", "report.html", "load"])
        for row in fixed_rows:
            print(bc.md_row(row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
