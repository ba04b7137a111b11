"""(a) Clean forward throughput: this project (jitted `module.apply`) vs timm eager and timm + torch.compile.

    python benchmarks/forward_throughput.py --models vit_base_patch16_224 --batch_size 8 --dtypes float32
    python benchmarks/forward_throughput.py            # ViT-B/16, DeiT-S, Swin-T, ResNet50, VGG16; fp32 and bf16

Same device, batch size and dtype on both sides; random weights (timm `pretrained=False`, converted to this
project's layout with `checkpoints_convert` so that both compute the same function: the max logit difference
is printed as a sanity check). fp32: the project at its default precision (HIGHEST), torch without TF32.
bf16: the project with `dtype=bfloat16` (parameters stay fp32, compute in bf16), torch under
`torch.autocast(bfloat16)` (timm's own benchmark does the same). timm keeps its default fused attention
(F.scaled_dot_product_attention). Inputs are already on the device (NHWC float32 for JAX, NCHW for torch).
The runs of the contenders alternate (A B C A B C ...); the median of `--runs` runs is reported.
"""
from __future__ import annotations

import argparse
import time

import bench_common as bc

DEFAULT_MODELS = "vit_base_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224,resnet50,vgg16"
# Keyword arguments of torch.compile (default: Inductor). The GPU suite's --smoke sets backend="eager", which
# goes through Dynamo without Inductor's C++ compilation (minutes on a 2-core CPU).
TORCH_COMPILE_KWARGS: dict = {}


def measure(name: str, dtype: str, args: argparse.Namespace, info: dict) -> dict:
    import jax
    import numpy as np
    import torch

    device = bc.torch_device()
    model, module, variables, shared = bc.model_pair(name, dtype, device, args.seed, share=args.share_weights)
    img = module.info().img_size
    images = bc.random_images(args.batch_size, img, args.seed)
    x_jax = jax.device_put(bc.normalized_nhwc(images))
    x_torch = torch.from_numpy(bc.normalized_nhwc(images).transpose(0, 3, 1, 2).copy()).to(device)

    apply = jax.jit(lambda v, x: module.apply(v, x)[0])
    precision = bc.torch_precision(device, dtype)

    def run_torch(m):
        def fn():
            with torch.inference_mode(), precision:
                return m(x_torch)
        return fn

    contenders = {"project": (lambda: apply(variables, x_jax), bc.jax_sync),
                  "timm_eager": (run_torch(model), bc.torch_sync_fn(device))}
    compile_note, compile_s = "", None
    if args.compile:
        try:
            compiled = torch.compile(model, **TORCH_COMPILE_KWARGS)
            t0 = time.perf_counter()
            with torch.inference_mode(), precision:
                compiled(x_torch)   # compiles here; failures show up now, not in the timed loop
            compile_s = time.perf_counter() - t0
            contenders["torch_compile"] = (run_torch(compiled), bc.torch_sync_fn(device))
        except Exception as e:   # noqa: BLE001 - record why torch.compile is missing from the table
            compile_note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print("  " + compile_note)

    bc.wait_for_calm(args.wait_load, args.wait_max_s)
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=args.batch_size, iters=args.iters)

    diff = None
    if shared is not None:
        a = np.asarray(timed["project"].last, np.float32)
        b = timed["timm_eager"].last.float().cpu().numpy()
        diff = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
    flops = bc.count_flops(lambda v, x: module.apply(v, x)[0], variables, x_jax) / args.batch_size

    p, e = timed["project"], timed["timm_eager"]
    c = timed.get("torch_compile")
    row = [name, dtype, args.batch_size, bc.fmt_rate(p.rate), bc.fmt_rate(e.rate),
           bc.fmt_rate(c.rate) if c else "n/a", f"{p.rate / e.rate:.2f}x",
           f"{p.rate / c.rate:.2f}x" if c else "n/a", bc.load_label(loads)]
    print(bc.md_row(row), flush=True)
    rec = bc.record("forward_throughput", info, loads, model=name, dtype=dtype, batch_size=args.batch_size,
                    runs=args.runs, iters_per_run=args.iters,
                    images_per_s={k: t.rate for k, t in timed.items()},
                    images_per_cpu_s={k: t.rate_per_cpu_s for k, t in timed.items()},
                    run_seconds={k: t.seconds for k, t in timed.items()},
                    warmup_s={k: t.warmup_s for k, t in timed.items()},
                    ratio_vs_eager=p.rate / e.rate, ratio_vs_compile=(p.rate / c.rate) if c else None,
                    compile_note=compile_note, torch_compile_first_call_s=compile_s,
                    torch_compile_kwargs=dict(TORCH_COMPILE_KWARGS) if args.compile else None, flops_per_image=flops,
                    project_gflops_per_s=flops * p.rate / 1e9, logits_rel_diff_vs_timm=diff,
                    weights="timm init, shared" if shared is not None else "independent random inits")
    bc.append_json(args.json, rec)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--iters", type=int, default=1, help="forward calls per timed run")
    parser.add_argument("--compile", type=int, default=1, help="also time timm under torch.compile (1/0)")
    parser.add_argument("--share_weights", type=int, default=1,
                        help="convert the timm weights for the project (parity check) (1/0)")
    bc.add_common_args(parser)
    args = parser.parse_args()
    info = bc.start()
    bc.print_table_head(["model", "dtype", "batch", "project img/s", "timm eager img/s", "torch.compile img/s",
                         "project / eager", "project / compile", "load avg"])
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            measure(name.strip(), dtype.strip(), args, info)


if __name__ == "__main__":
    main()
