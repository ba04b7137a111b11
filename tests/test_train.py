"""Training: the loss goes down, checkpoints are written and restored, a resumed run equals an uninterrupted one."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from vitsparse_jax import models
from vitsparse_jax.experiments.train import run as train
from vitsparse_jax.runtime import resumable
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

ROOT = Path(__file__).resolve().parents[1]


def train_config(preset: str = "vgg", **train_overrides):
    spec = importlib.util.spec_from_file_location("train_config", ROOT / "configs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.progress = False
    config.data.batch_size = 32
    config.data.num_images = 64     # 64 train images (2 steps per epoch at batch 32), 64 held-out
    config.train.update({"steps": 6, "warmup_steps": 1, "batch_size": 32, "eval_every": 0, "checkpoint_every": 2},
                        **train_overrides)
    return config


def test_decay_mask_is_kernels_only():
    params = {"blocks_0": {"attn": {"qkv": {"kernel": 1, "bias": 2}}, "norm1": {"scale": 3, "bias": 4}},
              "pos_embed": 5, "cls_token": 6}
    mask = train.decay_mask(params)
    assert mask == {"blocks_0": {"attn": {"qkv": {"kernel": True, "bias": False}},
                                 "norm1": {"scale": False, "bias": False}}, "pos_embed": False, "cls_token": False}


def test_random_shift_translates_within_bounds():
    images = jnp.arange(2 * 6 * 6 * 3, dtype=jnp.int32).reshape(2, 6, 6, 3)
    shifted = train.random_shift(images, jax.random.key(0), 2)
    assert shifted.shape == images.shape
    for img, out in zip(np.asarray(images), np.asarray(shifted)):
        padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
        assert any(np.array_equal(out, padded[y:y + 6, x:x + 6]) for y in range(5) for x in range(5))
    assert train.random_shift(images, jax.random.key(0), 0) is images


@pytest.mark.parametrize("arch", ["vgg_pico", "resnet_pico"])   # resnet: BatchNorm batch statistics
def test_train_steps_decrease_the_loss(arch):
    config = train_config(lr=3e-3, shift=0)
    module = models.create_model(arch, train=True)
    variables = models.init_untrained(module, seed=0)
    tx = train.make_optimizer(config.train)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.asarray(np.arange(16) % 10, dtype=jnp.int32), "valid": jnp.ones(16, bool)}
    step = jax.jit(train.make_train_step(module, tx, module.info().default_cfg, config.train, seed=0))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 6
    assert losses[-1] < losses[0], losses
    before, after = jax.tree.leaves(variables.get("batch_stats", {})), jax.tree.leaves(state.batch_stats)
    assert len(before) == len(after) and not any(np.array_equal(a, b) for a, b in zip(before, after))


def _weights(path: str) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(path)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = train_config()
    full = train.run(config, Workdir(tmp_path / "full"))
    assert full["start_step"] == 0 and [e["step"] for e in full["series"]] == [0, 2, 4, 6]

    workdir = Workdir(tmp_path / "resumed")
    with pytest.raises(resumable.Interrupted):
        train.run(config, workdir, stop_after_steps=3)   # crosses an epoch boundary (2 steps per epoch)
    assert [p.name for p in train.saved_states(workdir)] == ["train_state_0000003.msgpack"]
    resumed = train.run(config, workdir)
    assert resumed["start_step"] == 3
    assert resumed["accuracy"] == full["accuracy"]
    a, b = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # every point of the series loads as a converted checkpoint
    series = train.checkpoint_series(workdir.root)
    assert [e["step"] for e in series] == [0, 2, 3, 4, 6]
    loaded = loading.load_model("vgg_pico", weights=series[-1]["path"])
    assert loaded.trained and loaded.pretrained_cfg["num_classes"] == 10


def test_changed_config_refuses_to_resume(tmp_path):
    config = train_config(steps=2)
    workdir = Workdir(tmp_path)
    train.run(config, workdir)
    with pytest.raises(ValueError, match="another config"):
        train.run(train_config(steps=2, lr=0.5), workdir)


def test_main_trains_end_to_end(tmp_path, monkeypatch, capsys):
    """The command line of the README, on the default ViT, for two steps (in this process: main.cli)."""
    from vitsparse_jax.main import cli

    monkeypatch.chdir(ROOT)
    status = cli(["vitsparse_jax.main", "--config=configs/train.py",
                  "--config.train.steps=2", "--config.train.batch_size=16", "--config.data.batch_size=80",
                  "--config.train.eval_every=0", f"--config.workdir={tmp_path}", "--config.progress=False"])
    assert status == 0, capsys.readouterr().err[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "vit_pico_patch4_32" and results["steps"] == 2 and results["eval_images"] == 400
    assert (tmp_path / "vit_pico_patch4_32.digits.safetensors").exists()
    loaded = loading.load_model("vit_pico_patch4_32", weights=results["checkpoint"])
    assert loaded.tag == "digits"
