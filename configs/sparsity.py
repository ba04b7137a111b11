"""Attention sparsity (ViT, DeiT, Swin) or channel sparsity (VGG, ResNet): paper 1, sections 3-4.

  python -m vitsparse_jax.main --config=configs/sparsity.py                  # vit_pico_patch4_32 on digits
  python -m vitsparse_jax.main --config=configs/sparsity.py:vgg              # vgg_pico: channel l1 statistics
  python -m vitsparse_jax.main --config=configs/sparsity.py:paper \\
      --config.model=vit_base_patch16_224.augreg_in21k_ft_in1k                 # ImageNet val, converted weights

Every value can be overridden with --config.x=y. See docs/sparsity.md.
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import BUILTIN_CNN, base_config

PRESETS = ("default", "vgg", "paper", "paper_quirk")


def sparsity_section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.kind = "auto"              # 'auto' (attention for ViT/DeiT/Swin, channels for VGG/ResNet) | 'attention' | 'cnn'
    s.head = 0                   # Fig. 1: head of the last block drawn
    s.s1_block = -1              # Fig. S1: block whose heads are all drawn (negative: from the end)
    s.example_index = 0          # Fig. 1 / S1: index of the image in the dataset
    s.top_fraction = 0.05        # Fig. 3b: top k = round(top_fraction * patches) columns of the last block
    s.top_by = "head_mean"       # Fig. 3b ranks mu (mean over heads) | 'head_index': mu_h of `top_head`
    s.top_head = 1               # ... the published code ranked head index 1 (SPEC sec. 4)
    s.nu_min = 0.0               # histograms of nu = -log10(mu) (CNN: -log10 of a channel's l1 share)
    s.nu_max = 8.0
    s.nu_bins = 160
    s.top_fractions = (0.05, 0.1, 0.2, 0.3)   # share of the total held by the top p units (CNN channels,
                                               # attention patch columns), per layer / block
    return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/sparsity.py; one of {', '.join(PRESETS)}")
    config = base_config("sparsity")
    config.sparsity = sparsity_section()
    config.data.batch_size = 32
    if preset == "vgg":
        config.model = BUILTIN_CNN
        config.workdir = "runs/sparsity_vgg"
    elif preset.startswith("paper"):
        # Paper 1: ViT-B on the ImageNet validation set (50 000 images), converted timm weights.
        config.model = "vit_base_patch16_224.augreg_in21k_ft_in1k"
        config.weights = ""
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.batch_size = 64
        config.workdir = "runs/sparsity_paper"
        if preset == "paper_quirk":   # Fig. 3b as the published code drew it
            config.sparsity.top_by = "head_index"
            config.workdir = "runs/sparsity_paper_quirk"
    return config
