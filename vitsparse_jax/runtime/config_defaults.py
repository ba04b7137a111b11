"""Fields shared by every experiment config (configs/*.py build on `base_config`).

The comment after each field is its help text: `--show_config` prints it next to the value
(`vitsparse_jax.runtime.config_help`), so keep one comment per field.
"""
from __future__ import annotations

import ml_collections

from vitsparse_jax.runtime.paths import expand_path

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
    c.experiment = experiment  # which experiment runs (experiments.REGISTRY); set by the config file
    c.model = BUILTIN_VIT      # timm name, optionally with '.tag'
    c.weights = "auto"         # 'auto': built-in checkpoint, else <checkpoint_dir>/<arch>.<tag>.safetensors, else
                               # timm's weights from the Hugging Face hub (timm/<arch>.<tag>, converted once);
                               # or only one source: 'builtin' | 'checkpoint_dir' | 'hub' | 'untrained' | a path
    c.checkpoint_dir = "checkpoints"  # folder of converted weights <arch>.<tag>.safetensors (python -m checkpoints_convert)
    c.img_size = 0             # input size in pixels; 0 = the checkpoint's (its pretrained_cfg). Else the model is
                               # built at that size (a ViT's position embedding resampled once, as timm does; a
                               # whole number of patches) and the eval crop is that size
    c.num_classes = -1         # classifier size; -1 = the checkpoint's; 0 = none (output = pooled features); another
                               # size needs head_weights, or weights='untrained' (random classifier: smoke tests)
    c.head_weights = ""        # a linear classifier for a headless tower (DINOv2, SigLIP, CLIP, MAE), e.g. a linear
                               # probe: .npz or .safetensors with 'weight' (num_classes, dim) and 'bias' (num_classes,)
    c.seed = 0                 # seeds random draws and the untrained (timm) initialisation
    c.workdir = f"runs/{experiment}"  # output folder: results, figures, report.html, report.md, resume state; a
                                      # relative path is under the current directory (the last line of a run
                                      # prints the full path)
    c.resume = True            # continue an interrupted run found in workdir
    c.progress = True          # progress bar
    c.figures = ""             # figure files: 'png' or 'png,pdf' (adds vector PDFs, for print: slower to write);
                               # '' = $VITSPARSE_JAX_FIGURE_FORMATS, else 'png'
    c.figure_dpi = 0           # PNG resolution in dots per inch (300 for print: slower); 0 = $VITSPARSE_JAX_FIGURE_DPI,
                               # else 150
    c.xla_cache = "auto"       # jax's persistent compilation cache (a second run reads its programs from disk): a
                               # folder; 'auto' = $JAX_COMPILATION_CACHE_DIR, else ~/.cache/vitsparse_jax/xla; '' = off
    c.data = data_config()
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""   # 'host:port' of process 0; '' = single process (or auto on TPU pods)
    c.distributed.num_processes = 1  # number of processes (hosts) in the job, with coordinator
    c.distributed.process_id = 0     # this process's index in [0, num_processes), with coordinator
    c.distributed.auto = False       # jax.distributed.initialize() with no arguments (TPU VMs, SLURM)
    return c


# Fields that name files or folders (dotted paths; those a config lacks are skipped): `~` and environment
# variables are expanded in them (`expand_config_paths`). receptive_field.checkpoints is comma-separated.
PATH_FIELDS = ("weights", "checkpoint_dir", "head_weights", "workdir", "data.data_dir", "data.manual_dir",
               "data.folder", "data.cache_dir", "receptive_field.checkpoints", "train.export_dir")
LIST_PATH_FIELDS = ("receptive_field.checkpoints",)


def expand_config_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Expands `~` and environment variables in every path field of `config`, in place; returns it."""
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        section = config
        for parent in parents:
            section = section.get(parent) if hasattr(section, "get") else None
        if section is None or not hasattr(section, "get") or name not in section:
            continue
        value = section[name]
        if dotted in LIST_PATH_FIELDS and isinstance(value, str):
            expanded = ",".join(expand_path(item.strip()) for item in value.split(",")) if value else value
        else:
            expanded = expand_path(value)
        if expanded != value:
            section[name] = expanded
    return config
