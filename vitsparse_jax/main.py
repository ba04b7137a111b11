"""Entry point: python -m vitsparse_jax.main --config=configs/ablate.py [--config.x=y ...]."""
from __future__ import annotations

import logging

from absl import app
from ml_collections import config_flags

from vitsparse_jax.runtime.workdir import Workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)


def run(config) -> dict:
    from vitsparse_jax.experiments import REGISTRY

    if config.experiment not in REGISTRY:
        raise ValueError(f"unknown experiment {config.experiment!r}; one of {', '.join(REGISTRY)}")
    from vitsparse_jax.runtime import parallel

    parallel.initialize_distributed(**config.distributed)  # before anything touches a device
    import jax

    workdir = Workdir(config.workdir)
    if jax.process_index() == 0:
        workdir.write_metadata(config)
    return REGISTRY[config.experiment](config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/ablate.py")
    logging.getLogger("absl").setLevel(logging.INFO)
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
