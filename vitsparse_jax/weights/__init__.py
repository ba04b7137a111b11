"""Weights: the converted-weights format (`checkpoint`), timm's pretrained cfgs (`pretrained`), timm state
dicts without torch (`safetensors_io`, `timm_state`), the Hugging Face hub (`hub`) and resolving a model
name to its weights (`loading`)."""
from vitsparse_jax.weights.loading import LoadedModel, WeightsSource, load_model, resolve_weights

__all__ = ["LoadedModel", "WeightsSource", "load_model", "resolve_weights"]
