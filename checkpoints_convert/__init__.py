"""Converts local timm weights files and live timm modules into vitsparse_jax checkpoints.

    python -m checkpoints_convert --model resnet50.tv_in1k --from-file resnet50.pth --out checkpoints/
    python -m checkpoints_convert.make_cfg_table     # regenerate the shipped table of timm's pretrained cfgs

The per-family key maps live in the package (`vitsparse_jax/weights/timm_keys/`, numpy only), so experiments
convert hub weights without this step or torch; imports go one way, from here into `vitsparse_jax`. torch is
needed only to read .pth/.bin files and live timm modules, timm only for its registry.
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
