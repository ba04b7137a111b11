"""Model names in results, reports and folders: the name with its tag as loaded (`LoadedModel.name`, e.g.
`vit_small_patch16_224.augreg_in1k`), so that two tags of one arch are two rows, two legend entries and two
folders. Also: listed names that load the same weights (refused before any work), the name of a trained and
untrained pair. (A pass kept under a name from before names carried their tag is moved by the driver:
`Measurement.renamed`.)
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)


def check_distinct(items: Iterable[Any], checkpoint_dir: str) -> None:
    """Two listed names whose weights are the same (e.g. `arch` and `arch.tag` when the tag is the one `arch`
    resolves to) would be measured twice under one name: refused, naming both. Items whose weights cannot be
    resolved here are left to the driver's weights check."""
    from vitsparse_jax.weights import loading

    seen: dict[tuple, str] = {}
    for item in items:
        try:
            src = loading.resolve_weights(item.name, item.weights, checkpoint_dir)
        except Exception:  # noqa: BLE001  (a missing or bad name is reported by the driver's checks, with its fix)
            continue
        where = str(src.path) if src.path is not None else (src.repo_id or "")
        key = (src.kind, src.arch, where, src.tag if src.path is None else None,
               tuple(sorted((k, str(v)) for k, v in dict(item.options).items())))
        first = seen.setdefault(key, item.name)
        if first != item.name:
            raise ValueError(f"{first} and {item.name} are the same model (the same weights: {src}); list it once")


def pair_names(models: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """listed name -> the name that stands for its trained and untrained variants (the colour of both in a
    figure, the model in an explorer): the trained variant's name with its tag, else the first variant's.
    `models`: dicts with 'listed', 'name' and 'trained' (the experiments' model records)."""
    out: dict[str, str] = {}
    for trained_only in (True, False):
        for m in models:
            if m.get("trained") or not trained_only:
                out.setdefault(m.get("listed", m["name"]), m["name"])
    return out


STEP_SUFFIX = re.compile(r"_step\d+$")   # train.py names its series' checkpoints <arch>.<tag>_step0000500


def series_name(name: str) -> str:
    """The training run a series checkpoint belongs to: its name without train.py's `_step<N>` suffix."""
    return STEP_SUFFIX.sub("", name)
