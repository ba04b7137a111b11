"""Ablation experiment (paper 1, section 5): A0, A_t, A_r and psi over a (p, n) grid.

  python -m vitsparse_jax.main --config=configs/ablate.py          # built-in vit_pico on the digits, < 1 min
  python -m vitsparse_jax.main --config=configs/ablate.py:paper    # the paper's 17 models on ImageNet val
  python -m vitsparse_jax.main --config=configs/ablate.py \
      --config.model=swin_tiny_patch4_window7_224 --config.ablation.p=0.05,0.1 --config.ablation.n=1,2

Switches (docs/science.md#ablation-units) are in `config.ablation`; docs/ablation.md explains each.
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.config_defaults import base_config

# The paper's models with the pinned pretrained tags of docs/science.md#models (Table 1: Transformers, Table 2: CNNs).
PAPER_MODELS = (
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224.fb_in1k",
    "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_small_patch4_window7_224.ms_in1k",
    "swin_base_patch4_window7_224.ms_in22k_ft_in1k",
    "vgg11.tv_in1k",
    "vgg13.tv_in1k",
    "vgg16.tv_in1k",
    "vgg19.tv_in1k",
    "resnet34.tv_in1k",
    "resnet50.tv_in1k",
    "resnet101.tv_in1k",
    "resnet152.tv_in1k",
)
# Figure 4a shows a few models at n = 2 (one per family); 4b shows ViT-B at n = 1..3.
PAPER_FIGURE_MODELS = ("vit_base_patch16_224", "deit_base_distilled_patch16_224", "swin_base_patch4_window7_224",
                       "vgg16", "resnet50")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config("ablate")
    config.data.batch_size = 32

    ab = config.ablation = ml_collections.ConfigDict()
    ab.models = ""                  # comma-separated model names (each may carry '.tag'); '' = config.model
    ab.p = (0.05, 0.1, 0.2, 0.3)    # fractions of the candidate units dropped (--config.ablation.p=0.05,0.1)
    ab.n = (1, 2, 3)                # the last n ablation layers (--config.ablation.n=1,2)
    ab.draws = 3                    # random draws per image; A_r = their mean
    ab.rank_by = "last_layer"       # ViT/DeiT: 'last_layer' (published code) | 'each_layer'
    ab.renormalize = False          # renormalise attention rows after dropping columns
    ab.cnn_unit = "channel"         # CNN unit: 'channel' | 'spatial'
    ab.whole_layer_reference = True  # also drop every candidate of the last n layers (Fig. 4b dotted lines)
    ab.bootstrap = 1000             # bootstrap resamples over images for the intervals
    ab.confidence = 0.95            # interval level; psi is flagged 'n.s.' when A0 - A_r's interval reaches 0
    ab.variant_batch = 0            # variants evaluated at once (0 = all, vmapped); lower it to save memory
    ab.figure_models = ""           # models in Figure 4a ('' = all; an arch = every listed tag of it, arch.tag = one)
    ab.figure_b_model = ""          # model of Figure 4b ('' = the first; an arch = a panel per listed tag of it)
    ab.stop_after_batches = 0       # stop as if interrupted after this many batches (tests of resuming)
    ab.explore_images = 4           # report.html explorer: the first k images evaluated, what each variant dropped
                                    # and its prediction (0 = no explorer)

    if arg == "paper":
        ab.models = ",".join(PAPER_MODELS)
        ab.figure_models = ",".join(PAPER_FIGURE_MODELS)
        ab.figure_b_model = "vit_base_patch16_224"
        config.weights = "auto"                     # checkpoint_dir, else timm's weights from the Hugging Face hub
        config.data.source = "tfds"
        config.data.name = "imagenet2012"
        config.data.split = "validation"
        config.data.batch_size = 256
        config.data.cache_dir = "cache/imagenet2012_validation"   # preprocessed crops, shared by the models
        config.workdir = "runs/ablate_paper"
    elif arg:
        raise ValueError(f"unknown preset {arg!r} for configs/ablate.py; the only preset is 'paper'")
    return config
