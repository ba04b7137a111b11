"""Packages of the wheel (the rest of the metadata is in pyproject.toml).

The top-level `configs/` folder (the experiment configs, kept there for users and tests: `import configs.ablate`)
is installed as `vitsparse_jax.configs`, one copy for both, so `--config=ablate` works after `pip install .`
from any directory (vitsparse_jax/runtime/config_files.py). pyproject.toml alone cannot map one folder under
another package while finding the others.
"""
from setuptools import find_namespace_packages, setup

setup(
    # namespace packages too: the data folders (assets/, report_html/static/) travel as packages, as before
    packages=[*find_namespace_packages(include=["vitsparse_jax", "vitsparse_jax.*", "checkpoints_convert",
                                                "checkpoints_convert.*"], exclude=["*__pycache__*"]),
              "vitsparse_jax.configs"],
    package_dir={"vitsparse_jax.configs": "configs"},
)
