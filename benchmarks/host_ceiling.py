"""Host ceiling: how many images per second the host side of each experiment's pass can take on one core.

    taskset -c 0 python benchmarks/host_ceiling.py                       # every case
    taskset -c 0 python benchmarks/host_ceiling.py --cases vit_b16_sparsity --batch_size 64

Each case feeds synthetic device outputs of the real shapes (what the jitted device step returns for timm's
model, as numpy) through the real host step of the experiment: the per-image statistics, vectorised, and the
exact ordered totals (`runtime/ordered.py`), against the per-image path it replaced (`tests/host_reference.py`:
statistics row by row, images added one at a time), in the same process, interleaved run by run. The totals of
both are compared (largest difference relative to the largest magnitude of each total).

  vit_b16_sparsity   ViT-B/16 attention sparsity with token norms (the default): 12 blocks of 197 tokens, 12
                     heads, token norms of 13 captures (`Probe.host_values`, `Probe.totals`)
  swin_t_sparsity    Swin-T: blocks on 56x56 (2), 28x28 (2), 14x14 (6) and 7x7 (2) tokens, 24 heads in the last
  resnet50_sparsity  ResNet-50 channel l1: the 16 bottlenecks' act2 (64 x 3, 128 x 4, 256 x 6, 512 x 3 channels)
  vit_b16_rf         receptive fields of ViT-B/16: 49 maps of 224 x 224 per image (`receptive_field.host.MapTotals`)
  ablation_rows      the ablation grid's per-image rows (p = 4 values, n = 3, 3 random draws): already vectorised,
                     so no per-image path to compare
  resume_state       the resume state's save time at 50,000 images of ViT-B/16 sparsity with sparsity.per_image on

Rates are images per CPU-second of this process (median of --runs): on a shared machine they depend much less
on the other jobs than wall-clock rates, which are printed too. Pin the process to one core (`taskset -c 0`):
the script reports the cores it may run on. BLAS and OpenMP run one thread.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # one core: before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import bench_common as bc  # noqa: E402
import numpy as np  # noqa: E402

CASES = ("vit_b16_sparsity", "swin_t_sparsity", "resnet50_sparsity", "vit_b16_rf", "ablation_rows", "resume_state")
RF_BATCH = 16   # configs/receptive_field.py:paper


def sparsity_cfg() -> Any:
    """configs/sparsity.py's `sparsity_section()` defaults, read from the file's literal assignments (`s.name =
    value`) without ml_collections (not installed on the GPU machine, where benchmarks/gpu_suite.py runs this)."""
    import ast
    import types

    tree = ast.parse((bc.REPO / "configs" / "sparsity.py").read_text())
    (section,) = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "sparsity_section"]
    values = {t.attr: ast.literal_eval(node.value) for node in section.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)}
    return types.SimpleNamespace(**values)


def attention_probe(grids: list[tuple[int, int]], prefix: int, heads: int, norms: bool) -> Any:
    """The probe of a model with these block grids, with the statistics switches of configs/sparsity.py."""
    from vitsparse_jax.experiments.sparsity import stats as st
    from vitsparse_jax.experiments.sparsity.probe import Probe

    cfg = sparsity_cfg()
    last = grids[-1][0] * grids[-1][1]
    layout = st.AttentionLayout(
        grids=tuple(grids), prefix=prefix, heads=heads, corr_grid=min(grids, key=lambda g: g[0] * g[1]),
        nu_range=(float(cfg.nu_min), float(cfg.nu_max), int(cfg.nu_bins)),
        top_k=st.num_top(float(cfg.top_fraction), last), top_head=None,
        top_fractions=tuple(float(p) for p in cfg.top_fractions), prefix_kinds=("cls",) * prefix,
        norm_factor=float(cfg.norm_factor) if norms else None)
    names = tuple(f"blocks.{i}" for i in range(len(grids)))
    return Probe("attention", names, (), layout, (None,) * len(grids), ("embed", *names) if norms else ())


def column_means(rng: np.random.Generator, batch: int, tokens: int, total: float = 1.0) -> tuple[np.ndarray, ...]:
    """A device `mean_with_error` pair: float32 column means (rows sum to `total`) and their rounding error."""
    mu = (rng.dirichlet(np.full(tokens, 0.3), size=batch) * total).astype(np.float32)
    return mu, (rng.normal(size=mu.shape) * 1e-9 * mu).astype(np.float32)


def attention_batches(rng, probe, batch: int, count: int) -> list[dict[str, Any]]:
    lay = probe.layout
    out = []
    for _ in range(count):
        tokens = [lay.prefix + g[0] * g[1] for g in lay.grids]
        windows = [max(1, g[0] * g[1] // 49) for g in lay.grids] if lay.prefix == 0 else [1] * len(tokens)
        last = column_means(rng, batch * lay.heads, tokens[-1], windows[-1])
        reduced = {"mu": [column_means(rng, batch, n, w) for n, w in zip(tokens, windows)],
                   "last_mu_h": tuple(x.reshape(batch, lay.heads, -1) for x in last)}
        if probe.norm_captures:
            reduced["norms"] = rng.uniform(20, 80, size=(batch, len(tokens) + 1, tokens[0])).astype(np.float32)
        out.append(reduced)
    return out


def channel_batches(rng, channels: list[int], batch: int, count: int) -> list[dict[str, Any]]:
    return [{"l1": [(rng.exponential(size=(batch, c)) * (rng.random((batch, c)) > 0.2)).astype(np.float32)
                    for c in channels], "active": rng.random((batch, len(channels))).astype(np.float32)}
            for _ in range(count)]


def channel_probe(channels: list[int]) -> Any:
    from vitsparse_jax.experiments.sparsity import stats as st
    from vitsparse_jax.experiments.sparsity.probe import Probe

    cfg = sparsity_cfg()
    layout = st.ChannelLayout(channels=tuple(channels), nu_range=(float(cfg.nu_min), float(cfg.nu_max),
                                                                   int(cfg.nu_bins)),
                              top_fractions=tuple(float(p) for p in cfg.top_fractions))
    return Probe("cnn", tuple(f"layer{i}" for i in range(len(channels))), (), layout)


def sparsity_contenders(probe, batches: list[dict], batch: int, steps: int) -> dict[str, tuple[Callable, Callable]]:
    """new: Probe.host_values + ordered totals (the pass's host step); old: the per-image path."""
    from tests import host_reference as ref

    total = batch * steps
    valid = np.ones(batch, bool)
    sums = probe.totals(probe.host_values(batches[0]), total)   # the totals' layout: once per pass, as the pass does

    def new() -> dict:
        state = sums.init()
        for s in range(steps):
            sums.add(state, probe.host_values(batches[s % len(batches)]), valid, np.arange(s * batch, (s + 1) * batch))
        return sums.result(state)

    def old() -> dict:
        acc = None
        for s in range(steps):
            values = ref.host_values(batches[s % len(batches)], probe.layout)
            acc = ref.accumulate(acc if acc is not None else ref.empty_totals(values), values, valid)
        return acc

    return {"new": (new, lambda x: x), "old": (old, lambda x: x)}


def rf_contenders(batches: list[np.ndarray], batch: int, steps: int) -> dict[str, tuple[Callable, Callable]]:
    from tests.host_reference import add_maps_per_image
    from vitsparse_jax.experiments.receptive_field.host import MapTotals

    layers, hw = batches[0].shape[0], batches[0].shape[2:]
    valid = np.ones(batch, bool)

    def new() -> dict:
        totals = MapTotals(layers, hw, batch * steps)
        acc = totals.init()
        for s in range(steps):
            totals.add(batches[s % len(batches)], valid, np.arange(s * batch, (s + 1) * batch), acc)
        return {"maps": totals.mean(acc) * totals.count(acc)}

    def old() -> dict:
        acc = {"maps": np.zeros((layers, *hw)), "count": np.zeros(()), "skipped": np.zeros(())}
        for s in range(steps):
            add_maps_per_image(acc, batches[s % len(batches)], valid, np.arange(s * batch, (s + 1) * batch))
        return {"maps": acc["maps"]}

    return {"new": (new, lambda x: x), "old": (old, lambda x: x)}


def largest_difference(new: dict, old: dict) -> float:
    """max over totals of |new - old| / max|old| (integer totals must be equal: inf otherwise)."""
    worst = 0.0
    for key, want in old.items():
        got = np.asarray(new[key], np.float64).reshape(np.shape(want))
        want = np.asarray(want, np.float64)
        if np.issubdtype(np.asarray(old[key]).dtype, np.integer) and not np.array_equal(got, want):
            return float("inf")
        scale = np.max(np.abs(want)) if want.size else 0.0
        if scale > 0:
            worst = max(worst, float(np.max(np.abs(got - want)) / scale))
    return worst


def time_case(name: str, contenders: dict, images: int, args: argparse.Namespace, batch: int, info: dict) -> None:
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=images, warmup=1, verbose=False)
    new, old = timed["new"], timed.get("old")
    diff = largest_difference(new.last, old.last) if old else None
    ratio = f"{new.rate_per_cpu_s / old.rate_per_cpu_s:.1f}x" if old else "-"
    print(bc.md_row([name, batch, bc.fmt_rate(new.rate_per_cpu_s), bc.fmt_rate(old.rate_per_cpu_s) if old else "-",
                     ratio, bc.fmt_rate(new.rate), bc.fmt_rate(old.rate) if old else "-",
                     f"{diff:.1e}" if diff is not None else "-", args.runs, bc.load_label(loads)]), flush=True)
    bc.append_json(args.json, bc.record("host_ceiling", info, loads, case=name, batch_size=batch,
                                        images_per_cpu_s=new.rate_per_cpu_s, images_per_s=new.rate,
                                        old_images_per_cpu_s=old.rate_per_cpu_s if old else None,
                                        old_images_per_s=old.rate if old else None, max_rel_difference=diff))


def ablation_contenders(batch: int, steps: int) -> dict[str, tuple[Callable, Callable]]:
    from vitsparse_jax.experiments.ablation.experiment import _add_rows

    rng = np.random.default_rng(0)
    total, n_n, n_p, draws = batch * steps, 3, 4, 3
    out = {"clean": rng.random(batch) > 0.2, "top": rng.random((batch, n_n, n_p)) > 0.5,
           "rand": rng.random((batch, n_n, n_p, draws)) > 0.3, "whole": rng.random((batch, n_n)) > 0.5}
    valid = np.ones(batch, bool)

    def new() -> dict:
        rows = {"done": np.zeros(total, bool), "clean": np.zeros(total, bool), "top": np.zeros((total, n_n, n_p), bool),
                "rand": np.zeros((total, n_n, n_p, draws), bool), "whole": np.zeros((total, n_n), bool)}
        for s in range(steps):
            _add_rows(out, valid, np.arange(s * batch, (s + 1) * batch), rows)
        return rows

    return {"new": (new, lambda x: x)}


def resume_state_save(args: argparse.Namespace) -> None:
    """The sparsity pass's state at 50,000 images of ViT-B/16 with per-image rows on, saved as the pass does."""
    from vitsparse_jax.runtime.workdir import Workdir

    images, prefix = args.state_images, "per_image__"
    probe = attention_probe([(14, 14)] * 12, 1, 12, norms=True)
    one = attention_batches(np.random.default_rng(0), probe, 1, 1)[0]
    acc = {**probe.totals(probe.host_values(one), images).init(), "skipped": np.zeros((), np.int64)}
    rows = probe.image_rows(one)
    acc.update({f"{prefix}{k}": np.random.default_rng(1).random((images, *v.shape[1:])).astype(v.dtype)
                for k, v in rows.items()})
    acc[f"{prefix}done"] = np.ones(images, bool)
    size = sum(v.nbytes for v in acc.values())
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        wd = Workdir(tmp)
        for _ in range(args.runs):
            start = time.perf_counter()
            wd.save_state(acc, {"next_index": images, "total": images})
            seconds.append(time.perf_counter() - start)
        on_disk = wd.path("resume_state.npz").stat().st_size
    print(f"\nresume state at {images} images (ViT-B/16 sparsity, per_image on): {on_disk / 2 ** 20:.0f} MiB on disk "
          f"({size / 2 ** 20:.0f} MiB of arrays), saved in {statistics.median(seconds):.2f} s (median of {args.runs}; "
          f"{min(seconds):.2f}-{max(seconds):.2f} s; atomic write + fsync to {tempfile.gettempdir()})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--batch_size", type=int, default=256, help="rows per batch (receptive fields: 16)")
    parser.add_argument("--steps", type=int, default=8, help="batches per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--state_images", type=int, default=50_000, help="images of the resume state case")
    parser.add_argument("--json", default="", help="append one JSON record per case to this file")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    info = bc.start(with_torch=False)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(f"cores this process may run on: {cores}" + ("" if len(cores) == 1 else
                                                         "  (not pinned: run it under `taskset -c 0`)"))
    print()
    bc.print_table_head(["case", "batch", "img/CPU-s", "old img/CPU-s", "new/old", "img/s wall", "old img/s wall",
                         "max rel. diff", "runs", "load"])
    rng = np.random.default_rng(0)
    b, steps = args.batch_size, args.steps
    for case in cases:
        if case == "vit_b16_sparsity":
            probe = attention_probe([(14, 14)] * 12, 1, 12, norms=True)
            time_case(case, sparsity_contenders(probe, attention_batches(rng, probe, b, 4), b, steps), b * steps,
                      args, b, info)
        elif case == "swin_t_sparsity":
            probe = attention_probe([(56, 56)] * 2 + [(28, 28)] * 2 + [(14, 14)] * 6 + [(7, 7)] * 2, 0, 24, norms=False)
            time_case(case, sparsity_contenders(probe, attention_batches(rng, probe, b, 2), b, steps), b * steps,
                      args, b, info)
        elif case == "resnet50_sparsity":
            channels = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
            probe = channel_probe(channels)
            time_case(case, sparsity_contenders(probe, channel_batches(rng, channels, b, 4), b, steps), b * steps,
                      args, b, info)
        elif case == "vit_b16_rf":
            maps = [rng.random((49, RF_BATCH, 224, 224), dtype=np.float32) for _ in range(2)]
            rf_steps = max(2, steps // 2)
            time_case(case, rf_contenders(maps, RF_BATCH, rf_steps), RF_BATCH * rf_steps, args, RF_BATCH, info)
        elif case == "ablation_rows":
            time_case(case, ablation_contenders(b, steps), b * steps, args, b, info)
        elif case == "resume_state":
            resume_state_save(args)


if __name__ == "__main__":
    main()
