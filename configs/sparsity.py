"""Attention sparsity (ViT, DeiT, Swin) or channel sparsity (VGG, ResNet): paper 1, sections 3-4.

  python -m vitsparse_jax.main --config=configs/sparsity.py                  # vit_pico_patch4_32 on digits
  python -m vitsparse_jax.main --config=configs/sparsity.py:vgg              # vgg_pico: channel l1 statistics
  python -m vitsparse_jax.main --config=configs/sparsity.py:paper \\
      --config.model=vit_base_patch16_224.augreg_in21k_ft_in1k                 # ImageNet val, timm's weights
  python -m vitsparse_jax.main --config=configs/sparsity.py:registers        # DINOv2 with/without registers

Every value can be overridden with --config.x=y. See docs/sparsity.md.
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import BUILTIN_CNN, base_config

PRESETS = ("default", "vgg", "paper", "paper_quirk", "registers")
# docs/science.md#high-norm-tokens: DINOv2 small without and with registers, and two supervised ViTs for contrast.
REGISTER_MODELS = ("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
                   "vit_base_patch16_224.augreg_in21k_ft_in1k", "deit_base_patch16_224.fb_in1k")


def sparsity_section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.kind = "auto"              # 'auto' (attention for ViT/DeiT/Swin, channels for VGG/ResNet) | 'attention' | 'cnn'
    s.head = 0                   # Fig. 1: head of the last block drawn
    s.s1_block = -1              # Fig. S1: block whose heads are all drawn (negative: from the end)
    s.example_index = 0          # Fig. 1 / S1: index of the image in the dataset
    s.explore_images = 4         # report.html's attention explorer: this many images from example_index on (0: none)
    s.top_fraction = 0.05        # Fig. 3b: top k = round(top_fraction * patches) columns of the last block
    s.top_by = "head_mean"       # Fig. 3b ranks mu (mean over heads) | 'head_index': mu_h of `top_head`
    s.top_head = 1               # ... the published code ranked head index 1 (docs/science.md#sparsity-statistics)
    s.nu_min = 0.0               # histograms of nu = -log10(mu) (CNN: -log10 of a channel's l1 share): lower end
    s.nu_max = 8.0               # upper end of the nu histograms (values outside are counted, not binned)
    s.nu_bins = 800              # bins of the nu histograms between nu_min and nu_max (0.01 wide: narrow peaks show)
    s.top_fractions = (0.05, 0.1, 0.2, 0.3)   # share of the total held by the top p units (CNN channels,
                                               # attention patch columns), per layer / block
    s.token_norms = True         # ViTs: token norms, high-norm tokens vs the top-5% mu columns (docs/science.md)
    s.norm_factor = 2.0          # a high-norm patch token: norm > norm_factor x the image's median patch norm
    s.distance_renormalize = False   # attention distance per block and head (distances.csv): False = as the published
                                     # code (prefix keys add no distance); True = each row divided by its patch-key mass
    s.per_image = False          # also write per_image.npz: each image's last-block mu, top columns, token norms
    s.models = ""                # comma-separated models measured on the same images ('' = config.model);
                                 # several give per-model folders under models/ and comparison figures
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
        # Paper 1: ViT-B on the ImageNet validation set (50 000 images), timm's weights.
        config.model = "vit_base_patch16_224.augreg_in21k_ft_in1k"
        config.weights = "auto"       # checkpoint_dir, else timm's weights from the Hugging Face hub
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.batch_size = 64
        config.workdir = "runs/sparsity_paper"
        if preset == "paper_quirk":   # Fig. 3b as the published code drew it
            config.sparsity.top_by = "head_index"
            config.workdir = "runs/sparsity_paper_quirk"
    elif preset == "registers":
        # docs/science.md#high-norm-tokens: sparse columns vs high-norm tokens, with and without registers, on
        # the same images (ImageNet validation by default; any --config.data.* works).
        config.sparsity.models = ",".join(REGISTER_MODELS)
        config.weights = "auto"
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.batch_size = 64
        config.workdir = "runs/sparsity_registers"
    return config
