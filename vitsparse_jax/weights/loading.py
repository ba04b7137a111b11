"""Model + weights by name: converted checkpoints, the shipped built-in ones, or untrained (timm init)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn

from vitsparse_jax import models
from vitsparse_jax.weights import checkpoint

ASSETS = Path(__file__).parents[1] / "assets" / "checkpoints"
UNTRAINED = "untrained"
BUILTIN = "builtin"
# Pretrained tags whose classifier differs from the architecture's default (timm's pretrained_cfg).
TAG_NUM_CLASSES = {"dino": 0, "augreg_in21k": 21843, "in21k": 21843}


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    variables: Any
    info: models.ModelInfo
    pretrained_cfg: dict          # input_size, crop_pct, interpolation, mean, std, num_classes
    arch: str
    tag: str | None
    weights: str                  # where the weights came from: a path, or 'untrained (seed N)'

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def trained(self) -> bool:
        return not self.weights.startswith(UNTRAINED)

    def describe(self) -> dict:
        return {"model": self.arch, "tag": self.tag, "weights": self.weights,
                "pretrained_cfg": self.pretrained_cfg, "family": self.info.family}


def _convert_hint(arch: str, tag: str | None, checkpoint_dir: str) -> str:
    name = f"{arch}.{tag}" if tag else arch
    return (f"Convert the timm weights once with\n  python -m checkpoints_convert --model {name} "
            f"--out {checkpoint_dir or 'checkpoints'}\n(needs `pip install -e .[convert]` and the Hugging Face "
            f"hub, or --from-file for a local .safetensors/.pth), then pass --config.checkpoint_dir, or use "
            f"--config.weights=untrained for timm's random initialisation.")


def find_checkpoint(arch: str, tag: str | None, checkpoint_dir: str) -> Path:
    """The converted checkpoint of arch[.tag] in checkpoint_dir (the only one, when no tag is given)."""
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"no converted weights for {arch}: checkpoint_dir {checkpoint_dir!r} is not a "
                                f"folder. " + _convert_hint(arch, tag, checkpoint_dir))
    pattern = f"{arch}.{tag}.safetensors" if tag else f"{arch}.*.safetensors"
    found = sorted(folder.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no converted weights matching {pattern} in {folder}. "
                                + _convert_hint(arch, tag, checkpoint_dir))
    if len(found) > 1:
        raise ValueError(f"several converted checkpoints for {arch} in {folder}: "
                         f"{', '.join(p.name for p in found)}; name one with --config.model={arch}.<tag>")
    return found[0]


def load_model(name: str, weights: str = "", checkpoint_dir: str = "", seed: int = 0,
               **overrides: Any) -> LoadedModel:
    """Builds `name` ('arch' or 'arch.tag') with weights from:

    - 'untrained': timm's initialisation scheme, seeded with `seed`;
    - 'builtin': the checkpoints shipped in vitsparse_jax/assets (the project's own small models);
    - a path to a converted .safetensors or .json;
    - '' (default): `<checkpoint_dir>/<arch>.<tag>.safetensors`.
    """
    arch, tag = models.split_name(name)
    if weights == UNTRAINED:
        if tag in TAG_NUM_CLASSES:
            overrides.setdefault("num_classes", TAG_NUM_CLASSES[tag])
        module = models.create_model(arch, **overrides)
        info = models.model_info(module)
        variables = models.init_untrained(module, seed)
        cfg = {**info.default_cfg, "num_classes": info.num_classes}
        return LoadedModel(module, variables, info, cfg, arch, tag, f"{UNTRAINED} (seed {seed})")
    if weights == BUILTIN:
        path = find_checkpoint(arch, tag, str(ASSETS))
    elif weights:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"weights file {path} does not exist. " + _convert_hint(arch, tag, checkpoint_dir))
    else:
        path = find_checkpoint(arch, tag, checkpoint_dir)
    meta_path = path.with_suffix(".json")
    if meta_path.exists():  # build the classifier the checkpoint has (e.g. none for DINO)
        num_classes = json.loads(meta_path.read_text()).get("pretrained_cfg", {}).get("num_classes")
        if num_classes is not None:
            overrides.setdefault("num_classes", int(num_classes))
    module = models.create_model(arch, **overrides)
    info = models.model_info(module)
    variables, meta = checkpoint.load(path, module)
    cfg = dict(info.default_cfg)
    cfg.update(meta.get("pretrained_cfg", {}))
    return LoadedModel(module, variables, info, cfg, arch, meta.get("tag", tag), str(path))
