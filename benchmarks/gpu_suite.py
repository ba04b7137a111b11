"""The GPU figures in one command that fits a short GPU loan: (a)-(f) of issue 18, most important first.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT --budget_s 450   # on the lent GPU
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_suite_smoke              # CPU, tiny sizes (CI)

Runs the existing benchmark scripts' functions (forward_throughput.measure, ablation_grid.measure,
flops.matmul_peak, receptive_fields.measure, data_throughput.measure) plus a bf16-vs-fp32 agreement check,
in this order (each a "part"; `--parts` picks and orders them):

  grid_vit_bf16     (b) the paper's ablation grid (4 p x 3 n, top set + 3 draws, whole-layer reference) on ViT-B/16 in
                    bf16: the experiment's jitted step vs the published procedure re-implemented batched in
                    PyTorch (ablation_grid.Reference), same GPU, same batch; 50,000-image time EXTRAPOLATED from
                    the measured batches
  agreement         (c) bf16 vs fp32 predictions (clean and every ablated cell) of the same images
  forward           (a) forward images/s, fp32 (HIGHEST, no TF32 in torch) and bf16, project vs timm eager
  flops             (e) matmul peak (jax and torch, per precision) measured in this run; achieved FLOP/s of
                    every timed program of this run against it (table rebuilt after every part)
  grid_rest         (b) the same grid for ViT-B/16 fp32, ResNet50 bf16 and fp32
  data              (f) JPEG decode + timm eval transform on the host's CPU cores; data- or model-bound for (b)
  host              the host step of each experiment's pass (benchmarks/host_ceiling.py's cases, synthetic device
                    outputs of the real shapes) on one core of the GPU machine's CPU: images per CPU-second
  receptive_fields  (d) receptive fields of all 49 ViT-B layers vs one torch.autograd.grad per layer
  forward_compile   (a) again with timm + torch.compile as a third contender (Inductor compiles for 30-60 s
                    per model and precision, so it comes last; it reuses the XLA compilation cache)

Weights: timm `pretrained=False`, perturbed with tests/timm_perturb.py (LayerNorm / BatchNorm away from identity,
non-zero biases, q/k scaled for peaked attention) and converted with checkpoints_convert, so both sides
compute the same function and predictions differ between images and under ablation. Images: uniform random
uint8 crops (content does not change the speed; the agreement part says how varied the predictions are).

Budget: every part, and every model inside a part, starts only if the time left (`--budget_s` minus the time
since the script started) exceeds a rough estimate of what it needs; a watchdog thread writes the results and
ends the process at the budget even inside a compilation. `--out DIR` (default $OUT) gets `gpu_suite.json`
and `gpu_suite.md` after every part, so a cut run still returns the parts already done. Each part prints its
markdown as soon as it finishes. A failing part is recorded with its error and the next part runs.

This script imports neither ml_collections nor tensorflow_datasets (the GPU image has neither); nor does
any module of vitsparse_jax that it imports (tests/test_gpu_suite.py runs it with both unimportable).
"""
from __future__ import annotations

import time

T0 = time.monotonic()   # the budget counts from here, imports included

import argparse
import gc
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# jax takes 75% of the GPU's memory at its first use by default; torch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # puts the repo on sys.path, imports vitsparse_jax before jax runs
import forward_throughput

IMAGES_TOTAL = 50_000
VIT_B, RESNET50 = "vit_base_patch16_224", "resnet50"
FORWARD_MODELS = [VIT_B, "deit_small_patch16_224", "swin_tiny_patch4_window7_224", RESNET50, "vgg16"]
CONVNEXT = "convnext_tiny"   # joins (a) once the project registers it
DTYPES = ("bfloat16", "float32")
SHORT = {VIT_B: "ViT-B/16", "deit_small_patch16_224": "DeiT-S/16", "swin_tiny_patch4_window7_224": "Swin-T",
         RESNET50: "ResNet50", "vgg16": "VGG16", CONVNEXT: "ConvNeXt-T"}
DT = {"float32": "fp32", "bfloat16": "bf16"}

# Tiny variants of the same architectures for --smoke: (timm kwargs, project kwargs). img_size is the
# project's input size; timm's CNNs take any size.
_VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
SMOKE_OVERRIDES: dict[str, tuple[dict, dict]] = {
    VIT_B: (_VIT_TINY, _VIT_TINY),
    "deit_small_patch16_224": (_VIT_TINY, _VIT_TINY),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2), window_size=2),
        dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2), window_size=(2, 2, 2, 2))),
    RESNET50: (dict(layers=[1, 1, 1, 1]), dict(layers=(1, 1, 1, 1), img_size=64)),
    "vgg16": ({}, dict(img_size=32)),
}
# Left out of --smoke: timm's VGG head is 7x7x512 -> 4096 -> 4096 at any input size (102M of its 138M
# parameters) and no timm argument shrinks both of its layers; ResNet50 covers the CNN code path.
SMOKE_SKIP = ("vgg16",)
# ConvNeXt-T joins (a) when the project registers it (models/convnext.py); for --smoke, the first of these
# overrides that the project's create_model accepts
SMOKE_CONVNEXT = [(dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
                   dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), img_size=32)),
                  ({}, dict(img_size=32)), ({}, {})]

# Sizes. GPU: batches that fill an H200; smoke: the smallest that run every code path.
FULL = dict(grid_batch=128, grid_runs=3, agreement_images=1024, forward_batch=256, forward_runs=3, forward_iters=2,
            compile_runs=3, peak_sizes="4096,8192", peak_runs=5, peak_iters=10, rf_batch=32, rf_runs=3,
            data_images=1024, data_batch=128, host_batch=256, host_steps=8, host_runs=3)
SMOKE = dict(grid_batch=2, grid_runs=1, agreement_images=4, forward_batch=2, forward_runs=1, forward_iters=1,
             compile_runs=1, peak_sizes="64,128", peak_runs=1, peak_iters=2, rf_batch=1, rf_runs=1,
             data_images=16, data_batch=8, host_batch=4, host_steps=2, host_runs=1)
# Rough seconds a piece needs on the GPU before it gives a figure (compilation included); a piece starts only
# with at least this much budget left. Guesses, to be replaced by the first run's `seconds`.
NEEDS = {"grid:" + VIT_B: 75, "grid:" + RESNET50: 45, "agreement:" + VIT_B: 75, "agreement:" + RESNET50: 45,
         "forward": 15, "forward_compile": 60, "flops": 20, "data": 25, "host": 40, "receptive_fields": 100}

PART_TITLES = {
    "grid_vit_bf16": "(b) Ablation grid, ViT-B/16, bf16",
    "agreement": "(c) bf16 vs fp32 agreement of clean and ablated predictions",
    "forward": "(a) Forward throughput against timm eager",
    "flops": "(e) Achieved FLOP/s against the matmul peak measured in this run",
    "grid_rest": "(b) Ablation grid, ViT-B/16 fp32 and ResNet50 bf16 / fp32",
    "data": "(f) Host decode + eval transform, and the bottleneck of (b)",
    "host": "Host ceiling: the host step of each experiment's pass on one core of this machine",
    "receptive_fields": "(d) Receptive fields of every ViT-B/16 layer",
    "forward_compile": "(a) Forward throughput against timm eager and torch.compile",
}
PARTS = list(PART_TITLES)


class BudgetStop(Exception):
    """A piece did not start: too little of the budget was left."""


class Suite:
    """Results, budget, output files and the watchdog."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.size = dict(SMOKE if args.smoke else FULL)
        self.deadline = T0 + args.budget_s
        self.lock = threading.RLock()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.current: str | None = None
        self.planned: list[str] = []
        self.info: dict = {}
        self.results: dict = {"suite": "benchmarks/gpu_suite.py", "command": bc.command_line(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": bool(args.smoke),
                              "budget_s": args.budget_s, "meta": {"sizes": self.size},
                              "parts": {}}

    # -- budget --------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - T0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, key: str) -> None:
        """Raises BudgetStop unless the estimate for `key` fits in what is left (no estimates in --smoke)."""
        est = 0 if self.args.smoke else NEEDS.get(key, NEEDS.get(key.split(":")[0], 0))
        if self.left() < est:
            raise BudgetStop(f"{self.left():.0f} s of the budget left, {key} needs about {est} s")

    def start_watchdog(self) -> None:
        def watch() -> None:
            while self.left() > 0:
                time.sleep(min(max(self.left(), 0.01), 1.0))
            with self.lock:
                self.results["stopped_at_budget"] = True
                name = self.current
                if name is not None:
                    part = self.results["parts"][name]
                    part["status"] = "stopped at the budget"
                    part["seconds"] = round(time.monotonic() - part["_t0"], 1)
                for later in self.planned:
                    if later not in self.results["parts"]:
                        self.results["parts"][later] = {"title": PART_TITLES[later],
                                                        "status": "not started: budget reached"}
                self.write()
            print(f"\nbudget of {self.args.budget_s:.0f} s reached during {name or 'the wrap-up'}: results so far "
                  f"are in {self.out}/gpu_suite.json and .md; exiting.", flush=True)
            os._exit(0)
        threading.Thread(target=watch, daemon=True, name="gpu_suite_watchdog").start()

    # -- results -------------------------------------------------------------------------------------------
    def add(self, part: dict, key: str, value: Any) -> None:
        with self.lock:
            part.setdefault(key, []).append(value)

    def write(self) -> None:
        with self.lock:
            self.results["elapsed_s"] = round(self.elapsed(), 1)
            clean = json.loads(json.dumps(self.results, default=str))
            for part in clean["parts"].values():
                part.pop("_t0", None)
            _atomic_write(self.out / "gpu_suite.json", json.dumps(clean, indent=1))
            _atomic_write(self.out / "gpu_suite.md", render(clean))

    def run_part(self, name: str, fn: Callable[[Suite, dict], None]) -> None:
        part: dict = {"title": PART_TITLES[name], "status": "running", "_t0": time.monotonic(),
                      "started_at_s": round(self.elapsed(), 1)}
        with self.lock:
            self.results["parts"][name] = part
            self.current = name
        print(f"\n=== {name}: {PART_TITLES[name]} ({self.left():.0f} s of the budget left) ===", flush=True)
        try:
            self.need(name)
            fn(self, part)
            if part.get("errors"):
                status = "partial: errors" if part.get("records") else "error"
            elif part.get("skipped"):
                status = "partial: skipped (budget)" if part.get("records") else "skipped (budget)"
            else:
                status = "done"
        except BudgetStop as e:
            status = f"skipped: {e}"
        except (Exception, SystemExit) as e:   # noqa: BLE001 - record, go on with the next part
            status = "error"
            with self.lock:
                part["error"] = f"{type(e).__name__}: {e}"
                part["traceback"] = traceback.format_exc()[-4000:]
            traceback.print_exc()
        with self.lock:
            part["status"] = status
            part["seconds"] = round(time.monotonic() - part["_t0"], 1)
            self.current = None
            self.write()
        print(f"--- {name}: {status} in {part['seconds']:.0f} s ---")
        print(render_part(name, json.loads(json.dumps({k: v for k, v in part.items() if k != "_t0"},
                                                      default=str)), self.results_view()), flush=True)
        free_memory()

    def results_view(self) -> dict:
        with self.lock:
            return json.loads(json.dumps({k: v for k, v in self.results.items() if k != "parts"} | {
                "parts": {n: {k: v for k, v in p.items() if k != "_t0"} for n, p in self.results["parts"].items()}},
                default=str))

    def each(self, part: dict, key: str, items: list, fn: Callable[[Any], Any]) -> None:
        """Runs fn(item) for each item that the budget allows; records errors and skips per item."""
        for item in items:
            label = item if isinstance(item, str) else ":".join(str(i) for i in item)
            try:
                self.need(f"{key}:{item[0] if isinstance(item, tuple) else item}")
            except BudgetStop as e:
                self.add(part, "skipped", f"{label}: {e}")
                print(f"  skipped {label}: {e}", flush=True)
                continue
            try:
                fn(item)
            except (Exception, SystemExit) as e:   # noqa: BLE001
                traceback.print_exc()
                self.add(part, "errors", f"{label}: {type(e).__name__}: {str(e)[:500]}")
            with self.lock:
                self.write()
            free_memory()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def ns(suite: Suite, **fields: Any) -> argparse.Namespace:
    """The argparse namespace that the benchmark scripts' functions read."""
    base = dict(json="", wait_load=0.0, wait_max_s=0.0, seed=suite.args.seed, share_weights=1, runs=3)
    return argparse.Namespace(**{**base, **fields})


def slim(rec: dict) -> dict:
    """A benchmark record without the machine facts (kept once in the suite's meta)."""
    return {k: v for k, v in rec.items() if k not in ("machine", "command")}


# ------------------------------------------------------------------------------------------------------------
# Parts

def part_grid(models_dtypes: list[tuple[str, str]],
              smoke_items: list[tuple[str, str]] | None = None) -> Callable[[Suite, dict], None]:
    def run(suite: Suite, part: dict) -> None:
        import ablation_grid

        s = suite.size

        def one(item: tuple[str, str]) -> None:
            name, dtype = item
            args = ns(suite, batch_size=s["grid_batch"], dtype=dtype, p="0.05,0.1,0.2,0.3", n="1,2,3", draws=3,
                      whole_layer=1, variant_batch=0, agreement=0, runs=s["grid_runs"])
            rec = ablation_grid.measure(name, args, suite.info)
            rec["timed_images"] = s["grid_batch"] * s["grid_runs"]   # the 50k time is extrapolated from these
            suite.add(part, "records", slim(rec))
        suite.each(part, "grid", smoke_items if suite.args.smoke and smoke_items else models_dtypes, one)
    return run


def agreement_one(suite: Suite, name: str) -> dict:
    """bf16 vs fp32 argmax predictions, clean and every cell of the grid, on the same images and weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from checkpoints_convert import convert_timm_module
    from vitsparse_jax import data, models
    from vitsparse_jax.experiments.ablation import experiment as ablation
    from vitsparse_jax.experiments.ablation import units as ablation_units

    s = suite.size
    over = bc.MODEL_OVERRIDES.get(name, ({}, {}))[1]
    timm_cpu = bc.timm_model(name, "cpu")                       # perturbed (bc.PERTURB_SEED), weights only
    modules = {dt: models.create_model(name, dtype=bc.jax_dtype(dt), **over) for dt in ("float32", "bfloat16")}
    variables = jax.device_put(convert_timm_module(timm_cpu, modules["float32"])[0])
    del timm_cpu
    cfg = dict(modules["float32"].info().default_cfg)
    img = modules["float32"].info().img_size

    def program(module: Any) -> Callable:
        plan = ablation_units.make_plan(module, ps=(0.05, 0.1, 0.2, 0.3), ns=(1, 2, 3), draws=3, whole_layer=True)
        ev = ablation.Evaluator(module, variables, plan, cfg, seed=suite.args.seed)

        def preds(v: Any, images: jax.Array, index: jax.Array, key: jax.Array) -> tuple:
            clean, variant_logits = ev.forward(v, data.normalize(images, cfg), index, key)
            top2 = jax.lax.top_k(clean.astype(jnp.float32), 2)[0]
            margin = (top2[:, 0] - top2[:, 1]) / jnp.std(clean.astype(jnp.float32), axis=-1)
            cells = jnp.stack([jnp.argmax(vl, -1) for vl in variant_logits])   # (Nn, V, B)
            return jnp.argmax(clean, -1), cells, margin

        jitted = jax.jit(preds)
        return lambda images, index: jitted(ev.variables, images, index, ev.key)

    programs = {dt: program(m) for dt, m in modules.items()}
    b, total = s["grid_batch"], s["agreement_images"]
    rng = np.random.default_rng(suite.args.seed + 1)
    out: dict[str, dict[str, list]] = {dt: {"clean": [], "cells": [], "margin": []} for dt in programs}
    seconds = {dt: 0.0 for dt in programs}
    first_call = {}
    for start in range(0, total, b):
        images = jax.device_put(rng.integers(0, 256, (b, img, img, 3), dtype=np.uint8))
        index = jax.device_put(np.arange(start, start + b, dtype=np.int32))
        for dt, fn in programs.items():
            t0 = time.perf_counter()
            clean, cells, margin = jax.device_get(fn(images, index))
            dt_s = time.perf_counter() - t0
            if dt not in first_call:
                first_call[dt] = dt_s
            else:
                seconds[dt] += dt_s
            out[dt]["clean"].append(clean)
            out[dt]["cells"].append(np.moveaxis(cells, -1, 0).reshape(b, -1))
            out[dt]["margin"].append(margin)
    c32, c16 = (np.concatenate(out[dt]["clean"]) for dt in ("float32", "bfloat16"))
    v32, v16 = (np.concatenate(out[dt]["cells"]) for dt in ("float32", "bfloat16"))
    margin = np.concatenate(out["float32"]["margin"])
    n = len(c32)
    cells_agree = v32 == v16
    outcome32, outcome16 = v32 == c32[:, None], v16 == c32[:, None]   # labels = the fp32 clean predictions
    timed_images = n - b
    rec = {
        "model": name, "images": n, "cells_per_image": int(v32.shape[1]), "batch_size": b,
        "clean_predictions_agree": float((c32 == c16).mean()),
        "cell_predictions_agree": float(cells_agree.mean()),
        "images_all_predictions_agree": float(((c32 == c16) & cells_agree.all(1)).mean()),
        "images_all_outcomes_agree": float(((c32 == c16) & (outcome32 == outcome16).all(1)).mean()),
        "distinct_fp32_clean_predictions": len(np.unique(c32)),
        "fp32_cells_changing_the_prediction": float((~outcome32).mean()),
        "fp32_clean_margin_over_logit_std_median": float(np.median(margin)),
        "images_per_s": {dt: (timed_images / seconds[dt] if seconds[dt] > 0 else None) for dt in programs},
        "first_call_s": first_call,
        "weights": f"timm init perturbed by tests/timm_perturb.py (seed {bc.PERTURB_SEED}), converted",
        "images_kind": "uniform random uint8 crops",
    }
    print(f"  {name}: clean {rec['clean_predictions_agree']:.4f}, cells {rec['cell_predictions_agree']:.4f}, "
          f"images with every prediction equal {rec['images_all_predictions_agree']:.4f} ({n} images, "
          f"{rec['distinct_fp32_clean_predictions']} distinct fp32 clean predictions, "
          f"{rec['fp32_cells_changing_the_prediction']:.3f} of fp32 cells change it)", flush=True)
    return rec


def part_agreement(suite: Suite, part: dict) -> None:
    suite.each(part, "agreement", [VIT_B] if suite.args.smoke else [VIT_B, RESNET50],
               lambda name: suite.add(part, "records", agreement_one(suite, name)))


def forward_models() -> list[str]:
    from vitsparse_jax import models

    return FORWARD_MODELS + ([CONVNEXT] if CONVNEXT in models.list_models() else [])


def part_forward(compile_: bool) -> Callable[[Suite, dict], None]:
    def run(suite: Suite, part: dict) -> None:
        s = suite.size
        items = [(m, dt) for m in forward_models() for dt in DTYPES]
        if suite.args.smoke:   # every model once, the precisions alternating; VGG16 left out (see SMOKE_SKIP)
            models_ = [m for m in forward_models() if m not in SMOKE_SKIP]
            items = [(m, DTYPES[i % 2]) for i, m in enumerate(models_)]
            if compile_:       # one model and precision exercise the path (backend="eager", see main)
                items = [(VIT_B, "float32")]

        def one(item: tuple[str, str]) -> None:
            name, dtype = item
            args = ns(suite, batch_size=s["forward_batch"], iters=s["forward_iters"], compile=int(compile_),
                      runs=s["compile_runs"] if compile_ else s["forward_runs"])
            suite.add(part, "records", slim(forward_throughput.measure(name, dtype, args, suite.info)))
        suite.each(part, "forward_compile" if compile_ else "forward", items, one)
    return run


def part_flops(suite: Suite, part: dict) -> None:
    import flops

    s = suite.size
    args = ns(suite, sizes=s["peak_sizes"], runs=s["peak_runs"], iters=s["peak_iters"])
    rates = flops.matmul_peak(args, suite.info)
    with suite.lock:
        part["matmul"] = [{"framework": k, "dtype": dt, "size": n, "flops_per_s": r}
                          for (k, dt, n), r in rates.items()]
        part["peak_flops_per_s"] = {dt: max(r for (_, d, _), r in rates.items() if d == dt) for dt in DTYPES}


def part_data(suite: Suite, part: dict) -> None:
    import data_throughput

    s = suite.size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = ",".join(str(w) for w in sorted({1, cores}))
    args = argparse.Namespace(num_images=s["data_images"], batch_size=s["data_batch"], workers=workers, cache=True)
    with suite.lock:
        part["measured"] = data_throughput.measure(args)


HOST_CASES = ("vit_b16_sparsity", "swin_t_sparsity", "resnet50_sparsity", "vit_b16_rf")


def part_host(suite: Suite, part: dict) -> None:
    """benchmarks/host_ceiling.py's cases on this machine's CPU (its new path only: the pass's real host step on
    synthetic device outputs of the real shapes), with the main thread pinned to one core: can this host keep up
    with the device rates measured above?"""
    import host_ceiling as hc
    import numpy as np

    s = suite.size
    batch, steps, rng = s["host_batch"], s["host_steps"], np.random.default_rng(0)
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def contender(case: str) -> tuple[dict, int, int]:
        if case == "vit_b16_sparsity":
            probe = hc.attention_probe([(14, 14)] * 12, 1, 12, norms=True)
            return hc.sparsity_contenders(probe, hc.attention_batches(rng, probe, batch, 2), batch, steps), batch, \
                batch * steps
        if case == "swin_t_sparsity":
            probe = hc.attention_probe([(56, 56)] * 2 + [(28, 28)] * 2 + [(14, 14)] * 6 + [(7, 7)] * 2, 0, 24,
                                       norms=False)
            return hc.sparsity_contenders(probe, hc.attention_batches(rng, probe, batch, 2), batch, steps), batch, \
                batch * steps
        if case == "resnet50_sparsity":
            channels = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
            return (hc.sparsity_contenders(hc.channel_probe(channels), hc.channel_batches(rng, channels, batch, 2),
                                           batch, steps), batch, batch * steps)
        rf_batch = min(hc.RF_BATCH, batch)
        maps = [rng.random((49, rf_batch, 224, 224), dtype=np.float32) for _ in range(2)]
        return hc.rf_contenders(maps, rf_batch, steps), rf_batch, rf_batch * steps

    def one(case: str) -> None:
        contenders, rows, images = contender(case)
        timed, loads = bc.interleaved({"new": contenders["new"]}, runs=s["host_runs"], work=images, warmup=1,
                                      verbose=False)
        t = timed["new"]
        suite.add(part, "records", {"case": case, "batch_size": rows, "images_per_cpu_s": t.rate_per_cpu_s,
                                    "images_per_s": t.rate, "runs": s["host_runs"], "load": loads})
        print(f"  {case}: {t.rate_per_cpu_s:.0f} images per CPU-second (batch {rows})", flush=True)

    try:
        if before:
            os.sched_setaffinity(0, {min(before)})   # this thread (the host step's) on one core
        with suite.lock:
            part["core"] = min(before) if before else None
        suite.each(part, "host", list(HOST_CASES), one)
    finally:
        if before:
            os.sched_setaffinity(0, before)


def part_receptive_fields(suite: Suite, part: dict) -> None:
    import receptive_fields

    s = suite.size
    args = ns(suite, model=VIT_B, batch_size=s["rf_batch"], layers="", chunk_size=8, fraction=1.0 / 7.0,
              runs=s["rf_runs"])
    suite.add(part, "records", slim(receptive_fields.measure(args, suite.info)))


PART_FNS: dict[str, Callable[[Suite, dict], None]] = {
    "grid_vit_bf16": part_grid([(VIT_B, "bfloat16")]),
    "agreement": part_agreement,
    "forward": part_forward(False),
    "flops": part_flops,
    "grid_rest": part_grid([(VIT_B, "float32"), (RESNET50, "bfloat16"), (RESNET50, "float32")],
                           smoke_items=[(RESNET50, "float32")]),
    "data": part_data,
    "host": part_host,
    "receptive_fields": part_receptive_fields,
    "forward_compile": part_forward(True),
}


# ------------------------------------------------------------------------------------------------------------
# Markdown

def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = [bc.md_row(head), bc.md_row(["---"] * len(head))]
    lines += [bc.md_row(r) for r in rows]
    return "\n".join(lines)


def _peaks(results: dict) -> dict[str, float]:
    return results.get("parts", {}).get("flops", {}).get("peak_flops_per_s", {}) or {}


def _tflops(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e12:.3g}"


def render_part(name: str, part: dict, results: dict) -> str:
    recs = part.get("records", [])
    out = [f"### {part.get('title', name)}", "", f"status: {part.get('status')}"
           + (f", {part['seconds']:.0f} s" if "seconds" in part else "")]
    for key in ("skipped", "errors"):
        for line in part.get(key, []):
            out.append(f"- {key.removesuffix('s')}: {line}")
    if part.get("error"):
        out.append(f"- error: {part['error']}")
    out.append("")
    if name.startswith("grid") and recs:
        rows = []
        for r in recs:
            ips, h = r["images_per_s"], r["extrapolated_hours_50k"]
            rows.append([SHORT.get(r["model"], r["model"]), DT[r["dtype"]], r["batch_size"], r["grid"]["cells"],
                         r.get("timed_images", "?"), _f(ips["project"]), _f(ips["reference"]),
                         f"{r['ratio_vs_reference']:.2f}x",
                         _dur(h["project"] * 3600), _dur(h["reference"] * 3600),
                         f"{r['flop_ratio_reference_over_project']:.2f}x", _tflops(r["gflops_per_s"]["project"] * 1e9),
                         f"{r['warmup_s']['project']:.0f} s", f"{r['sanity']['top_cells_agree']:.3f}"])
        out.append(_table(["model", "dtype", "batch", "ablated variants / image", "timed images", "project img/s",
                           "reference img/s",
                           "project / reference", "50k images, project (extrapolated)",
                           "50k images, reference (extrapolated)", "FLOP ratio ref / project",
                           "project TFLOP/s", "project compile", "top-cell outcomes agree"], rows))
        out.append("")
        out.append("The 50,000-image times are EXTRAPOLATED from the timed images (50,000 / images per s; "
                   "compilation and JPEG decoding excluded), not measured over 50,000 images. Grid (the "
                   "paper's): the 12 cells p in {5, 10, 20, 30}% x n in {1, 2, 3}, each with the top set and 3 random "
                   "draws, plus the whole-layer reference per n (3 x 17 ablated variants) and the clean pass. "
                   "Reference = the published procedure re-implemented in PyTorch (a full forward per variant, "
                   "forward hooks), batched over the same images on the same device, same precision.")
    elif name == "agreement" and recs:
        rows = [[SHORT.get(r["model"], r["model"]), r["images"], r["cells_per_image"],
                 f"{r['clean_predictions_agree']:.4f}", f"{r['cell_predictions_agree']:.4f}",
                 f"{r['images_all_predictions_agree']:.4f}", f"{r['images_all_outcomes_agree']:.4f}",
                 r["distinct_fp32_clean_predictions"], f"{r['fp32_cells_changing_the_prediction']:.3f}",
                 f"{r['fp32_clean_margin_over_logit_std_median']:.3g}"] for r in recs]
        out.append(_table(["model", "images", "cells / image", "clean preds agree", "cell preds agree",
                           "images: all preds agree", "images: all outcomes agree (labels = fp32 clean)",
                           "distinct fp32 clean preds", "fp32 cells changing the pred",
                           "median top-2 margin / logit std"],
                          rows))
        out.append("")
        out.append("Same images, same weights, same random draws; bf16 = the project's modules with "
                   "dtype=bfloat16 (parameters fp32), fp32 = HIGHEST precision. Weights: timm's random init "
                   "perturbed as in the parity tests (tests/timm_perturb.py: LayerNorm/BatchNorm scales and "
                   "statistics away from identity, biases and tokens non-zero, q/k weights scaled so attention "
                   "is peaked), then converted. Random weights give smaller top-2 margins than trained ones, so "
                   "this agreement is a lower bound of what trained weights would give; the margin column says how "
                   "close the calls are.")
    elif name.startswith("forward") and recs:
        rows = []
        for r in recs:
            ips = r["images_per_s"]
            rows.append([SHORT.get(r["model"], r["model"]), DT[r["dtype"]], r["batch_size"], _f(ips["project"]),
                         _f(ips["timm_eager"]), _f(ips.get("torch_compile")), f"{r['ratio_vs_eager']:.2f}x",
                         f"{r['ratio_vs_compile']:.2f}x" if r.get("ratio_vs_compile") else "n/a",
                         _f(r.get("logits_rel_diff_vs_timm"), 2),
                         f"{r['warmup_s']['project']:.0f} s",
                         (f"{r['torch_compile_first_call_s']:.0f} s" if r.get("torch_compile_first_call_s") is not None
                          else (r.get("compile_note") or "-"))
                         + (f" ({r['torch_compile_kwargs']})" if r.get("torch_compile_kwargs") else "")])
        out.append(_table(["model", "dtype", "batch", "project img/s", "timm eager img/s", "torch.compile img/s",
                           "project / eager", "project / compile", "logits max rel. diff", "project compile",
                           "torch.compile first call"], rows))
        out.append("")
        out.append("fp32: the project at Precision.HIGHEST, torch with TF32 off; bf16: the project's modules with "
                   "dtype=bfloat16, timm under torch.autocast(bfloat16). Inputs on the device; median of the runs.")
    elif name == "flops":
        mm = part.get("matmul", [])
        if mm:
            out.append(_table(["matmul", "dtype", "framework", "TFLOP/s"],
                              [[f"{m['size']}^3", DT[m["dtype"]], m["framework"], _tflops(m["flops_per_s"])]
                               for m in mm]))
            out.append("")
        out.append(achieved_table(results))
    elif name == "data" and part.get("measured"):
        out.append(data_text(part["measured"], results))
    elif name == "host" and recs:
        rows = [[r["case"], r["batch_size"], _f(r["images_per_cpu_s"]), _f(r["images_per_s"]), r["runs"],
                 bc.load_label(r["load"])] for r in recs]
        out.append(_table(["case", "batch", "images / CPU-second", "images / s (wall)", "runs", "load"], rows))
        out.append("")
        out.append(f"benchmarks/host_ceiling.py's cases (the pass's host step on synthetic device outputs of the real "
                   f"shapes), main thread pinned to core {part.get('core')}: the rate one host core sustains, against "
                   "the device rates above.")
    elif name == "receptive_fields" and recs:
        rows = [[SHORT.get(r["model"], r["model"]), r["layers"], r["batch_size"], r["chunk_size"],
                 _f(r["images_per_s"]["project"]), _f(r["images_per_s"]["torch_loop"]),
                 f"{r['ratio_vs_torch_loop']:.2f}x", _f(r.get("max_rel_diff_of_maps"), 2),
                 _tflops(r["project_gflops_per_s"] * 1e9), f"{r['warmup_s']['project']:.0f} s"] for r in recs]
        out.append(_table(["model", "layers", "batch", "chunk", "project img/s", "torch loop img/s",
                           "project / torch", "max rel. diff of maps", "project TFLOP/s", "project compile"], rows))
    return "\n".join(out).rstrip() + "\n"


def achieved_table(results: dict) -> str:
    """Achieved FLOP/s of every timed program of this run (forward, grid, receptive fields) against the peak."""
    peaks = _peaks(results)
    if not peaks:
        return "(no matmul peak measured in this run yet)"
    rows = []
    parts = results.get("parts", {})
    forward = {}
    for pname in ("forward", "forward_compile"):   # the compile rows, later, replace the eager-only ones
        for r in parts.get(pname, {}).get("records", []):
            forward[(r["model"], r["dtype"])] = r
    for (model, dtype), r in forward.items():
        fl = r["flops_per_image"]
        peak = peaks.get(dtype)
        for who, rate in r["images_per_s"].items():
            rows.append([f"forward, {who}", SHORT.get(model, model), DT[dtype], _f(fl / 1e9),
                         _tflops(fl * rate), f"{100 * fl * rate / peak:.0f}%" if peak else "n/a"])
    for pname in ("grid_vit_bf16", "grid_rest"):
        for r in parts.get(pname, {}).get("records", []):
            peak = peaks.get(r["dtype"])
            for who in ("project", "reference"):
                fl = r["flops_per_image"]["project_step" if who == "project" else "reference"]
                rate = r["images_per_s"][who]
                rows.append([f"ablation grid, {who}", SHORT.get(r["model"], r["model"]), DT[r["dtype"]],
                             _f(fl / 1e9), _tflops(fl * rate), f"{100 * fl * rate / peak:.0f}%" if peak else "n/a"])
    for r in parts.get("receptive_fields", {}).get("records", []):
        peak = peaks.get("float32")
        fl, rate = r["flops_per_image"]["project_program"], r["images_per_s"]["project"]
        rows.append(["receptive fields, project", SHORT.get(r["model"], r["model"]), "fp32", _f(fl / 1e9),
                     _tflops(fl * rate), f"{100 * fl * rate / peak:.0f}%" if peak else "n/a"])
    head = (f"Peak (best square matmul of this run): fp32 {_tflops(peaks.get('float32'))} TFLOP/s (HIGHEST / no TF32), "
            f"bf16 {_tflops(peaks.get('bfloat16'))} TFLOP/s. FLOPs counted from the jaxpr (matmuls and convolutions, "
            "2 per multiply-add; the torch side is credited with the same count).\n\n")
    return head + (_table(["program", "model", "dtype", "GFLOP / image", "TFLOP/s", "% of peak"], rows) if rows
                   else "(no timed program yet)")


def data_text(m: dict, results: dict) -> str:
    best = max(m["batches"], key=lambda b: b["images_per_s"])
    lines = [_table(["pipeline", "threads", "images/s", "images per CPU-second"],
                    [["data.batches (read, decode, resize, crop, device put)", b["threads"], _f(b["images_per_s"]),
                      _f(b["images_per_cpu_s"])] for b in m["batches"]]
                    + ([["from the crop cache", m["from_cache"]["threads"], _f(m["from_cache"]["images_per_s"]),
                         _f(m["from_cache"]["images_per_cpu_s"])]] if m.get("from_cache") else [])),
             "", (f"{m['num_images']} generated JPEGs (mean {m['mean_jpeg_kb']:.0f} kB, ImageNet-val-like sizes); "
                  f"single-thread cost {sum(m['single_thread_cpu_ms_per_image'].values()):.2f} ms/image "
                  f"({m['images_per_s_per_core']:.0f} images/s per core); {m['host_cores_available']} cores."), ""]
    need = []
    parts = results.get("parts", {})
    for pname in ("grid_vit_bf16", "grid_rest"):
        for r in parts.get(pname, {}).get("records", []):
            need.append((f"ablation grid, {SHORT.get(r['model'], r['model'])} {DT[r['dtype']]}",
                         r["images_per_s"]["project"]))
    for r in parts.get("forward", {}).get("records", []):
        if r["model"] in (VIT_B, RESNET50):
            need.append((f"clean forward, {SHORT[r['model']]} {DT[r['dtype']]}", r["images_per_s"]["project"]))
    if need:
        rows = [[what, _f(rate), _f(best["images_per_s"]), "data pipeline" if best["images_per_s"] < rate else "model",
                 f"{rate / m['images_per_s_per_core']:.1f}"] for what, rate in need]
        lines.append(_table(["program (this run)", "model img/s", f"pipeline img/s ({best['threads']} threads)",
                             "bottleneck", "cores needed at the per-core rate"], rows))
    else:
        lines.append("(no model rate measured in this run to compare with)")
    return "\n".join(lines)


def render(results: dict) -> str:
    meta = results.get("meta", {})
    mach = meta.get("machine", {})
    lines = ["## GPU suite (`benchmarks/gpu_suite.py`)" + (" -- SMOKE RUN, tiny models: not figures" if
                                                           results.get("smoke") else ""), "",
             f"- command: `{results.get('command')}`",
             f"- started {results.get('started')}; budget {results.get('budget_s'):.0f} s; elapsed "
             f"{results.get('elapsed_s', 0):.0f} s" + ("; **stopped at the budget**" if results.get("stopped_at_budget")
                                                      else ""),
             f"- device: {meta.get('device', '?')}; host: {mach.get('host_cpu', '?')} x{mach.get('host_cores', '?')}",
             f"- versions: {meta.get('versions', '?')}",
             ("- weights: timm random init perturbed (tests/timm_perturb.py), converted with checkpoints_convert; "
              "random uint8 images"), ""]
    rows = [[n, p.get("status"), f"{p['seconds']:.0f} s" if "seconds" in p else "-"]
            for n, p in results.get("parts", {}).items()]
    lines += [_table(["part", "status", "seconds"], rows), ""]
    for name, part in results.get("parts", {}).items():
        lines += [render_part(name, part, results), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out",
                        help="folder for gpu_suite.json and gpu_suite.md (default: $OUT, else ./gpu_suite_out)")
    parser.add_argument("--budget_s", type=float, default=450.0,
                        help="wall-clock budget from the start of the script; parts that do not fit are skipped and "
                             "the script ends itself at the budget")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes on any device (CI)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts, in the order to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturb_seed", type=int, default=0, help="seed of tests/timm_perturb.py")
    parser.add_argument("--xla_cache_dir", default="/tmp/vitsparse_jax_xla_cache",
                        help="jax's persistent compilation cache ('' = off): the programs that forward_compile "
                             "times again are not compiled again. --smoke keeps jax's own setting instead (the "
                             "JAX_COMPILATION_CACHE_DIR environment variable: the one cache the tests share)")
    for key, value in FULL.items():
        if isinstance(value, int):
            parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({SMOKE[key]} with --smoke)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PART_FNS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {PARTS}")

    suite = Suite(args)
    suite.planned = parts
    for key, value in FULL.items():
        if isinstance(value, int) and getattr(args, key) is not None:
            suite.size[key] = getattr(args, key)
    suite.start_watchdog()

    import jax

    if args.xla_cache_dir and not args.smoke:
        jax.config.update("jax_compilation_cache_dir", args.xla_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    bc.PERTURB_SEED = args.perturb_seed
    if args.smoke:
        bc.MODEL_OVERRIDES.update(SMOKE_OVERRIDES)
        bc.SETTLE_S = 0.0
        forward_throughput.TORCH_COMPILE_KWARGS.update(backend="eager")
        import torch

        torch.set_num_threads(1)   # tiny ops: OpenMP's spinning threads only cost time, a lot on a busy machine
        from vitsparse_jax import models

        if CONVNEXT in models.list_models():
            for timm_kw, ours in SMOKE_CONVNEXT:
                try:
                    models.create_model(CONVNEXT, **ours)
                except TypeError:
                    continue
                bc.MODEL_OVERRIDES[CONVNEXT] = (timm_kw, ours)
                break

    try:
        suite.info = bc.start()
    except SystemExit as e:   # jax and torch on different device kinds: nothing here would be a fair figure
        suite.results["meta"]["fatal"] = str(e)
        suite.write()
        raise
    if suite.info["jax_backend"] != "cpu":
        bc.SETTLE_S = 0.05     # the pause lets CPU worker threads sleep; a GPU run needs none of it
    with suite.lock:
        suite.results["meta"].update(machine=suite.info, device=bc.device_label(suite.info),
                                     versions=bc.versions_label(suite.info),
                                     perturb_seed=args.perturb_seed, settle_s=bc.SETTLE_S,
                                     xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                                     xla_cache_dir=jax.config.jax_compilation_cache_dir or None)
        suite.write()
    print(f"suite: parts {parts}; budget {args.budget_s:.0f} s, {suite.left():.0f} s left after imports; "
          f"out {suite.out}", flush=True)
    for name in parts:
        suite.run_part(name, PART_FNS[name])
    with suite.lock:
        suite.write()
        done = [n for n, p in suite.results["parts"].items() if p["status"] == "done"]
    print(f"\nsuite finished in {suite.elapsed():.0f} s: {len(done)}/{len(parts)} parts done; "
          f"{suite.out}/gpu_suite.json and gpu_suite.md", flush=True)
    # flush and leave without waiting for the watchdog thread or slow interpreter teardown of the frameworks
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
