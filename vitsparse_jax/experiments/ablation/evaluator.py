"""The ablation's device step: clean pass, ranking, masks and every variant of a batch, in one jitted program.

Per batch (`Evaluator`): the clean pass gives A0's predictions, the ranking inputs (attention probabilities /
post-ReLU maps, docs/science.md#ablation-units) and the input of every stage a variant group starts from; then
for each n the variants (every p x {top set, random draws} and the whole-layer reference) re-run only the last
stages, vmapped over the variant axis.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vitsparse_jax import data
from vitsparse_jax.experiments.ablation import units as ablation_units
from vitsparse_jax.experiments.ablation.units import Plan


class Evaluator:
    """The per-batch step: clean pass, ranking, masks and every variant, in one jitted program.

    `evaluator(batch)` returns device arrays (B = batch rows, Nn = len(n), P = len(p), D = draws):
    clean (B,), top (B, Nn, P), rand (B, Nn, P, D), whole (B, Nn) booleans (prediction == label); with
    `predictions=True` also what report.html's explorer shows: the predicted classes clean_pred (B,) and
    pred (B, Nn, V) int32 and the dropped units drops {site: (B, V, U) bool} (V = the variants of a group,
    in units.py's order), the very values the step computes anyway (the pass leaves them on the device).
    Time it with `jax.block_until_ready(evaluator(batch))`; `evaluator.variants` counts the re-runs of
    the ablated stages per image.
    """

    def __init__(self, module: Any, variables: Any, plan: Plan, pretrained_cfg: dict, *, seed: int = 0,
                 variant_batch: int = 0, predictions: bool = False):
        self.module, self.plan, self.cfg, self.predictions = module, plan, pretrained_cfg, bool(predictions)
        self.variant_batch = int(variant_batch)
        self.variables = variables   # on the devices as the caller placed them (the driver replicates them)
        self.key = jax.random.key(seed)
        self.variants = plan.variants_per_group * len(plan.groups)
        self._step = jax.jit(self.step)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self._step(self.variables, batch["image"], batch["label"], batch["index"], self.key)

    def forward(self, variables: Any, x: jax.Array, index: jax.Array,
                key: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Normalised images -> clean logits (B, C) and, per group (sorted by n), variant logits (V, B, C)."""
        return self._forward(variables, x, index, key)[:2]

    def _forward(self, variables: Any, x: jax.Array, index: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
        """`forward`, and the keep factors (V, B, U) of every ablated site."""
        plan = self.plan
        logits, aux = self.module.apply(variables, x, capture=plan.captures)
        keeps = ablation_units.all_keeps(plan, aux, key, index)
        variant_logits = []
        for group in plan.groups:
            x0 = x if group.start_input is None else aux[group.start_input]

            def run_from(masks: dict[str, jax.Array], x0=x0, group=group) -> jax.Array:
                return self.module.apply(variables, x0, masks=masks, start=group.start,
                                         renormalize=plan.renormalize)[0]

            masks = ablation_units.group_masks(group, keeps)
            if self.variant_batch > 0:
                variant_logits.append(jax.lax.map(run_from, masks, batch_size=self.variant_batch))
            else:
                variant_logits.append(jax.vmap(run_from)(masks))
        return logits, variant_logits, keeps

    def step(self, variables: Any, images: jax.Array, labels: jax.Array, index: jax.Array,
             key: jax.Array) -> dict[str, jax.Array]:
        plan = self.plan
        clean, variant_logits, keeps = self._forward(variables, data.normalize(images, self.cfg), index, key)
        correct = jnp.stack([jnp.argmax(v, -1) == labels for v in variant_logits])   # (Nn, V, B)
        nn_, b = correct.shape[0], correct.shape[-1]
        grid = correct[:, :len(plan.ps) * (1 + plan.draws)].reshape(nn_, len(plan.ps), 1 + plan.draws, b)
        out = {"clean": jnp.argmax(clean, -1) == labels,
               "top": grid[:, :, 0].transpose(2, 0, 1),             # (B, Nn, P)
               "rand": grid[:, :, 1:].transpose(3, 0, 1, 2)}        # (B, Nn, P, D)
        if plan.whole_layer:
            out["whole"] = correct[:, -1].T                          # (B, Nn)
        if self.predictions:
            out["clean_pred"] = jnp.argmax(clean, -1).astype(jnp.int32)
            out["pred"] = jnp.stack([jnp.argmax(v, -1) for v in variant_logits]).astype(jnp.int32).transpose(2, 0, 1)
            out["drops"] = {site: (k < 0.5).transpose(1, 0, 2) for site, k in keeps.items()}
        return out
