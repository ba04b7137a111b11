"""One package per experiment; `REGISTRY` maps `config.experiment` to its run function."""
from __future__ import annotations

from typing import Any, Callable

from vitsparse_jax.experiments.ablation import run as ablation
from vitsparse_jax.experiments.receptive_field import run as receptive_field
from vitsparse_jax.experiments.sparsity import run as sparsity
from vitsparse_jax.experiments.train import run as train
from vitsparse_jax.runtime.workdir import Workdir

RunFn = Callable[[Any, Workdir], dict]

REGISTRY: dict[str, RunFn] = {
    "ablate": ablation.run,
    "sparsity": sparsity.run,
    "receptive_field": receptive_field.run,
    "train": train.run,
}
