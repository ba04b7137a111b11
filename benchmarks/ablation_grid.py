"""(c) The full ablation grid (docs/science.md#ablation-metrics): our one-pass step vs the published procedure.

    python benchmarks/ablation_grid.py --models vit_base_patch16_224 --batch_size 8
    python benchmarks/ablation_grid.py                 # ViT-B/16 and ResNet50, fp32

Grid: p in {5, 10, 20, 30}%, n in {1, 2, 3}, the top set + 3 random draws = 48 ablated cells, plus the clean
pass that gives A0 and the ranking (whole-layer reference off, as in the paper's grid; --whole_layer 1 adds the
3 whole-layer cells to both sides).

- project: `vitsparse_jax.experiments.ablation.evaluator.Evaluator` -- the jitted per-batch step of the experiment: clean pass with
  captures, ranking, masks, then per n only the last stages re-run, vmapped over the 16 variants of each n.
- reference ("published procedure", re-implemented here with timm + hooks, batched over images): one clean
  forward with a hook capturing the ranking input, then for EVERY (n, p, top/draw) cell a full forward of
  the model with forward hooks that zero the dropped units in the last n ablation layers. ViT: fused
  attention off only in the blocks that are ablated (the others keep F.scaled_dot_product_attention, which
  favours the reference); hooks on `blocks.{l}.attn.attn_drop` multiply the post-softmax columns. ResNet:
  hooks on the bottleneck `act2` ReLUs zero whole channels (ranked by l1 per layer, docs/science.md#cnn-units).
Both sides get uint8 crops already on the device and normalise them inside the step; neither includes
JPEG decoding (see benchmarks/data_throughput.py for that). Time for 50,000 images is EXTRAPOLATED from the
measured per-batch time (50,000 / images per s), compilation excluded (reported apart).
Sanity check: both sides use the same (random, converted) weights and labels = the clean predictions, so
the per-image outcome of every top-set cell must agree between the two (random draws use different RNGs).
"""
from __future__ import annotations

import argparse
from typing import Any

import bench_common as bc

DEFAULT_MODELS = "vit_base_patch16_224,resnet50"
IMAGES_TOTAL = 50_000


class Reference:
    """The published procedure in PyTorch: every cell of the grid re-runs the whole model."""

    def __init__(self, model, plan, device: str, mean, std, seed: int = 0):
        import torch

        self.model, self.plan, self.device = model, plan, device
        self.family = plan.family
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        sites = [s for s in plan.groups[-1].sites]          # the last max(n) ablation layers, forward order
        self.sites = sites
        self.keep: dict[str, torch.Tensor] = {}             # site -> keep factors of the current cell
        self.captured: dict[str, torch.Tensor] = {}
        self.capture_names: set[str] = set()
        for site in sites:
            if self.family == "vit":
                block = model.get_submodule(site.site)      # 'blocks.11.attn' -> timm Attention
                block.fused_attn = False
                target = block.attn_drop
            else:
                target = model.get_submodule(site.site)     # 'layer4.2.act2'
            target.register_forward_hook(self._hook(site.site))

    def _hook(self, name: str):
        def hook(module, inputs, out):
            if name in self.capture_names:
                self.captured[name] = out
            keep = self.keep.get(name)
            if keep is None:
                return None
            if self.family == "vit":
                return out * keep[:, None, None, :]
            return out * keep[:, :, None, None]
        return hook

    def scores(self, site) -> Any:
        """(B, U) ranking scores from the clean pass (docs/science.md#ablation-units)."""
        if self.family == "vit":   # mu of the LAST block's columns (rank_by=last_layer), patch tokens only
            probs = self.captured[self.sites[-1].site]
            return probs.float().mean(dim=(1, 2))[:, site.prefix:]
        act = self.captured[site.site]
        return act.float().abs().sum(dim=(2, 3))            # l1 per channel

    def keep_factors(self, site, drop: Any, batch: int) -> Any:
        import torch

        n_all = site.units + (site.prefix if self.family == "vit" else 0)
        keep = torch.ones(batch, n_all, device=self.device)
        offset = site.prefix if self.family == "vit" else 0
        return keep.scatter_(1, drop + offset, 0.0)

    def step(self, images_u8: Any, labels: Any) -> dict[str, Any]:
        import torch

        plan = self.plan
        with torch.inference_mode():
            x = (images_u8.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            b = x.shape[0]
            self.keep = {}
            self.capture_names = {s.site for s in self.sites}
            clean = self.model(x).argmax(-1) == labels
            self.capture_names = set()
            scores = {s.site: self.scores(s) for s in self.sites}
            top = torch.zeros(b, len(plan.groups), len(plan.ps), dtype=torch.bool, device=self.device)
            rand = torch.zeros(b, len(plan.groups), len(plan.ps), plan.draws, dtype=torch.bool, device=self.device)
            whole = torch.zeros(b, len(plan.groups), dtype=torch.bool, device=self.device)
            draws: dict[tuple[int, int, int], torch.Tensor] = {}   # (U, k, d) -> (B, k): same set for same U
            for gi, group in enumerate(plan.groups):
                for pi, _ in enumerate(plan.ps):
                    for variant in range(1 + plan.draws):
                        self.keep = {}
                        for site in group.sites:
                            k = plan.ks[site.site][pi]
                            if variant == 0:
                                drop = scores[site.site].topk(k, dim=1).indices
                            else:
                                key = (site.units, k, variant)
                                if key not in draws:
                                    draws[key] = torch.rand(b, site.units, generator=self.gen,
                                                            device=self.device).topk(k, dim=1).indices
                                drop = draws[key]
                            self.keep[site.site] = self.keep_factors(site, drop, b)
                        ok = self.model(x).argmax(-1) == labels
                        if variant == 0:
                            top[:, gi, pi] = ok
                        else:
                            rand[:, gi, pi, variant - 1] = ok
                if plan.whole_layer:
                    self.keep = {}
                    for site in group.sites:
                        n_all = site.units + (site.prefix if self.family == "vit" else 0)
                        keep = torch.zeros(b, n_all, device=self.device)
                        if self.family == "vit":
                            keep[:, :site.prefix] = 1.0
                        self.keep[site.site] = keep
                    whole[:, gi] = self.model(x).argmax(-1) == labels
            self.keep = {}
        out = {"clean": clean, "top": top, "rand": rand}
        if plan.whole_layer:
            out["whole"] = whole
        return out

    @property
    def forwards_per_batch(self) -> int:
        p = self.plan
        return 1 + len(p.groups) * p.variants_per_group


def measure(name: str, args: argparse.Namespace, info: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from vitsparse_jax import data
    from vitsparse_jax.experiments.ablation import experiment as ablation
    from vitsparse_jax.experiments.ablation import units as ablation_units

    device = bc.torch_device()
    dtype = args.dtype
    model, module, variables, shared = bc.model_pair(name, dtype, device, args.seed, share=args.share_weights)
    cfg = dict(module.info().default_cfg)
    plan = ablation_units.make_plan(module, ps=[float(p) for p in args.p.split(",")],
                                    ns=[int(n) for n in args.n.split(",")], draws=args.draws,
                                    whole_layer=bool(args.whole_layer))
    evaluator = ablation.Evaluator(module, variables, plan, cfg, seed=args.seed, variant_batch=args.variant_batch)

    b = args.batch_size
    images = bc.random_images(b, module.info().img_size, args.seed)
    # labels = the clean predictions, so that every cell's outcome says "prediction unchanged" (sanity check)
    clean_logits = jax.jit(lambda v, x: module.apply(v, data.normalize(x, cfg))[0])(variables, images)
    labels = np.asarray(jnp.argmax(clean_logits, -1), np.int32)
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels),
             "index": jax.device_put(np.arange(b, dtype=np.int32))}
    reference = Reference(model, plan, device, cfg["mean"], cfg["std"], seed=args.seed)
    t_images = torch.from_numpy(images).to(device)
    t_labels = torch.from_numpy(labels.astype(np.int64)).to(device)
    precision = bc.torch_precision(device, dtype)

    def run_reference():
        with precision:
            return reference.step(t_images, t_labels)

    contenders = {"project": (lambda: evaluator(batch), bc.jax_sync),
                  "reference": (run_reference, bc.torch_sync_fn(device))}
    bc.wait_for_calm(args.wait_load, args.wait_max_s)
    timed, loads = bc.interleaved(contenders, runs=args.runs, work=b)

    # sanity: the top-set cells (and the clean pass) must give the same per-image outcome on both sides
    ours = jax.device_get(timed["project"].last)
    theirs = {k: v.cpu().numpy() for k, v in timed["reference"].last.items()}
    agree_top = float((ours["top"] == theirs["top"]).mean())
    agree_clean = float((ours["clean"] == theirs["clean"]).mean())
    changed_top = float(1.0 - ours["top"].mean())

    fwd_flops = bc.count_flops(lambda v, x: module.apply(v, x)[0], variables,
                               jnp.zeros((b, *images.shape[1:]), jnp.float32)) / b
    step_flops = bc.count_flops(evaluator.step, evaluator.variables, batch["image"], batch["label"],
                                batch["index"], evaluator.key) / b
    ref_flops = fwd_flops * reference.forwards_per_batch
    p, r = timed["project"], timed["reference"]
    cells = len(plan.groups) * plan.variants_per_group
    row = [name, dtype, b, cells, f"{p.rate:.3g}", f"{r.rate:.3g}", f"{p.rate / r.rate:.2f}x",
           f"{IMAGES_TOTAL / p.rate / 3600:.1f} h", f"{IMAGES_TOTAL / r.rate / 3600:.1f} h",
           f"{ref_flops / step_flops:.2f}x", bc.load_label(loads)]
    print(bc.md_row(row), flush=True)
    print(f"  sanity: clean outcomes agree {agree_clean:.3f}, top-set cell outcomes agree {agree_top:.3f} "
          f"(fraction of top cells whose prediction changed: {changed_top:.3f}); compile {p.warmup_s:.1f} s",
          flush=True)
    rec = bc.record("ablation_grid", info, loads, model=name, dtype=dtype, batch_size=b, runs=args.runs,
                    grid={"p": list(plan.ps), "n": [g.n for g in plan.groups], "draws": plan.draws,
                          "whole_layer": plan.whole_layer, "cells": cells,
                          "sites": [s.site for s in plan.groups[-1].sites],
                          "k": {s: list(k) for s, k in plan.ks.items()}},
                    variant_batch=args.variant_batch,
                    images_per_s={"project": p.rate, "reference": r.rate},
                    images_per_cpu_s={"project": p.rate_per_cpu_s, "reference": r.rate_per_cpu_s},
                    run_seconds={"project": p.seconds, "reference": r.seconds},
                    warmup_s={"project": p.warmup_s, "reference": r.warmup_s},
                    ratio_vs_reference=p.rate / r.rate,
                    extrapolated_hours_50k={"project": IMAGES_TOTAL / p.rate / 3600,
                                            "reference": IMAGES_TOTAL / r.rate / 3600},
                    flops_per_image={"forward": fwd_flops, "project_step": step_flops, "reference": ref_flops},
                    flop_ratio_reference_over_project=ref_flops / step_flops,
                    gflops_per_s={"project": step_flops * p.rate / 1e9, "reference": ref_flops * r.rate / 1e9},
                    reference_forwards_per_batch=reference.forwards_per_batch,
                    sanity={"clean_agree": agree_clean, "top_cells_agree": agree_top,
                            "top_cells_changed": changed_top},
                    weights="timm init, shared" if shared is not None else "independent random inits")
    bc.append_json(args.json, rec)
    if args.agreement and dtype == "float32":
        rec["bf16_agreement"] = bf16_agreement(module, name, shared if shared is not None else variables, plan,
                                               cfg, batch, args)
        bc.append_json(args.json, {"benchmark": "ablation_bf16_agreement", "model": name,
                                   **rec["bf16_agreement"], "command": bc.command_line()})
    return rec


def bf16_agreement(module, name: str, variables, plan, cfg, batch, args) -> dict:
    """Fraction of images whose every cell outcome (and clean prediction) is the same in bf16 as in fp32.
    labels = the fp32 clean predictions, so an outcome is 'prediction unchanged'. Meaningful with trained
    weights only (random weights give near-tied logits); printed for completeness."""
    import jax
    import numpy as np

    from vitsparse_jax import models
    from vitsparse_jax.experiments.ablation import experiment as ablation

    fp32 = jax.device_get(ablation.Evaluator(module, variables, plan, cfg, seed=args.seed)(batch))
    bf_module = models.create_model(name, dtype=bc.jax_dtype("bfloat16"))
    bf16 = jax.device_get(ablation.Evaluator(bf_module, variables, plan, cfg, seed=args.seed)(batch))
    same = np.ones(len(fp32["clean"]), bool)
    for k in fp32:
        same &= (fp32[k] == bf16[k]).reshape(len(same), -1).all(axis=1)
    out = {"images": int(len(same)), "images_all_cells_agree": float(same.mean()),
           "clean_agree": float((fp32["clean"] == bf16["clean"]).mean())}
    print(f"  bf16 vs fp32 (random weights): {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--p", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--n", default="1,2,3")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--whole_layer", type=int, default=0)
    parser.add_argument("--variant_batch", type=int, default=0, help="as config.ablation.variant_batch (0 = vmap all)")
    parser.add_argument("--share_weights", type=int, default=1)
    parser.add_argument("--agreement", type=int, default=0, help="also compare bf16 with fp32 outcomes (1/0)")
    bc.add_common_args(parser)
    args = parser.parse_args()
    info = bc.start()
    bc.print_table_head(["model", "dtype", "batch", "cells", "project img/s", "reference img/s", "project / reference",
                         "50k images, project (extrap.)", "50k images, reference (extrap.)", "FLOP ratio ref/project",
                         "load avg"])
    for name in args.models.split(","):
        measure(name.strip(), args, info)


if __name__ == "__main__":
    main()
