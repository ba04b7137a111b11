"""This project with and without an XLA flag, back to back (XLA_FLAGS is read once per process).

"default" means jax's own defaults: the child runs with VITSPARSE_JAX_KEEP_XLA_FLAGS=1, so importing the
package does not add its CPU flag (vitsparse_jax/xla_cpu_flags.py); "flag" runs with `--flags` only.

    python benchmarks/xla_flag_check.py                       # 5 forwards, + the ViT-B ablation step
    python benchmarks/xla_flag_check.py --flags=--xla_cpu_experimental_ynn_fusion_type= --ablation 0

For each program, child processes alternate (default flags, `--flags`, default, `--flags`, ...,
`--repeats` pairs); each child compiles, warms up and reports the median of `--runs` timed calls. The
table gives the median over the children of each setting. Only this project runs (no torch), so this
isolates what the flag does to XLA's code; the comparison with timm is in forward_throughput.py /
ablation_grid.py, run once with and once without the flag.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import bench_common as bc

DEFAULT_MODELS = "vit_base_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224,resnet50,vgg16"
FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def child(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    b = args.batch_size
    module, variables = bc.flax_model(args.model)
    size = module.info().img_size
    if args.program == "forward":
        fn = jax.jit(lambda v, x: module.apply(v, x)[0])
        call_args = (variables, jax.device_put(bc.normalized_nhwc(bc.random_images(b, size, args.seed))))
    else:
        from vitsparse_jax.experiments.ablation import experiment as ablation
        from vitsparse_jax.experiments.ablation import units as ablation_units

        plan = ablation_units.make_plan(module, ps=(0.05, 0.1, 0.2, 0.3), ns=(1, 2, 3), draws=3, whole_layer=False)
        ev = ablation.Evaluator(module, variables, plan, dict(module.info().default_cfg), seed=args.seed)
        fn = jax.jit(ev.step)
        call_args = (ev.variables, jax.device_put(bc.random_images(b, size, args.seed)),
                     jax.device_put(np.zeros(b, np.int32)), jax.device_put(np.arange(b, dtype=np.int32)), ev.key)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*call_args))
    first = time.perf_counter() - t0
    seconds = []
    for _ in range(args.runs):
        time.sleep(bc.SETTLE_S)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*call_args))
        seconds.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"seconds": seconds, "first_call_s": first, "load": bc.loadavg()}), flush=True)


def run_child(args: argparse.Namespace, program: str, model: str, flags: str) -> dict:
    env = dict(os.environ)
    env["VITSPARSE_JAX_KEEP_XLA_FLAGS"] = "1"   # exactly the flags given here, nothing added on import
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, __file__, "--child", "--program", program, "--model", model,
           "--batch_size", str(args.batch_size), "--runs", str(args.runs), "--seed", str(args.seed)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--flags", default=FLAG)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of child processes per program")
    parser.add_argument("--ablation", type=int, default=1, help="also the ViT-B ablation step (1/0)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--program", default="forward", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    bc.add_common_args(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    info = bc.start(with_torch=False)
    bc.print_table_head(["program", "batch", "default img/s", f"`XLA_FLAGS={args.flags}` img/s", "flag / default",
                         "first call default / flag (s)", "load"])
    jobs = [("forward", m.strip()) for m in args.models.split(",")]
    if args.ablation:
        jobs.append(("ablation_step", "vit_base_patch16_224"))
    for program, model in jobs:
        res: dict[str, list[dict]] = {"default": [], "flag": []}
        for _ in range(args.repeats):
            res["default"].append(run_child(args, program, model, ""))
            res["flag"].append(run_child(args, program, model, args.flags))
        rate = {k: args.batch_size / statistics.median(statistics.median(r["seconds"]) for r in v)
                for k, v in res.items()}
        loads = [r["load"] for v in res.values() for r in v]
        first = {k: statistics.median(r["first_call_s"] for r in v) for k, v in res.items()}
        print(bc.md_row([f"{program} {model}", args.batch_size, f"{rate['default']:.3g}", f"{rate['flag']:.3g}",
                         f"{rate['flag'] / rate['default']:.2f}x", f"{first['default']:.1f} / {first['flag']:.1f}",
                         bc.load_label(loads)]), flush=True)
        bc.append_json(args.json, bc.record("xla_flag_check", info, loads, program=program, model=model,
                                            batch_size=args.batch_size, runs=args.runs, flags=args.flags,
                                            images_per_s=rate, first_call_s=first,
                                            run_seconds={k: [r["seconds"] for r in v] for k, v in res.items()}))


if __name__ == "__main__":
    main()
