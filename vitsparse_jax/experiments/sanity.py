"""Sanity checks that every experiment reports, in the terminal (absl warnings) and in report.md.

- where the weights came from (`provenance`): the Hugging Face hub (and its tag), a converted file (and
  what it was converted from), the built-in checkpoints, untrained (timm's initialisation), or unknown;
- untrained or unknown weights where trained ones are expected;
- clean accuracy A0 at or below chance: the model's classes do not match the labels, or the weights are
  random;
- a label space that differs from the model's classes.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

# hub: timm's weights from the Hugging Face hub (downloaded, or converted with checkpoints_convert);
# converted: converted from a local timm file; builtin: vitsparse_jax/assets/checkpoints; trained_here: a
# checkpoint written by configs/train.py; untrained: timm's initialisation; file: a timm file converted in
# memory (no record of what it holds); unknown: nothing recorded.
HUB, CONVERTED, BUILTIN, TRAINED_HERE = "hub", "converted", "builtin", "trained_here"
UNTRAINED, FILE, UNKNOWN = "untrained", "file", "unknown"
KINDS = (HUB, CONVERTED, BUILTIN, TRAINED_HERE, UNTRAINED, FILE, UNKNOWN)
_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"


def _sidecar_source(weights: str) -> str:
    """The 'source' a converted checkpoint's JSON records (e.g. 'hf-hub:timm/<arch>.<tag>', 'file:/path')."""
    if not weights:
        return ""
    meta = Path(weights).with_suffix(".json")
    try:
        return str(json.loads(meta.read_text()).get("source") or "") if meta.is_file() else ""
    except (OSError, ValueError, AttributeError):
        return ""


def provenance(model: Mapping[str, Any]) -> dict[str, Any]:
    """Where a model's weights came from, from `LoadedModel.describe()` (its 'source' and 'weights'), and why
    it runs at another size than its arch's default when it does ('size_note').

    Returns {'kind': one of KINDS, 'trained': bool | None (None = unknown), 'detail': text}.
    """
    prov = _origin(model)
    if model.get("size_note"):
        prov["detail"] += f"; {model['size_note']}"
    return prov


def _origin(model: Mapping[str, Any]) -> dict[str, Any]:
    weights = str(model.get("weights") or "")
    source = str(model.get("source") or "")
    recorded = "" if source.startswith("hf-hub:") else _sidecar_source(weights)
    if source == UNTRAINED or weights.startswith(UNTRAINED):
        seed = weights[len(UNTRAINED):].strip(" ()")           # 'untrained (seed 0)' -> 'seed 0'
        return {"kind": UNTRAINED, "trained": False,
                "detail": "timm's random initialisation" + (f", {seed}" if seed else "")}
    if source.startswith("hf-hub:") or source == HUB:
        return {"kind": HUB, "trained": True, "detail": source if source != HUB else f"{weights} (from the hub)"}
    is_builtin = source == BUILTIN or (weights and Path(weights).resolve().parent == _ASSETS)
    if is_builtin:
        return {"kind": BUILTIN, "trained": True, "detail": f"built-in checkpoint {Path(weights).name}"}
    if recorded.startswith("hf-hub:"):
        return {"kind": HUB, "trained": True, "detail": f"{weights}, converted from {recorded}"}
    if recorded.startswith("trained by"):
        return {"kind": TRAINED_HERE, "trained": True, "detail": f"{weights} ({recorded[:160]})"}
    if recorded:
        return {"kind": CONVERTED, "trained": True,
                "detail": f"{weights}, converted from {recorded.removeprefix('file:')[:200]}"}
    if source == "file":
        return {"kind": FILE, "trained": None, "detail": f"{weights} (a timm file; no record of its training)"}
    return {"kind": UNKNOWN, "trained": None, "detail": weights or "(no record)"}


def weights_warnings(name: str, model: Mapping[str, Any], expect_trained: bool = True) -> list[str]:
    """Untrained weights where trained ones are expected; weights whose origin is not recorded."""
    prov = provenance(model)
    if prov["trained"] is False and expect_trained:
        return [f"{name}: the weights are untrained ({prov['detail']}): accuracies are at chance and the "
                "statistics are those of a random network. Use trained weights (--config.weights=auto or a "
                "converted checkpoint) unless that is what you want."]
    if prov["trained"] is None:
        return [f"{name}: where the weights come from is not recorded ({prov['detail']}); check that they are "
                "the trained weights you mean (a converted checkpoint records its source)."]
    return []


def chance_warning(name: str, accuracy: float, images: int, num_classes: int) -> list[str]:
    """A0 at or below chance (1 / classes), or within 3 standard errors of it."""
    if not num_classes or not images:
        return []
    chance = 1.0 / num_classes
    margin = 3.0 * math.sqrt(chance * (1.0 - chance) / images)
    if accuracy > chance + margin:
        return []
    return [f"{name}: A0 = {100 * accuracy:.2f}% on {images} images is not above chance (1/{num_classes} = "
            f"{100 * chance:.2f}%, +3 s.e. = {100 * (chance + margin):.2f}%): the model's classes probably do not "
            "match the labels (check data.label_space and the model's tag), or the weights are random."]


def label_space_warning(name: str, data_classes: int, model_classes: int) -> list[str]:
    """The data's label space and the model's classes differ (labels are compared with outputs by index)."""
    if not data_classes or not model_classes or data_classes == model_classes:
        return []
    return [f"{name}: the data's label space has {data_classes} classes but the model has {model_classes}: "
            "labels are compared with the model's outputs by index, so class k of the data must be output k "
            "of the model (data.label_space='imagenet' maps ImageNet wnid folders to timm's 1000 classes)."]


def emit(warnings: Iterable[str]) -> list[str]:
    """Logs each warning (absl WARNING) and returns them."""
    out = list(warnings)
    for text in out:
        log.warning("%s", text)
    return out


def markdown(warnings: Iterable[str]) -> list[str]:
    """report.md lines: a 'Warnings' section, or nothing."""
    out = list(warnings)
    return ["## Warnings", "", *(f"- **{text}**" for text in out), ""] if out else []
