"""timm's parameter names: one numpy key map per model family, `convert_state_dict(sd, module) -> {flax path:
array}`. The only code of the package that knows timm's keys; torch-free, so hub weights convert without it."""
from __future__ import annotations

from types import ModuleType

from vitsparse_jax.weights.timm_keys import convnext, resnet, swin, vgg, vit

KEY_MAPS: dict[str, ModuleType] = {"vit": vit, "swin": swin, "vgg": vgg, "resnet": resnet, "convnext": convnext}
