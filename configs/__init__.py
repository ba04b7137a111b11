"""The experiment configs (`get_config(arg)`; presets are `arg` values), one file per experiment.

This folder is the only copy: the wheel installs it as the package `vitsparse_jax.configs` (setup.py), and
`--config=ablate`, `--config=configs/ablate.py` find it from any directory (vitsparse_jax/runtime/config_files.py).
"""
