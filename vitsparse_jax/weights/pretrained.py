"""timm's pretrained_cfg of each `arch.tag`, without timm: the shipped table and the order of precedence.

A tag's cfg (input size, crop_pct, crop_mode, interpolation, mean, std, num_classes) comes from, in order:
the `config.json` of its Hugging Face repository when there is one, the table shipped in
`pretrained_cfgs.json` (timm's registry, written by `python -m checkpoints_convert.make_cfg_table`), and
last the architecture's default cfg in `vitsparse_jax.models`. Trained and untrained twins of a tag get
the same cfg, so a trained-vs-untrained comparison changes the weights only.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

from vitsparse_jax import models

# The pretrained_cfg fields kept in converted checkpoints and results (timm's names): the preprocessing and
# classifier size, then what identifies the weights (timm's classifier module, licence, Hugging Face repository).
CFG_KEYS = ("tag", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes",
            "classifier", "license", "hf_hub_id")
# Keys a hub config.json lacks (timm saves the cfg without its sources) and the table's row of the tag gives.
SOURCE_KEYS = ("classifier", "license", "hf_hub_id")
TABLE_PATH = Path(__file__).with_name("pretrained_cfgs.json")
HUB_ORG = "timm"


def clean_cfg(cfg: Mapping[str, Any] | Any, **updates: Any) -> dict[str, Any]:
    """The CFG_KEYS of a timm pretrained_cfg (dict or timm PretrainedCfg), tuples as lists, plus `updates`."""
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    out = {k: cfg[k] for k in CFG_KEYS if cfg.get(k) is not None}
    out.update({k: v for k, v in updates.items() if v is not None})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, Any]:
    if not TABLE_PATH.exists():
        return {"models": {}}
    return json.loads(TABLE_PATH.read_text())


def table() -> dict[str, Any]:
    """The shipped table: {'timm_version', 'models': {arch: {'default_tag', 'tags': {tag: row}}}}."""
    return _table()


def known_tags(arch: str) -> list[str]:
    """Every tag timm knows for `arch` (its default first); [] when the table does not list the arch."""
    return list(table()["models"].get(arch, {}).get("tags", {}))


def in_table(arch: str) -> bool:
    return arch in table()["models"]


def arch_default_cfg(arch: str) -> dict[str, Any]:
    """The cfg that `vitsparse_jax.models` registers with the arch (its default tag's)."""
    return clean_cfg(models.model_info(models.create_model(arch)).default_cfg)


def default_tag(arch: str) -> str | None:
    entry = table()["models"].get(arch)
    if entry:
        return entry["default_tag"]
    return arch_default_cfg(arch).get("tag")


def is_timm_arch(arch: str) -> bool:
    """False for the project's own models (vit_pico_patch4_32, vgg_pico, ...), which have no hub weights."""
    return in_table(arch) or default_tag(arch) not in (None, "builtin")


def tags_hint(arch: str) -> str:
    tags = known_tags(arch)
    if not tags:
        return f"timm lists no pretrained tags for {arch}"
    return f"the tags timm knows for {arch}: " + ", ".join(f"{t} (default)" if i == 0 else t
                                                           for i, t in enumerate(tags))


def check_tag(arch: str, tag: str) -> None:
    """ValueError listing timm's tags when the table lists the arch but not the tag."""
    if in_table(arch) and tag not in known_tags(arch):
        raise ValueError(f"unknown tag {arch}.{tag}: timm has no pretrained weights tagged {tag!r}; "
                         f"{tags_hint(arch)}")


def table_cfg(arch: str, tag: str | None) -> dict[str, Any] | None:
    """The table's cfg of arch.tag (default tag when None), with 'tag'; None when the table lacks it."""
    tag = tag or default_tag(arch)
    row = table()["models"].get(arch, {}).get("tags", {}).get(tag)
    return None if row is None else clean_cfg(row, tag=tag)


def hub_location(arch: str, tag: str) -> tuple[str, str | None]:
    """(repo id, file name or None for timm's default files) of the tag's Hugging Face weights."""
    row = table()["models"].get(arch, {}).get("tags", {}).get(tag, {})
    return row.get("hf_hub_id") or f"{HUB_ORG}/{arch}.{tag}", row.get("hf_hub_filename")


def has_hub_weights(arch: str, tag: str) -> bool:
    """False only when the table lists the tag without a Hugging Face repository."""
    row = table()["models"].get(arch, {}).get("tags", {}).get(tag)
    return row is None or bool(row.get("hf_hub_id"))


def from_hub_config(hub_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The cfg in a timm `config.json` ({'architecture', 'num_classes', 'pretrained_cfg': {...}}), or None."""
    if not hub_config or not isinstance(hub_config.get("pretrained_cfg"), Mapping):
        return None
    return clean_cfg(hub_config["pretrained_cfg"], num_classes=hub_config.get("num_classes"))


def resolve_cfg(arch: str, tag: str | None, hub_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """pretrained_cfg of arch.tag from a hub config.json, else the shipped table, else the arch's default; the
    SOURCE_KEYS a config.json lacks (its Hugging Face repository) come from the table's row of the same tag."""
    cfg = from_hub_config(hub_config) or table_cfg(arch, tag) or arch_default_cfg(arch)
    tag = tag or cfg.get("tag") or default_tag(arch)
    if tag:
        cfg["tag"] = tag
        row = table_cfg(arch, tag) or {}
        cfg.update({key: row[key] for key in SOURCE_KEYS if key in row and key not in cfg})
    return cfg


def module_overrides(arch: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """create_model overrides for the classifier and image size that a cfg has and the arch's default lacks."""
    default = models.model_info(models.create_model(arch))
    out: dict[str, Any] = {}
    if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != default.num_classes:
        out["num_classes"] = int(cfg["num_classes"])
    if cfg.get("input_size") and int(cfg["input_size"][-1]) != default.img_size:
        out["img_size"] = int(cfg["input_size"][-1])
    return out
