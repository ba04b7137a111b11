"""(d) Receptive fields of every layer of a ViT: this project's batched gradient program vs a torch.autograd loop.

    python benchmarks/receptive_fields.py --model vit_base_patch16_224 --batch_size 2
    python benchmarks/receptive_fields.py --model vit_small_patch16_224 --batch_size 4

Layers: the experiment's default set (`receptive_field.default_layers`): `embed` and, for every block,
`attn`, `attn_res`, `mlp` and the block output (49 layers for a 12-block ViT); central part f = 1/7
(2x2 of the 14x14 patch grid). Output of both: M (L, H, W) = sum over images of |d sum(Y_central) / dx|,
summed over colour channels.
  - project: `gradient_fields.make_rf_fn`, jitted: the forward stage by stage under jax.vjp, then a reverse
    sweep over the stages that pulls back a batch of cotangents, one row per layer already reached (vmapped
    over the rows; at most `--chunk_size` rows together, one sweep per chunk of layers); the default chunk
    size of configs/receptive_field.py is 8.
  - peer: timm with forward hooks, ONE forward with the input requiring grad, then a loop over the layers:
    `torch.autograd.grad(central_sum(Y_l), x, retain_graph=True)` (each backward only runs through the
    part of the graph below layer l).
Random weights shared (checkpoints_convert), so the maps are compared layer by layer (relative max error).
"""
from __future__ import annotations

import argparse

import bench_common as bc


def torch_program(model, layers, prefix: int, device: str):
    """fn(x NCHW float) -> (L, H, W) tensor: one forward, one autograd.grad per layer."""
    import torch

    found: dict = {}
    for i, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, a, o, i=i: found.__setitem__(f"blocks.{i}.attn", o))
        blk.norm2.register_forward_pre_hook(lambda m, a, i=i: found.__setitem__(f"blocks.{i}.attn_res", a[0]))
        blk.mlp.register_forward_hook(lambda m, a, o, i=i: found.__setitem__(f"blocks.{i}.mlp", o))
        blk.register_forward_hook(lambda m, a, o, i=i: found.__setitem__(f"blocks.{i}", o))
    model.blocks[0].register_forward_pre_hook(lambda m, a: found.__setitem__("embed", a[0]))
    model.norm.register_forward_hook(lambda m, a, o: found.__setitem__("norm", o))

    def central_sum(layer, y):
        if layer.layout == "vector":
            return y.sum()
        r = layer.region
        gh, gw = r.grid
        y = y[:, prefix:].reshape(y.shape[0], gh, gw, y.shape[-1])
        return y[:, r.row0:r.row1, r.col0:r.col1].sum()

    def fn(x_nchw):
        found.clear()
        x = x_nchw.detach().clone().requires_grad_(True)
        logits = model(x)
        maps = []
        for layer in layers:
            y = logits if layer.name == "logits" else found[layer.name]
            (g,) = torch.autograd.grad(central_sum(layer, y), x, retain_graph=True)
            maps.append(g.abs().sum(1).sum(0))
        return torch.stack(maps)
    return fn


def measure(args: argparse.Namespace, info: dict) -> dict:
    """Times both programs on `args.model` (fields as main()'s flags), prints the row, returns the record."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from vitsparse_jax.measures import gradient_fields as rf

    device = bc.torch_device()
    model, module, variables, shared = bc.model_pair(args.model, "float32", device, args.seed,
                                                     share=args.share_weights)
    minfo = module.info()
    if minfo.family != "vit":
        raise SystemExit("the torch peer's hooks are written for timm VisionTransformer models")
    names = rf.select_layers(minfo, [p for p in args.layers.split(",") if p])
    img = minfo.img_size
    layers = tuple(rf.layer_specs(module, variables, minfo, names, args.fraction, (img, img)))
    fn = rf.make_rf_fn(module, layers, minfo.num_prefix_tokens, args.chunk_size)
    b = args.batch_size
    x_np = bc.normalized_nhwc(bc.random_images(b, img, args.seed))
    x_jax = jax.device_put(x_np)
    weight = jnp.ones((b,), jnp.float32)
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    tfn = torch_program(model, layers, minfo.num_prefix_tokens, device)

    contenders = {"project": (lambda: fn(variables, x_jax, weight), bc.jax_sync),
                  "torch_loop": (lambda: tfn(x_torch), bc.torch_sync_fn(device))}
    bc.wait_for_calm(args.wait_load, args.wait_max_s)
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=b)

    ours = np.asarray(timed["project"].last)
    theirs = timed["torch_loop"].last.detach().cpu().numpy()
    errs = [float(np.abs(o - t).max() / (np.abs(t).max() + 1e-30)) for o, t in zip(ours, theirs, strict=True)]
    flops = bc.count_flops(fn, variables, x_jax, weight) / b
    fwd_flops = bc.count_flops(lambda v, x: module.apply(v, x)[0], variables, x_jax) / b
    p, t = timed["project"], timed["torch_loop"]
    bc.print_table_head(["model", "layers", "batch", "chunk", "project img/s", "torch loop img/s", "project / torch",
                         "max rel. diff of maps", "load avg"])
    print(bc.md_row([args.model, len(layers), b, args.chunk_size, f"{p.rate:.3g}", f"{t.rate:.3g}",
                     f"{p.rate / t.rate:.2f}x", f"{max(errs):.1e}" if shared is not None else "n/a",
                     bc.load_label(loads)]), flush=True)
    print(f"  project program: {flops / 1e9:.0f} GFLOP per image = {flops / fwd_flops:.1f} forward passes "
          f"({fwd_flops / 1e9:.1f} GFLOP); {flops * p.rate / 1e9:.1f} GFLOP/s achieved; compile {p.warmup_s:.1f} s")
    rec = bc.record(
        "receptive_fields", info, loads, model=args.model, layers=len(layers), batch_size=b,
        chunk_size=args.chunk_size, runs=args.runs, fraction=args.fraction,
        images_per_s={"project": p.rate, "torch_loop": t.rate},
        images_per_cpu_s={"project": p.rate_per_cpu_s, "torch_loop": t.rate_per_cpu_s},
        run_seconds={"project": p.seconds, "torch_loop": t.seconds},
        warmup_s={"project": p.warmup_s, "torch_loop": t.warmup_s}, ratio_vs_torch_loop=p.rate / t.rate,
        max_rel_diff_of_maps=max(errs) if shared is not None else None,
        flops_per_image={"project_program": flops, "forward": fwd_flops},
        project_gflops_per_s=flops * p.rate / 1e9,
        weights="timm init, shared" if shared is not None else "independent random inits")
    bc.append_json(args.json, rec)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--layers", default="", help="comma-separated fnmatch patterns ('' = the experiment default)")
    parser.add_argument("--chunk_size", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=1.0 / 7.0)
    parser.add_argument("--share_weights", type=int, default=1)
    bc.add_common_args(parser)
    args = parser.parse_args()
    measure(args, bc.start())


if __name__ == "__main__":
    main()
