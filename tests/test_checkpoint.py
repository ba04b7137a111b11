"""Converted weights: timm -> convert -> save -> load round trips, strict checks, no torch when loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import checkpoints_convert  # noqa: E402
from checkpoints_convert import convert, convert_state_dict, convert_timm_module, load_state_dict_file  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.weights import checkpoint
from vitsparse_jax.weights.checkpoint import CheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def timm_logits(tm, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tm(torch.from_numpy(x_nchw)).numpy()


def flax_logits(module, variables, x_nchw: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))[0])


@pytest.fixture(scope="module")
def tiny():
    """vit_tiny_patch16_224 with random timm weights (fused attention off) and a batch of inputs."""
    torch.manual_seed(0)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for blk in tm.blocks:
        blk.attn.fused_attn = False
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return tm, x, timm_logits(tm, x)


@pytest.fixture(scope="module")
def pico_ckpt(tmp_path_factory):
    """An untrained vit_pico_patch4_32 checkpoint (module, variables, path)."""
    module = models.create_model("vit_pico_patch4_32", depth=2)
    variables = models.init_untrained(module, seed=0)
    cfg = dict(models.model_info(module).default_cfg)
    path = checkpoint.save(tmp_path_factory.mktemp("pico"), "vit_pico_patch4_32", "untrained", variables, cfg,
                           "untrained (seed 0)")
    return module, variables, path


def test_live_module_round_trip(tiny, tmp_path):
    tm, x, ref = tiny
    variables, cfg = convert_timm_module(tm)
    assert cfg["num_classes"] == 1000 and cfg["tag"] == "augreg_in21k_ft_in1k"
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["mean"] == [0.5] * 3
    path = checkpoint.save(tmp_path, "vit_tiny_patch16_224", cfg["tag"], variables, cfg, "live timm module")
    assert path == tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.with_suffix(".json").name, path.name]   # no temp files
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model"] == "vit_tiny_patch16_224" and meta["tag"] == cfg["tag"] and meta["format_version"] == 1
    assert meta["source"] == "live timm module" and {"jax", "flax", "torch", "timm"} <= set(meta["versions"])
    assert set(meta["pretrained_cfg"]) >= {"input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"}

    module = models.create_model("vit_tiny_patch16_224")
    for p in (path, path.with_suffix(".json")):   # either file names the checkpoint
        loaded, meta2 = checkpoint.load(p, module)
        assert meta2 == meta
        assert rel_err(flax_logits(module, loaded, x), ref) <= REL_TOL
    direct = flax_logits(module, variables, x)
    np.testing.assert_array_equal(flax_logits(module, loaded, x), direct)


def test_pth_file_via_cli(tiny, tmp_path):
    tm, x, ref = tiny
    pth = tmp_path / "weights.pth"
    torch.save({"model": tm.state_dict(), "epoch": 3}, pth)   # a training checkpoint: unwrapped by 'model'
    out = tmp_path / "out"
    from checkpoints_convert.__main__ import main as convert_main   # `python -m checkpoints_convert`, in-process

    assert convert_main(["--model", "vit_tiny_patch16_224.mine", "--from-file", str(pth), "--out", str(out)]) == 0
    path = out / "vit_tiny_patch16_224.mine.safetensors"
    module = models.create_model("vit_tiny_patch16_224")
    variables, meta = checkpoint.load(path, module)
    assert meta["tag"] == "mine" and meta["source"].startswith("file:")
    assert rel_err(flax_logits(module, variables, x), ref) <= REL_TOL


def test_safetensors_file_headless(tmp_path):
    """A DINO-like headless checkpoint in a local .safetensors; the tag's timm cfg says num_classes=0."""
    import safetensors.torch

    torch.manual_seed(1)
    tm = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    for blk in tm.blocks:
        blk.attn.fused_attn = False
    src = tmp_path / "dino.safetensors"
    safetensors.torch.save_file(tm.state_dict(), str(src))
    path = convert("vit_small_patch16_224.dino", tmp_path / "out", from_file=src)
    meta = checkpoint.read_meta(path)
    assert meta["pretrained_cfg"]["num_classes"] == 0 and meta["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    module = models.create_model("vit_small_patch16_224", num_classes=0)
    variables, _ = checkpoint.load(path, module)
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert rel_err(flax_logits(module, variables, x), timm_logits(tm, x)) <= REL_TOL


def test_load_state_dict_file_unwraps(tmp_path):
    sd = {"a.weight": torch.ones(2, 3, dtype=torch.bfloat16), "bn.num_batches_tracked": torch.tensor(5)}
    torch.save({"state_dict": sd}, tmp_path / "w.bin")
    out = load_state_dict_file(tmp_path / "w.bin")
    assert list(out) == ["a.weight"] and out["a.weight"].dtype == np.float32
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=".safetensors"):
        load_state_dict_file(tmp_path / "w.txt")


# --- strict checks -------------------------------------------------------------------------------------------

def pico_state_dict():
    torch.manual_seed(0)
    tm = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                                          num_heads=4, mlp_ratio=2.0, num_classes=10)
    return {k: v.numpy() for k, v in tm.state_dict().items()}


def test_convert_state_dict_errors_name_key_and_model():
    module = models.create_model("vit_pico_patch4_32", depth=2)
    sd = pico_state_dict()
    assert set(convert_state_dict(sd, module)) == set(checkpoint.flatten(models.variable_shapes(module)))

    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(CheckpointError, match=r"vit_pico_patch4_32.*blocks\.1\.attn\.qkv\.weight.*missing"):
        convert_state_dict(missing, module)
    with pytest.raises(CheckpointError, match=r"vit_pico_patch4_32.*'blocks\.0\.attn\.extra'"):
        convert_state_dict({**sd, "blocks.0.attn.extra": np.zeros(3, np.float32)}, module)
    wrong = {**sd, "blocks.0.mlp.fc1.bias": np.zeros(7, np.float32)}
    with pytest.raises(CheckpointError, match=r"vit_pico_patch4_32.*'blocks\.0\.mlp\.fc1\.bias'.*params/blocks_0/mlp"):
        convert_state_dict(wrong, module)
    wrong = {**sd, "pos_embed": np.zeros((1, 64, 64), np.float32)}   # no grid to resample from
    with pytest.raises(CheckpointError, match=r"vit_pico_patch4_32.*'pos_embed'"):
        convert_state_dict(wrong, module)


def test_load_errors_name_parameter_and_model(pico_ckpt, tmp_path):
    module, variables, path = pico_ckpt
    flat = checkpoint.flatten(variables)
    cfg = checkpoint.read_meta(path)["pretrained_cfg"]
    loaded, _ = checkpoint.load(path, module)
    for k, v in checkpoint.flatten(loaded).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat[k]))

    def saved(tensors, tag):
        return checkpoint.save(tmp_path, "vit_pico_patch4_32", tag, tensors, cfg, "test")

    key = "params/blocks_1/mlp/fc2/kernel"
    with pytest.raises(CheckpointError, match=f"vit_pico_patch4_32.*{key}.*missing"):
        checkpoint.load(saved({k: v for k, v in flat.items() if k != key}, "missing"), module)
    with pytest.raises(CheckpointError, match="vit_pico_patch4_32.*unexpected parameter 'params/extra'"):
        checkpoint.load(saved({**flat, "params/extra": np.zeros(2, np.float32)}, "unexpected"), module)
    with pytest.raises(CheckpointError, match=f"vit_pico_patch4_32.*{key}.*shape"):
        checkpoint.load(saved({**flat, key: np.zeros((3, 3), np.float32)}, "shape"), module)
    with pytest.raises(CheckpointError, match="wrong checkpoint.*vit_pico_patch4_32.*vit_tiny_patch16_224"):
        checkpoint.load(path, models.create_model("vit_tiny_patch16_224"))
    with pytest.raises(CheckpointError, match="num_classes"):
        checkpoint.load(path, models.create_model("vit_pico_patch4_32", depth=2, num_classes=0))
    with pytest.raises(CheckpointError, match=r"\.json is missing"):
        checkpoint.load(tmp_path / "nothing.safetensors", module)


def test_loading_needs_no_torch(pico_ckpt, tmp_path):
    """Loading runs with torch and timm made unimportable; vitsparse_jax.weights.checkpoint never imports them."""
    module, variables, path = pico_ckpt
    expected = np.asarray(module.apply(variables, jnp.ones((1, 32, 32, 3)))[0])
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None   # any `import torch` now raises ImportError
        sys.modules["timm"] = None
        import jax.numpy as jnp, numpy as np
        from vitsparse_jax import models
        from vitsparse_jax.weights import checkpoint
        module = models.create_model("vit_pico_patch4_32", depth=2)
        variables, meta = checkpoint.load({str(path)!r}, module)
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(module.apply(variables, jnp.ones((1, 32, 32, 3)))[0]))
        assert sys.modules["torch"] is None and sys.modules["timm"] is None
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_hub_names():
    repo = checkpoints_convert.hub_repo_id("vit_base_patch16_224", "augreg_in21k")
    assert repo == "timm/vit_base_patch16_224.augreg_in21k"
    cfg = checkpoints_convert.resolve_cfg("vit_base_patch16_224", "augreg_in21k", {
        "architecture": "vit_base_patch16_224", "num_classes": 21843,
        "pretrained_cfg": {"tag": "augreg_in21k", "input_size": [3, 224, 224], "crop_pct": 0.9,
                           "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 21843,
                           "first_conv": "patch_embed.proj"}})
    assert cfg == {"tag": "augreg_in21k", "input_size": [3, 224, 224], "crop_pct": 0.9, "interpolation": "bicubic",
                   "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 21843}
    module = checkpoints_convert.build_module("vit_base_patch16_224", cfg)
    assert models.model_info(module).num_classes == 21843


def test_converted_weights_of_another_size_load_with_a_resampled_position_embedding(tmp_path):
    """DINOv2's weights are converted at 518 px; run at 224 the loader resamples pos_embed as timm would and
    the eval crop follows the module's size."""
    from vitsparse_jax.weights import loading

    arch, kw = "vit_small_patch14_dinov2", dict(depth=1, embed_dim=48, num_heads=2)
    native = models.create_model(arch, **kw)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in checkpoint.flatten(models.variable_shapes(native)).items()}
    info = models.model_info(native)
    cfg = dict(info.default_cfg, num_classes=info.num_classes)
    path = checkpoint.save(tmp_path, arch, "test", checkpoint.unflatten(flat), cfg, "test: random weights")
    loaded = loading.load_model(arch, weights=str(path), img_size=224, **kw)
    small = models.create_model(arch, img_size=224, **kw)
    want = models.fit_variables(small, flat)["params/pos_embed"]
    assert want.shape != flat["params/pos_embed"].shape
    np.testing.assert_array_equal(np.asarray(loaded.variables["params"]["pos_embed"]), want)
    assert loaded.info.img_size == 224 and loaded.pretrained_cfg["input_size"][-1] == 224


# --- the converter's user errors (in-process; issue 23 point 3) -------------------------------------------------

def pico_timm_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10).state_dict()


def converter_error(capsys, path: Path, out: Path, *parts: str) -> None:
    from checkpoints_convert.__main__ import main as convert_cli

    status = convert_cli(["--model", "vit_pico_patch4_32.mine", "--from-file", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for part in (str(path), *parts):
        assert part in err, (part, err)
    assert not out.exists() or not any(out.iterdir())


def test_converter_refuses_a_pickled_checkpoint(tmp_path, capsys):
    import argparse

    path = tmp_path / "train.pth"
    torch.save({"model": pico_timm_state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    converter_error(capsys, path, tmp_path / "out", "argparse.Namespace", "weights_only=True", "If you trust")


def test_converter_refuses_integer_parameters(tmp_path, capsys):
    import safetensors.torch

    sd = pico_timm_state_dict()
    sd["blocks.2.attn.proj.weight"] = sd["blocks.2.attn.proj.weight"].to(torch.int32)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, str(path))
    converter_error(capsys, path, tmp_path / "out", "'blocks.2.attn.proj.weight'", "int32", "original float weights")


def test_converter_names_the_extra_for_a_pth_without_torch(tmp_path, capsys, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save(pico_timm_state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)
    converter_error(capsys, path, tmp_path / "out", "needs torch", 'pip install "vitsparse_jax[convert]"')
