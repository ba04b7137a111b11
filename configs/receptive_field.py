"""Gradient receptive fields of every layer and their locality (paper 2; docs/science.md#receptive-fields).

  python -m vitsparse_jax.main --config=configs/receptive_field.py          # built-in vit_pico, trained + untrained
  python -m vitsparse_jax.main --config=configs/receptive_field.py:paper    # paper 2's five models on ImageNet
  python -m vitsparse_jax.main --config=configs/receptive_field.py \\
      --config.model=vit_base_patch16_224.augreg_in21k                  # timm's weights from the hub
  # locality over training: the checkpoint series of a training run (run configs/train.py first), or
  # --config.receptive_field.checkpoints= a training workdir, its series.json, a glob or comma-separated paths
  python -m vitsparse_jax.main --config=configs/receptive_field.py:training
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import base_config

# Paper 2's models (docs/science.md#models): ViT-B 21k, DINO ViT-S/16 and ViT-B/16, ResNet50, VGG16.
PAPER_MODELS = ("vit_base_patch16_224.augreg_in21k", "vit_small_patch16_224.dino", "vit_base_patch16_224.dino",
                "resnet50.tv_in1k", "vgg16.tv_in1k")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("receptive_field")
    config.data.num_images = 64        # the digits' held-out split, first 64 images
    config.data.batch_size = 32

    rf = config.receptive_field = ml_collections.ConfigDict()
    rf.fraction = 1.0 / 7.0            # side of the central part = f * grid side (14x14 -> 2x2), >= 1 position
    rf.layers = ""                     # comma-separated fnmatch patterns of layer names ('' = every block /
                                       # stage output + the four ViT sub-stages); 'logits' = the model output
    rf.models = ""                     # comma-separated model names ('' = config.model)
    rf.variants = "trained,untrained"  # trained = config.weights; untrained = timm's init seeded by config.seed
    rf.chunk_size = 8                  # layers whose gradients are swept back together (vmapped); 0 = all
    rf.checkpoints = ""                # locality over training: a training workdir, its series.json, a glob or paths
    rf.max_columns = 12                # maps per row in the receptive-field figure (further layers wrap onto new rows)
    rf.map_scale = "per_map"           # receptive-field figure: 'per_map' (each map / its max) | 'shared' (one scale)

    if arg == "paper":
        config.model = PAPER_MODELS[0]
        config.weights = "auto"        # checkpoint_dir, else timm's weights from the Hugging Face hub
        rf.models = ",".join(PAPER_MODELS)
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.num_images = 1000
        config.data.batch_size = 16    # with chunk_size 4: <= 4 GiB of activations (ViT-B 4.0, VGG16 2.9 GiB)
        rf.chunk_size = 4
        config.data.cache_dir = "cache/imagenet2012_validation"   # preprocessed crops, shared by the models
        config.workdir = "runs/receptive_field_paper"
    elif arg == "training":
        rf.checkpoints = "runs/train_vit"   # workdir of `configs/train.py` (vit_pico_patch4_32): its series.json
        config.workdir = "runs/receptive_field_training"
    elif arg:
        raise ValueError(f"unknown preset {arg!r} for configs/receptive_field.py; one of: paper, training")
    return config
