"""Converts timm weights into vitsparse_jax checkpoints; the only code that knows timm's parameter names.

    python -m checkpoints_convert --model vit_base_patch16_224.augreg_in21k_ft_in1k --out checkpoints/

Needs torch (and timm for live modules / timm's registry cfgs); loading the result needs neither.
"""
from checkpoints_convert.convert import (
                                         CFG_KEYS,
                                         CheckpointError,
                                         build_module,
                                         clean_cfg,
                                         convert,
                                         convert_state_dict,
                                         convert_timm_module,
                                         download_from_hub,
                                         hub_repo_id,
                                         load_state_dict_file,
                                         resolve_cfg,
                                         state_dict_to_numpy,
)

__all__ = ["CFG_KEYS", "CheckpointError", "build_module", "clean_cfg", "convert", "convert_state_dict",
           "convert_timm_module", "download_from_hub", "hub_repo_id", "load_state_dict_file", "resolve_cfg",
           "state_dict_to_numpy"]
