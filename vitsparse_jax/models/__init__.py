"""Flax definitions of timm's ViT (DeiT, DeiT III, DINOv2, CLIP, SigLIP, pooled ViTs), Swin, VGG, ResNet and ConvNeXt;
see docs/design.md for the interface."""
from __future__ import annotations

import functools
import importlib

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


@functools.lru_cache(maxsize=None)
def _jitted_init(module: nn.Module):  # modules are frozen dataclasses: equal configs share one compilation
    return jax.jit(module.init)


def init_untrained(module: nn.Module, seed: int = 0) -> dict:
    """Variables drawn with the family's timm initialisation scheme, seeded."""
    return _jitted_init(module)(jax.random.PRNGKey(seed), dummy_input(module))


def variable_shapes(module: nn.Module) -> dict:
    """Shapes/dtypes of the module's variables, without allocating them."""
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy_input(module))


def fit_variables(module: nn.Module, flat: dict) -> dict:
    """Flat variables ('params/...' -> array) of converted weights made to fit `module` where timm would adapt
    them itself: a ViT position embedding of another image size is resampled to the module's grid (as timm
    does when a model is created at another size). Other families and fitting weights: returned as they are.
    Call before the strict key / shape check of a loader."""
    family = importlib.import_module(f"vitsparse_jax.models.{model_info(module).family}")
    fit = getattr(family, "fit_variables", None)
    return fit(module, flat) if fit is not None else dict(flat)


__all__ = ["ModelInfo", "create_model", "list_models", "split_name", "model_info", "init_untrained",
           "dummy_input", "variable_shapes", "fit_variables"]
