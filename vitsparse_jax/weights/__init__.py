"""Weights: the converted-weights format (`checkpoint`), timm's pretrained cfgs (`pretrained`), timm state
dicts without torch (`safetensors_io`, `timm_state`), the Hugging Face hub (`hub`) and resolving a model
name to its weights (`loading`), and the names with weights to load (`catalog.list_models`).

The modules import each other by module path (`import vitsparse_jax.weights.hub as hub`), never through this
face, so that it can re-export them without an import loop (tests/test_layout.py)."""
from vitsparse_jax.weights.catalog import list_models
from vitsparse_jax.weights.loading import LoadedModel, WeightsSource, load_model, resolve_weights

__all__ = ["LoadedModel", "WeightsSource", "list_models", "load_model", "resolve_weights"]
