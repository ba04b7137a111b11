"""Fields shared by every experiment config (configs/*.py build on `base_config`)."""
from __future__ import annotations

import ml_collections

# The project's own small models, trained on the built-in digits data (configs/train.py); the default
# of every experiment so that the first command works offline.
BUILTIN_VIT = "vit_pico_patch4_32"
BUILTIN_CNN = "vgg_pico"


def data_config(**overrides) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.source = "digits"        # 'digits' (built-in) | 'tfds' | 'folder' (ImageNet-style) | 'images' (unlabelled)
    d.name = ""                # TFDS name, e.g. 'imagenet2012', 'imagenet_v2', 'imagenette'
    d.split = "test"           # 'test' is the held-out split of the digits; 'validation' for imagenet2012
    d.data_dir = ""            # TFDS data_dir (local or gs://)
    d.manual_dir = ""          # TFDS manual download dir (imagenet2012 tars)
    d.folder = ""              # for source='folder' / 'images'
    d.num_images = 0           # first N images (0 = all)
    d.per_class = 0            # N images per class (0 = all)
    d.every_kth_class = 1      # keep classes 0, k, 2k, ...
    d.batch_size = 64          # global batch size (over all devices and hosts)
    d.cache_dir = ""           # on-disk cache of preprocessed uint8 crops ('' = off)
    d.num_workers = 8          # decode threads per host
    d.label_space = "auto"     # 'auto' (wnid classes -> timm's ImageNet-1k index) | 'dataset' | 'imagenet'
    d.update(overrides)
    return d


def base_config(experiment: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.model = BUILTIN_VIT      # timm name, optionally with '.tag'
    c.weights = "builtin"      # 'builtin' | 'untrained' | path to a converted .safetensors | '' = checkpoint_dir
    c.checkpoint_dir = "checkpoints"
    c.seed = 0
    c.workdir = f"runs/{experiment}"
    c.resume = True            # continue an interrupted run found in workdir
    c.progress = True          # progress bar
    c.data = data_config()
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""   # 'host:port' of process 0; '' = single process (or auto on TPU pods)
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.auto = False       # jax.distributed.initialize() with no arguments (TPU VMs, SLURM)
    return c
