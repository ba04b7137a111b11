"""(e) Achieved FLOP/s of the forward pass against the device's measured matmul peak.

    python benchmarks/flops.py                                   # 5 models, fp32, batch 8
    python benchmarks/flops.py --models vit_base_patch16_224 --dtype bfloat16

1. Peak: the best of square matmuls (sizes `--sizes`) in JAX (jit, HIGHEST precision in fp32) and in torch,
   2 N^3 FLOPs each, median of `--runs` runs. "Peak" below = the best of all of them.
2. FLOPs per image, counted analytically from the program's shapes: every dot_general and convolution of the
   model's jaxpr, 2 FLOPs per multiply-add (`bench_common.jaxpr_flops`; elementwise work -- softmax, GELU,
   norms, residual adds -- is not counted). Cross-checks printed beside it: XLA's own cost analysis of the
   compiled program, and for ViTs the closed form sum over blocks of 2N(4D^2 + 2rD^2) + 4N^2D + embed + head.
3. Achieved = FLOPs per image x images/s of the jitted forward (this project) and of timm eager, same batch.
"""
from __future__ import annotations

import argparse

import bench_common as bc

DEFAULT_MODELS = "vit_base_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224,resnet50,vgg16"


def matmul_peak(args, info) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    device = bc.torch_device()
    out = {}
    for dtype in ("float32", "bfloat16"):
        for n in [int(s) for s in args.sizes.split(",")]:
            rng = np.random.default_rng(0)
            a = rng.standard_normal((n, n), np.float32)
            b = rng.standard_normal((n, n), np.float32)
            ja, jb = (jax.device_put(jnp.asarray(m, bc.jax_dtype(dtype))) for m in (a, b))
            mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
            tdt = torch.float32 if dtype == "float32" else torch.bfloat16
            ta, tb = (torch.from_numpy(m).to(device=device, dtype=tdt) for m in (a, b))
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False
            contenders = {"jax": (lambda mm=mm, ja=ja, jb=jb: mm(ja, jb), bc.jax_sync),
                          "torch": (lambda ta=ta, tb=tb: torch.mm(ta, tb), bc.torch_sync_fn(device))}
            bc.wait_for_calm(args.wait_load, args.wait_max_s)
            timed, loads = bc.interleaved(contenders, runs=args.runs, work=2.0 * n ** 3, verbose=False,
                                          iters=getattr(args, "iters", 1))
            for k, t in timed.items():
                out[(k, dtype, n)] = t.rate
                print(bc.md_row([f"matmul {n}x{n}", dtype, k, f"{t.rate / 1e9:.1f}", bc.load_label(loads)]),
                      flush=True)
                bc.append_json(args.json, bc.record("matmul_peak", info, loads, framework=k, dtype=dtype, size=n,
                                                    gflops_per_s=t.rate / 1e9, run_seconds=t.seconds,
                                                    iters_per_run=getattr(args, "iters", 1)))
    return out


def model_flops(name: str, peak: float, args, info) -> dict:
    import jax
    import torch

    device = bc.torch_device()
    module, variables = bc.flax_model(name, args.dtype, args.seed)
    model = bc.timm_model(name, device)
    minfo = module.info()
    b = args.batch_size
    x_np = bc.normalized_nhwc(bc.random_images(b, minfo.img_size, args.seed))
    x_jax = jax.device_put(x_np)
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)

    def fwd(v, x):
        return module.apply(v, x)[0]
    apply = jax.jit(fwd)
    flops = bc.count_flops(fwd, variables, x_jax) / b
    xla = bc.xla_flops(apply, variables, x_jax)
    xla = xla / b if xla else None
    closed = None
    if minfo.family == "vit":
        tokens = minfo.patch_grid[0] * minfo.patch_grid[1] + minfo.num_prefix_tokens
        closed = bc.vit_flops_closed_form(module.depth, module.embed_dim, tokens, module.patch_size, module.img_size,
                                          module.num_classes, module.mlp_ratio)
    precision = bc.torch_precision(device, args.dtype)

    def run_torch():
        with torch.inference_mode(), precision:
            return model(x_torch)

    contenders = {"project": (lambda: apply(variables, x_jax), bc.jax_sync),
                  "timm_eager": (run_torch, bc.torch_sync_fn(device))}
    bc.wait_for_calm(args.wait_load, args.wait_max_s)
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=b)
    p, e = timed["project"], timed["timm_eager"]
    gp, ge = flops * p.rate / 1e9, flops * e.rate / 1e9
    print(bc.md_row([name, args.dtype, b, f"{flops / 1e9:.2f}", f"{xla / 1e9:.2f}" if xla else "n/a",
                     f"{closed / 1e9:.2f}" if closed else "-", f"{gp:.1f}", f"{100 * gp / peak * 1e9:.0f}%",
                     f"{ge:.1f}", f"{100 * ge / peak * 1e9:.0f}%", bc.load_label(loads)]), flush=True)
    rec = bc.record("flops", info, loads, model=name, dtype=args.dtype, batch_size=b, runs=args.runs,
                    flops_per_image=flops, xla_cost_analysis_flops_per_image=xla, closed_form_flops_per_image=closed,
                    images_per_s={"project": p.rate, "timm_eager": e.rate},
                    gflops_per_s={"project": gp, "timm_eager": ge}, peak_gflops_per_s=peak / 1e9,
                    fraction_of_peak={"project": gp / (peak / 1e9), "timm_eager": ge / (peak / 1e9)})
    bc.append_json(args.json, rec)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--sizes", default="1024,2048", help="square matmul sizes for the peak")
    bc.add_common_args(parser, runs=5)
    args = parser.parse_args()
    info = bc.start()
    bc.print_table_head(["matmul", "dtype", "framework", "GFLOP/s", "load avg"])
    rates = matmul_peak(args, info)
    peak = max(v for (k, dt, n), v in rates.items() if dt == args.dtype)
    print(f"\nmeasured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s (best of the runs above)\n")
    bc.print_table_head(["model", "dtype", "batch", "GFLOP / image (counted)", "XLA cost analysis", "closed form",
                         "project GFLOP/s", "project % of peak", "timm eager GFLOP/s", "timm % of peak", "load avg"])
    for name in args.models.split(","):
        model_flops(name.strip(), peak, args, info)


if __name__ == "__main__":
    main()
