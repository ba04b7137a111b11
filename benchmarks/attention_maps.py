"""(b) Attention-map extraction throughput: this project (`capture=` in one jitted apply) vs timm with hooks.

    python benchmarks/attention_maps.py --models vit_base_patch16_224 --batch_size 8
    python benchmarks/attention_maps.py                # ViT-B/16, DeiT-S, Swin-T

Both sides return the logits and the post-softmax attention map of EVERY block, kept on the device:
  - project: `module.apply(variables, x, capture=("blocks.*.attn.probs",))` (Swin: "layers.*.blocks.*.attn.probs")
    under jax.jit;
  - timm: fused attention turned off in every attention module (F.scaled_dot_product_attention never
    materialises the map, so a user who wants the maps must turn it off), a forward hook on each block's
    `attn.attn_drop` (Identity/Dropout(0) in eval, its output = the post-softmax map) appends it to a list.
Random weights shared through checkpoints_convert; the maps of the last block are compared as a sanity check.
"""
from __future__ import annotations

import argparse

import bench_common as bc

DEFAULT_MODELS = "vit_base_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224"


def attn_drop_modules(model) -> list:
    return [m.attn_drop for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]


def measure(name: str, dtype: str, args: argparse.Namespace, info: dict) -> dict:
    import jax
    import numpy as np
    import torch

    device = bc.torch_device()
    model, module, variables, shared = bc.model_pair(name, dtype, device, args.seed, share=args.share_weights,
                                                     fused_attn=False)
    family = module.info().family
    pattern = "layers.*.blocks.*.attn.probs" if family == "swin" else "blocks.*.attn.probs"
    images = bc.random_images(args.batch_size, module.info().img_size, args.seed)
    x_jax = jax.device_put(bc.normalized_nhwc(images))
    x_torch = torch.from_numpy(bc.normalized_nhwc(images).transpose(0, 3, 1, 2).copy()).to(device)

    extract = jax.jit(lambda v, x: module.apply(v, x, capture=(pattern,)))
    maps: list = []
    hooked = attn_drop_modules(model)
    for m in hooked:
        m.register_forward_hook(lambda mod, inp, out: maps.append(out))
    precision = bc.torch_precision(device, dtype)

    def run_timm():
        maps.clear()
        with torch.inference_mode(), precision:
            logits = model(x_torch)
        return logits, list(maps)

    contenders = {"project": (lambda: extract(variables, x_jax), bc.jax_sync),
                  "timm_hooks": (run_timm, bc.torch_sync_fn(device))}
    bc.wait_for_calm(args.wait_load, args.wait_max_s)
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=args.batch_size, iters=args.iters)

    _, aux = timed["project"].last
    _, tmaps = timed["timm_hooks"].last
    n_maps = len(aux)
    nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in aux.values()) / args.batch_size
    diff = None
    if shared is not None and len(tmaps) == n_maps:
        last = sorted(aux, key=lambda k: [int(t) if t.isdigit() else t for t in k.split(".")])[-1]
        a = np.asarray(aux[last], np.float32)
        b = tmaps[-1].float().cpu().numpy().reshape(a.shape)
        diff = float(np.abs(a - b).max())
    p, t = timed["project"], timed["timm_hooks"]
    row = [name, dtype, args.batch_size, n_maps, f"{nbytes / 2**20:.1f}", bc.fmt_rate(p.rate), bc.fmt_rate(t.rate),
           f"{p.rate / t.rate:.2f}x", bc.load_label(loads)]
    print(bc.md_row(row), flush=True)
    rec = bc.record("attention_maps", info, loads, model=name, dtype=dtype, batch_size=args.batch_size,
                    runs=args.runs, iters_per_run=args.iters, maps_per_forward=n_maps, timm_hooks=len(hooked),
                    map_mib_per_image=nbytes / 2**20,
                    images_per_s={k: v.rate for k, v in timed.items()},
                    images_per_cpu_s={k: v.rate_per_cpu_s for k, v in timed.items()},
                    run_seconds={k: v.seconds for k, v in timed.items()},
                    warmup_s={k: v.warmup_s for k, v in timed.items()},
                    ratio_vs_timm_hooks=p.rate / t.rate, last_map_max_abs_diff=diff,
                    weights="timm init, shared" if shared is not None else "independent random inits")
    bc.append_json(args.json, rec)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--share_weights", type=int, default=1)
    bc.add_common_args(parser)
    args = parser.parse_args()
    info = bc.start()
    bc.print_table_head(["model", "dtype", "batch", "maps", "MiB of maps / image", "project img/s",
                         "timm + hooks img/s", "project / timm", "load avg"])
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            measure(name.strip(), dtype.strip(), args, info)


if __name__ == "__main__":
    main()
