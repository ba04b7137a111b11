"""Flax definitions of timm's ViT (DeiT, DeiT III, DINOv2, CLIP, SigLIP, pooled ViTs), Swin, VGG, ResNet and ConvNeXt;
see docs/design.md for the interface."""
from __future__ import annotations

import functools
import importlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax.models.base import ModelInfo
from vitsparse_jax.models.registry import create_model, list_models, split_name


def model_info(module: nn.Module) -> ModelInfo:
    return module.info()


def dummy_input(module: nn.Module, batch: int = 1) -> jax.Array:
    size = model_info(module).img_size
    return jnp.zeros((batch, size, size, 3), jnp.float32)


def abstract_input(module: nn.Module, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The shape and dtype of `dummy_input`, for abstract evaluation (nothing allocated or compiled)."""
    size = model_info(module).img_size
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted_init(module: nn.Module):  # modules are frozen dataclasses: equal configs share one compilation
    return jax.jit(module.init)


def init_untrained(module: nn.Module, seed: int = 0) -> dict:
    """Variables drawn with the family's timm initialisation scheme, seeded."""
    return _jitted_init(module)(jax.random.PRNGKey(seed), dummy_input(module))


def variable_shapes(module: nn.Module) -> dict:
    """Shapes/dtypes of the module's variables, without allocating them (a fresh tree; one abstract
    evaluation per module configuration)."""
    return jax.tree.map(lambda leaf: leaf, _variable_shapes(module))


@functools.lru_cache(maxsize=32)
def _variable_shapes(module: nn.Module) -> dict:
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)   # abstract inputs: nothing is computed or compiled
    return jax.eval_shape(module.init, key, abstract_input(module))


def capture_shapes(module: nn.Module, captures: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes (batch 1) of the named intermediates of a forward pass, from one abstract evaluation per module
    configuration and capture list (no weights, no compute)."""
    return dict(_capture_shapes(module, tuple(captures)))


@functools.lru_cache(maxsize=32)
def _capture_shapes(module: nn.Module, captures: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    _, aux = jax.eval_shape(lambda v, x: module.apply(v, x, capture=captures), _variable_shapes(module),
                            abstract_input(module))
    return {k: tuple(v.shape) for k, v in aux.items()}


def fit_variables(module: nn.Module, flat: dict) -> dict:
    """Flat variables ('params/...' -> array) of converted weights made to fit `module` where timm would adapt
    them itself: a ViT position embedding of another image size is resampled to the module's grid (as timm
    does when a model is created at another size). Other families and fitting weights: returned as they are.
    Call before the strict key / shape check of a loader."""
    family = importlib.import_module(f"vitsparse_jax.models.{model_info(module).family}")
    fit = getattr(family, "fit_variables", None)
    return fit(module, flat) if fit is not None else dict(flat)


__all__ = ["ModelInfo", "create_model", "list_models", "split_name", "model_info", "init_untrained",
           "dummy_input", "abstract_input", "variable_shapes", "capture_shapes", "fit_variables"]
