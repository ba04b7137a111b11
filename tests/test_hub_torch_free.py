"""The whole path from a Hugging Face hub snapshot to results runs with torch and timm unimportable.

A fake hub cache (tests/test_hub_snapshot.py: a random timm ViT in float32, a random ResNet in bfloat16, each
with its config.json) is the only source of weights; a subprocess that cannot import torch, torchvision or
timm runs `python -m vitsparse_jax.main` on the timm names with HF_HUB_OFFLINE=1 and nothing else: the
sparsity experiment, the ablation and trained-vs-untrained receptive fields, as a user without torch would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")   # to make the fake hub (random timm models); the run itself never imports it
pytest.importorskip("timm")

from tests.test_hub_snapshot import RESNET_BF16, REVISION, VIT, hub_env, make_fake_hub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm")

SCRIPT = """
import importlib.machinery, sys

class Hide(importlib.machinery.PathFinder):
    # sys.path's finder, blind to torch / torchvision / timm: for this process they are not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
    import torch
    raise AssertionError("torch is importable")
except ModuleNotFoundError:
    pass

from absl import app
from vitsparse_jax import main

# 1. the command line, as a user types it: python -m vitsparse_jax.main --config=... --config.model=<arch>.<tag>
sys.argv = ["vitsparse_jax.main", "--config=configs/sparsity.py", "--config.model={vit}",
        "--config.workdir={work}/sparsity", "--config.data.num_images=2", "--config.data.batch_size=2",
        "--config.progress=False"]
try:
    app.run(main.main)
except SystemExit as e:
    if e.code not in (0, None):
        raise

# 2. the other experiments from their config files (the same main.run), the ViT's converted file reused
sys.path.insert(0, ".")
from configs import ablate, receptive_field

config = ablate.get_config()
config.model, config.workdir, config.progress = "{resnet}", "{work}/ablate", False
config.data.num_images, config.data.batch_size = 2, 2
config.ablation.update(p=(0.25,), n=(1,), draws=1, bootstrap=20)
main.run(config)

config = receptive_field.get_config()       # variants: trained and untrained (the tag's cfg)
config.model, config.workdir, config.progress = "{vit}", "{work}/rf", False
config.data.num_images, config.data.batch_size = 2, 2
config.receptive_field.layers = "blocks.0"
main.run(config)

leaked = [m for m in sys.modules if m.split(".")[0] in {blocked!r}]
assert not leaked, leaked
print("RUN-OK")
"""


@pytest.mark.slow
def test_experiments_run_from_a_hub_snapshot_without_torch_or_timm(tmp_path):
    make_fake_hub(tmp_path)
    work = tmp_path / "runs"
    code = textwrap.dedent(SCRIPT.format(blocked=BLOCKED, vit=VIT, resnet=RESNET_BF16, work=work))
    env = {**os.environ, **hub_env(tmp_path, offline=True), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("VITSPARSE_JAX_CACHE", None)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"   # one CPU device: batches of 2
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "RUN-OK" in proc.stdout, proc.stderr[-4000:]
    # each model converted once: the receptive-field run loads the ViT converted by the sparsity run
    assert proc.stderr.count("converting timm/") == 2, proc.stderr[-4000:]

    converted = tmp_path / "hf" / "vitsparse_jax" / "converted"
    files = sorted(converted.rglob("*.safetensors"))
    assert sorted(p.name for p in files) == sorted([f"{VIT}.safetensors", f"{RESNET_BF16}.safetensors"])
    assert all(REVISION in str(p) for p in files)

    results = {name: json.loads((work / name / "results.json").read_text()) for name in ("sparsity", "ablate", "rf")}
    source = f"hf-hub:timm/{VIT}@{REVISION}"
    assert results["sparsity"]["model"]["source"] == source and results["sparsity"]["images"] == 2
    assert results["ablate"]["models"][0]["source"] == f"hf-hub:timm/{RESNET_BF16}@{REVISION}"
    rf = {m["trained"]: m for m in results["rf"]["models"]}
    assert rf[True]["source"] == source and rf[False]["source"] == "untrained"
    assert rf[True]["pretrained_cfg"] == rf[False]["pretrained_cfg"]     # the twin's preprocessing is the same
