"""Pieces shared by every model family: ModelInfo, capture filtering, mask, start and stop checks."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
# Every matmul and conv runs at full float32 precision unless a module is told otherwise (timm parity).
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Static facts about a model; see docs/design.md."""

    name: str
    family: str
    num_classes: int
    img_size: int
    num_prefix_tokens: int
    patch_grid: tuple[int, int]
    stages: tuple[str, ...]
    mask_sites: tuple[str, ...]
    ablation_sites: tuple[str, ...]
    capture_names: tuple[str, ...]
    default_cfg: Mapping[str, Any]
    # kind of each prefix token, in token order ('cls' class, 'dist' distillation, 'reg' register); its
    # length is num_prefix_tokens. () for models without prefix tokens (SigLIP, *_gap_*, Swin, CNNs).
    prefix_kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prefix_kinds and len(self.prefix_kinds) != self.num_prefix_tokens:
            raise ValueError(f"{self.name}: prefix_kinds {self.prefix_kinds} do not match "
                             f"num_prefix_tokens={self.num_prefix_tokens}")


class CaptureName(str):
    """A capture name (an ordinary `str`: same text, hash and equality) that sorts in forward order.

    JAX flattens a dict with its keys sorted, so the `aux` dict that comes out of `jax.jit`, `vmap` or
    `eval_shape` would list 'blocks.0', 'blocks.1', 'blocks.10', 'blocks.11', 'blocks.2', ... Keys of this
    type compare by their position in the forward pass instead, so `aux` keeps forward order (embed,
    blocks.0, ..., blocks.11, norm) through every JAX transformation, and `sorted(aux)` is forward order.
    Against a plain `str` it compares as text. A pytree built from `aux`'s own keys (e.g. cotangents
    `{k: ... for k in aux}`) has aux's structure; one built from plain strings has text order.
    """

    __slots__ = ("rank",)

    def __new__(cls, name: str, rank: int) -> CaptureName:
        self = super().__new__(cls, name)
        self.rank = rank
        return self

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return CaptureName, (str(self), self.rank)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, CaptureName):
            return (self.rank, str(self)) < (other.rank, str(other))
        return str.__lt__(self, other)

    def __gt__(self, other: object) -> bool:
        if isinstance(other, CaptureName):
            return (self.rank, str(self)) > (other.rank, str(other))
        return str.__gt__(self, other)

    def __le__(self, other: object) -> bool:
        return self == other or self < other

    def __ge__(self, other: object) -> bool:
        return self == other or self > other


def select_captures(found: Mapping[str, Array], capture: tuple[str, ...],
                    valid_names: tuple[str, ...]) -> dict[str, Array]:
    """Keeps the tensors whose name matches one of the fnmatch patterns in `capture`, in forward order.

    `valid_names` is every name the model can capture, in forward order (also those not computed in a run
    that starts at a later stage); a pattern that matches none of them is a ValueError. The keys are
    `CaptureName`s, so the order survives `jax.jit` (see there).
    """
    if not capture:
        return {}
    if isinstance(capture, str):
        raise TypeError(f"capture must be a tuple of patterns, got the string {capture!r}")
    for pattern in capture:
        if not fnmatch.filter(valid_names, pattern):
            raise ValueError(f"capture pattern {pattern!r} matches no name of this model; "
                             f"valid names: {', '.join(valid_names)}")
    rank = {name: i for i, name in enumerate(valid_names)}
    kept = [k for k in found if any(fnmatch.fnmatchcase(k, p) for p in capture)]
    kept.sort(key=lambda k: rank.get(k, len(rank)))
    return {CaptureName(k, rank.get(k, len(rank))): found[k] for k in kept}


def check_masks(masks: Mapping[str, Array] | None, valid_sites: tuple[str, ...]) -> dict[str, Array]:
    """Returns `masks` as a dict; an unknown site name is a ValueError that lists the valid ones."""
    if not masks:
        return {}
    unknown = sorted(set(masks) - set(valid_sites))
    if unknown:
        raise ValueError(f"unknown mask site(s) {unknown}; valid sites: {', '.join(valid_sites)}")
    return dict(masks)


def check_start(start: str | None, stages: tuple[str, ...]) -> int:
    """Index of the stage to start from (0 when `start` is None)."""
    if start is None:
        return 0
    if start not in stages:
        raise ValueError(f"unknown start stage {start!r}; valid stages: {', '.join(stages)}")
    return stages.index(start)


def check_stop(stop: str | None, stages: tuple[str, ...], first: int) -> int:
    """Index of the last stage to run (the last stage when `stop` is None); `first` = index of `start`."""
    if stop is None:
        return len(stages) - 1
    if stop not in stages:
        raise ValueError(f"unknown stop stage {stop!r}; valid stages: {', '.join(stages)}")
    last = stages.index(stop)
    if last < first:
        raise ValueError(f"stop stage {stop!r} lies before start stage {stages[first]!r}; stages run in the "
                         f"order {', '.join(stages)}")
    return last


def check_masks_run(masks: Mapping[str, Array], stage_of: Callable[[str], str], stages: tuple[str, ...],
                    first: int, start: str | None, last: int | None = None, stop: str | None = None) -> None:
    """A mask must lie in a stage that runs: one before `start` or after `stop` (stage index `last`) is a
    caller error, never silently unused."""
    for site in masks:
        index = stages.index(stage_of(site))
        if index < first:
            raise ValueError(f"mask site {site!r} lies before start stage {start!r}: that stage does not run")
        if last is not None and index > last:
            raise ValueError(f"mask site {site!r} lies after stop stage {stop!r}: that stage does not run")


def apply_unit_mask(x: Array, mask: Array | None) -> Array:
    """Multiplies an activation map (B, H, W, C) by a keep mask broadcastable to it."""
    if mask is None:
        return x
    mask = jnp.asarray(mask, x.dtype)
    if mask.ndim != x.ndim:
        raise ValueError(f"mask of shape {mask.shape} must have {x.ndim} dims to broadcast to {x.shape}")
    return x * mask
