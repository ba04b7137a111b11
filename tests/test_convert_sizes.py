"""Weights saved at another size than the arch's default, and num_classes=0 with a weights path (issue 23,
points 1 and 2), against timm created at those sizes from the same file.

A DeiT fine-tuned at 160 px and a DINOv2 saved at 224 px (timm's default is 518) keep their own position-
embedding grid when converted (`python -m checkpoints_convert --from-file`, `checkpoints_convert.convert`) or
loaded as timm files, record that size as `input_size`, and load exactly at it; at another size the embedding
is resampled once, from the file's grid, as timm's own loader does. The archs are built small (depth 2, width
48: `small_archs`), timm's models with the same overrides, their weights moved off timm's init
(tests/timm_perturb.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import safetensors.torch  # noqa: E402

from checkpoints_convert import convert  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import main, models  # noqa: E402
from vitsparse_jax.weights import checkpoint, loading  # noqa: E402

DEIT, DINOV2 = "deit_small_patch16_224", "vit_small_patch14_dinov2"
SMALL = dict(depth=2, embed_dim=48, num_heads=2)
REL_TOL = 1e-5


@pytest.fixture
def small_archs(monkeypatch):
    """`models.create_model` builds DeiT and DINOv2 at depth 2, width 48 (the loader, the converter and the
    planned module all build through it)."""
    create = models.create_model

    def small(name, **overrides):
        arch, _ = models.split_name(name)
        return create(name, **({**SMALL, **overrides} if arch in (DEIT, DINOV2) else overrides))

    monkeypatch.setattr(models, "create_model", small)


def timm_file(folder: Path, arch: str, img_size: int, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A timm model created (and fine-tuned, as it were) at img_size, saved as timm saves it."""
    torch.manual_seed(seed)
    tm = perturb(timm.create_model(arch, pretrained=False, img_size=img_size, **SMALL), seed)
    path = folder / f"{arch}_{img_size}.safetensors"
    safetensors.torch.save_file(tm.state_dict(), str(path))
    return tm, path


def timm_from_file(arch: str, path: Path, img_size: int) -> torch.nn.Module:
    """timm's own loading of the file into a model created at img_size (its checkpoint_filter_fn resamples)."""
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, img_size=img_size,
                             **SMALL).eval()


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def ours(loaded: loading.LoadedModel, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(loaded.module.apply)(loaded.variables, jnp.asarray(x.transpose(0, 2, 3, 1)))[0])


def theirs(tm: torch.nn.Module, x: np.ndarray, pre_logits: bool = False) -> np.ndarray:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return (tm.forward_head(tm.forward_features(t), pre_logits=True) if pre_logits else tm(t)).numpy()


# --- point 1: the file's own size -----------------------------------------------------------------------------

def test_a_deit_saved_at_160_px_converts_and_loads_exactly_at_its_own_size(tmp_path, small_archs):
    tm, src = timm_file(tmp_path, DEIT, 160)
    path = convert(f"{DEIT}.fb_in1k", tmp_path / "out", from_file=src)
    meta = checkpoint.read_meta(path)
    assert meta["pretrained_cfg"]["input_size"] == [3, 160, 160]             # the file's size, not the tag's 224
    stored = safetensors.torch.load_file(str(path))["params/pos_embed"]
    torch.testing.assert_close(stored, tm.pos_embed.detach(), rtol=0, atol=0)  # its own 10 x 10 grid, not resampled

    x = images(160)
    for weights in (path, src):                        # the converted file, and the timm file converted in memory
        loaded = loading.load_model(f"{DEIT}.fb_in1k", weights=str(weights))
        assert loaded.info.img_size == 160 and loaded.pretrained_cfg["input_size"] == [3, 160, 160]
        assert "runs at 160 px" in loaded.describe()["size_note"]
        assert loading.planned_module(f"{DEIT}.fb_in1k", str(weights)) == loaded.module
        assert rel_err(ours(loaded, x), theirs(tm, x)) <= REL_TOL

    at_224 = loading.load_model(f"{DEIT}.fb_in1k", weights=str(path), img_size=224)
    assert at_224.pretrained_cfg["input_size"] == [3, 224, 224]
    assert "saved at 160 px" in at_224.describe()["size_note"]
    x = images(224, seed=1)
    assert rel_err(ours(at_224, x), theirs(timm_from_file(DEIT, src, 224), x)) <= REL_TOL


def test_a_dinov2_saved_at_224_px_through_the_converter_command(tmp_path, small_archs, capsys):
    tm, src = timm_file(tmp_path, DINOV2, 224)
    assert convert_cli(["--model", f"{DINOV2}.lvd142m", "--from-file", str(src), "--out", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / f"{DINOV2}.lvd142m.safetensors"
    assert str(path) in capsys.readouterr().out
    cfg = checkpoint.read_meta(path)["pretrained_cfg"]
    assert cfg["input_size"] == [3, 224, 224] and cfg["num_classes"] == 0   # headless, at 224 (timm's cfg: 518)

    loaded = loading.load_model(f"{DINOV2}.lvd142m", weights=str(path))
    assert loaded.info.img_size == 224 and loaded.info.num_classes == 0
    x = images(224)
    assert rel_err(ours(loaded, x), theirs(tm, x)) <= REL_TOL
    at_280 = loading.load_model(f"{DINOV2}.lvd142m", weights=str(path), img_size=280)   # 20 x 20, from 16 x 16
    x = images(280, seed=1)
    assert rel_err(ours(at_280, x), theirs(timm_from_file(DINOV2, src, 280), x)) <= REL_TOL


def test_a_run_on_a_converted_160_px_file_crops_at_160_and_says_so(tmp_path, small_archs):
    _, src = timm_file(tmp_path, DEIT, 160)
    path = convert(f"{DEIT}.fb_in1k", tmp_path / "ckpt", from_file=src)
    work = tmp_path / "run"
    status = main.cli(["vitsparse_jax.main", "--config=configs/sparsity.py", f"--config.model={DEIT}.fb_in1k",
                       f"--config.weights={path}", f"--config.workdir={work}", "--config.progress=False",
                       "--config.data.num_images=4", "--config.data.batch_size=4"])
    assert status == 0
    model = json.loads((work / "results.json").read_text())["model"]
    assert model["pretrained_cfg"]["input_size"] == [3, 160, 160]            # the eval crop is the weights' size
    assert "runs at 160 px" in model["size_note"]
    assert "runs at 160 px, the input size recorded with its weights" in (work / "report.md").read_text()


# --- point 2: num_classes=0 with a path ---------------------------------------------------------------------------

def test_num_classes_0_drops_the_classifier_of_a_timm_file_and_of_a_converted_file(tmp_path, small_archs):
    tm, src = timm_file(tmp_path, DEIT, 160, seed=3)
    path = convert(f"{DEIT}.fb_in1k", tmp_path / "out", from_file=src)
    x = images(160, seed=2)
    want = theirs(tm, x, pre_logits=True)                   # timm: forward_head(forward_features(x), pre_logits=True)
    assert want.shape == (2, SMALL["embed_dim"])
    for weights in (src, path):
        loaded = loading.load_model(f"{DEIT}.fb_in1k", weights=str(weights), num_classes=0)
        assert loaded.info.num_classes == 0 and loaded.pretrained_cfg["num_classes"] == 0
        assert loading.planned_module(f"{DEIT}.fb_in1k", str(weights), num_classes=0) == loaded.module
        assert rel_err(ours(loaded, x), want) <= REL_TOL
    with pytest.raises(ValueError, match="a classifier of 1000 classes.*num_classes=0 to drop"):
        loading.load_model(f"{DEIT}.fb_in1k", weights=str(src), num_classes=10)
