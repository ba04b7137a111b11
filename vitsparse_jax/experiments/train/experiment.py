"""Training the built-in small models (`configs/train.py`): its own loop (`run.py`), found by the driver."""
from __future__ import annotations

from typing import Any

from vitsparse_jax import models
from vitsparse_jax.experiments import dry_run
from vitsparse_jax.experiments.contract import Standalone
from vitsparse_jax.runtime.workdir import Workdir


class Train(Standalone):
    name = "train"
    result_files = ("results.json", "metrics.csv")

    def describe(self, config: Any) -> list[str]:
        tc = config.train
        overrides = {"num_classes": tc.num_classes} if tc.num_classes else {}
        info = models.model_info(models.create_model(config.model, **overrides))
        train_cfg = config.data.copy_and_resolve_references()
        train_cfg.split = tc.split
        _, lines = dry_run.data_lines(train_cfg, int(tc.batch_size))
        n_eval, eval_lines = dry_run.data_lines(config.data, int(config.data.batch_size))
        lines = [line.replace("data:", "training data:", 1) for line in lines]
        lines += [line.replace("data:", "evaluation data:", 1) for line in eval_lines]
        lines.append(f"model: {config.model} ({info.family}, {info.num_classes} classes); start from: "
                     f"{dry_run.weights_source(config.model, config.weights, config.checkpoint_dir, config.seed)}")
        evals = tc.steps // tc.eval_every + 1 if tc.eval_every else 1
        lines.append(f"total: {tc.steps:,} steps x batch {tc.batch_size} = {tc.steps * tc.batch_size:,} forward + "
                     f"backward passes; about {evals} evaluations x {dry_run.images(n_eval)} images")
        return lines

    def run(self, config: Any, workdir: Workdir) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from vitsparse_jax.experiments.train import run

        inputs: list[dict[str, Any]] = []
        return run.run(config, workdir, inputs=inputs), inputs


EXPERIMENT = Train()
