"""Trains a model of the project with optax (AdamW, warmup + cosine decay), data parallel over devices.

  python -m vitsparse_jax.main --config=configs/train.py              # vit_pico_patch4_32 on digits
  python -m vitsparse_jax.main --config=configs/train.py:vgg          # vgg_pico on digits
  python -m vitsparse_jax.main --config=configs/train.py:resnet       # resnet_pico on digits

Presets (`arg`) pick the model and its recipe; every value can still be overridden with --config.x=y.
The same command trains on a TFDS dataset with e.g. --config.data.source=tfds --config.data.name=imagenette
--config.data.split=validation --config.train.split=train --config.train.num_classes=10.
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import BUILTIN_CNN, BUILTIN_VIT, base_config

# preset -> (model, overrides of config.train). The digits recipes train the shipped checkpoints.
PRESETS: dict[str, tuple[str, dict]] = {
    "vit": (BUILTIN_VIT, {"steps": 500, "batch_size": 32, "warmup_steps": 20, "lr": 2e-3, "weight_decay": 0.05,
                          "embed_lr_mult": 30.0, "shift": 1}),
    "vgg": (BUILTIN_CNN, {"steps": 300, "warmup_steps": 30, "lr": 2e-3, "weight_decay": 5e-4}),
    "resnet": ("resnet_pico", {"steps": 300, "warmup_steps": 30, "lr": 2e-3, "weight_decay": 5e-4}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "vit"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/train.py; one of {', '.join(PRESETS)}")
    model, recipe = PRESETS[preset]

    config = base_config("train")
    config.model = model
    config.weights = "untrained"   # the starting point: timm's init (seeded), or a converted checkpoint to fine-tune
    config.workdir = f"runs/train_{preset}"
    config.data.split = "test"     # held-out split for the periodic evaluation

    t = config.train = ml_collections.ConfigDict()
    t.split = "train"              # training split of config.data's source
    t.num_classes = 0              # classifier size; 0 = the architecture's default
    t.steps = 1000                 # optimiser steps
    t.batch_size = 128             # global batch size (over all devices and hosts)
    t.lr = 1e-3                    # peak learning rate
    t.warmup_steps = 100           # linear warmup from 0, then cosine decay to lr * end_lr_factor
    t.end_lr_factor = 0.01         # final learning rate as a fraction of lr
    t.weight_decay = 0.05          # AdamW, decoupled; on kernels only (not on biases, norms, tokens, pos_embed)
    t.b1 = 0.9                     # AdamW beta1
    t.b2 = 0.999                   # AdamW beta2
    t.grad_clip = 1.0              # global-norm clipping (0 = off)
    t.embed_lr_mult = 1.0          # lr multiplier for pos_embed / cls_token (ViT; see train.make_optimizer)
    t.label_smoothing = 0.0        # cross-entropy label smoothing (0 = off)
    t.shift = 3                    # augmentation: random translation by up to this many pixels (0 = off)
    t.eval_every = 100             # steps between evaluations on config.data.split (0 = only at the end)
    t.checkpoint_every = 100       # steps between saves of the train state + an exported checkpoint
    t.tag = "digits"               # pretrained tag of the exported checkpoints: <arch>.<tag>.safetensors
    t.export_dir = ""              # where the final checkpoint goes ('' = the workdir)
    t.update(recipe)
    return config
