"""Weights: the converted-weights format (`checkpoint`) and resolving a model name to weights (`loading`)."""
from vitsparse_jax.weights.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
