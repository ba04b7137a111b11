"""One package per experiment, found by name and imported only when a run asks for it.

`REGISTRY` maps `config.experiment` to the module whose `EXPERIMENT` implements `contract.Experiment` (a
measurement run by `driver`) or `contract.Standalone` (its own loop). Adding an experiment = its package, its
config file and one entry here.
"""
from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, str] = {
    "ablate": "vitsparse_jax.experiments.ablation.experiment",
    "sparsity": "vitsparse_jax.experiments.sparsity.experiment",
    "receptive_field": "vitsparse_jax.experiments.receptive_field.experiment",
    "locality": "vitsparse_jax.experiments.locality.experiment",
    "train": "vitsparse_jax.experiments.train.experiment",
}


def get(name: str) -> Any:
    """The experiment registered as `name` (its module is imported now)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).EXPERIMENT
