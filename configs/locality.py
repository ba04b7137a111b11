"""Attention distance against gradient receptive fields, per block (docs/science.md#attention-distance).

  python -m vitsparse_jax.main --config=configs/locality.py          # built-in vit_pico + vgg_pico, trained + untrained
  python -m vitsparse_jax.main --config=configs/locality.py:paper    # ViT-B 21k, DeiT, DINO, DINOv2, Swin-T, ResNet-50
  python -m vitsparse_jax.main --config=configs/locality.py \\
      --config.locality.models=vit_small_patch16_224.dino --config.data.source=folder --config.data.folder=DIR
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import BUILTIN_CNN, BUILTIN_VIT, base_config

PRESETS = ("default", "paper")
# ViT-B (21k), DeiT-B, DINO ViT-B/16 and ViT-S/16, DINOv2 ViT-S/14, Swin-T and ResNet-50 (docs/science.md#models).
PAPER_MODELS = ("vit_base_patch16_224.augreg_in21k", "deit_base_patch16_224.fb_in1k", "vit_base_patch16_224.dino",
                "vit_small_patch16_224.dino", "vit_small_patch14_dinov2.lvd142m",
                "swin_tiny_patch4_window7_224.ms_in1k", "resnet50.tv_in1k")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/locality.py; one of {', '.join(PRESETS)}")
    config = base_config("locality")
    config.data.num_images = 64        # the digits' held-out split, first 64 images
    config.data.batch_size = 32

    loc = config.locality = ml_collections.ConfigDict()
    loc.models = f"{BUILTIN_VIT},{BUILTIN_CNN}"   # models overlaid, comma-separated ('' = config.model); CNNs:
                                                  # receptive fields only
    loc.variants = "trained,untrained"  # trained = config.weights; untrained = timm's init seeded by config.seed
    loc.blocks = ""                    # comma-separated fnmatch patterns of blocks ('blocks.*', CNN stages such as
                                       # 'layer4.*'); '' = every attention block (CNNs: every stage output)
    loc.fraction = 1.0 / 7.0           # side of the central region = f * grid side (queries and receptive fields)
    loc.renormalize = False            # False: as the published code (prefix keys add no distance, rows as they
                                       # are); True: each row divided by its patch-key mass
    loc.chunk_size = 8                 # layers whose gradients are swept back together (vmapped); 0 = all

    if preset == "paper":
        config.model = PAPER_MODELS[0]
        config.weights = "auto"        # checkpoint_dir, else timm's weights from the Hugging Face hub
        config.img_size = 224          # every model at 224 px (DINOv2's 518 px position embedding resampled)
        loc.models = ",".join(PAPER_MODELS)
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.num_images = 1000
        config.data.batch_size = 16
        loc.chunk_size = 4
        config.data.cache_dir = "cache/imagenet2012_validation"   # preprocessed crops, shared by the models
        config.workdir = "runs/locality_paper"
    return config
