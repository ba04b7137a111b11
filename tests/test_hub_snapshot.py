"""timm names straight from the Hugging Face hub, offline as CI is: a fake hub cache in huggingface_hub's own
layout (models--timm--<arch>.<tag>/{blobs,refs,snapshots}), made here from random timm models, resolved
through the real `huggingface_hub.hf_hub_download` with HF_HUB_OFFLINE=1, converted without torch, cached.

`make_fake_hub` is also used by tests/test_hub_torch_free.py.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import safetensors.torch  # noqa: E402

from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.weights import checkpoint, hub, loading, pretrained, safetensors_io, timm_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5
REVISION = "0123456789abcdef0123456789abcdef01234567"
VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"     # float32 model.safetensors + config.json
RESNET_BF16 = "resnet18.a1_in1k"                       # bfloat16 model.safetensors + a config.json of its own
RESNET_BIN = "resnet18.tv_in1k"                        # only pytorch_model.bin (older repositories)
HUB_CROP_PCT = 0.8                                     # RESNET_BF16's config.json says so; the table says 0.95


# --- the fake hub ------------------------------------------------------------------------------------------

def add_repo(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = REVISION) -> Path:
    """One repository in huggingface_hub's cache layout: blobs by sha256, snapshot links, refs/main."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def hub_config(model, **cfg_updates) -> bytes:
    """A timm-style config.json: architecture, num_classes and the pretrained_cfg without its sources."""
    cfg = {k: v for k, v in model.pretrained_cfg.items()
           if k not in ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "architecture") and v is not None}
    cfg.update(cfg_updates)
    config = {"architecture": model.pretrained_cfg["architecture"], "num_classes": model.num_classes,
              "num_features": model.num_features, "pretrained_cfg": cfg}
    return json.dumps(config, indent=2).encode()


def random_timm(name: str, seed: int):
    from tests.timm_perturb import perturb

    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False), seed)


def make_fake_hub(root: Path) -> dict:
    """HF_HOME at root/hf with three timm repositories; returns {name: timm model (weights as on the hub)}."""
    cache = root / "hf" / "hub"
    out = {}
    vit = random_timm(VIT, 0)
    add_repo(cache, f"timm/{VIT}", {"model.safetensors": safetensors.torch.save(vit.state_dict()),
                                    "config.json": hub_config(vit)})
    out[VIT] = vit
    res = random_timm(RESNET_BF16, 1)
    bf16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in res.state_dict().items()}
    res.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bf16.items()})  # = hub values
    add_repo(cache, f"timm/{RESNET_BF16}", {"model.safetensors": safetensors.torch.save(bf16),
                                            "config.json": hub_config(res, crop_pct=HUB_CROP_PCT)})
    out[RESNET_BF16] = res
    tv = random_timm(RESNET_BIN, 2)
    buf = io.BytesIO()
    torch.save(tv.state_dict(), buf)
    add_repo(cache, f"timm/{RESNET_BIN}", {"pytorch_model.bin": buf.getvalue(), "config.json": hub_config(tv)})
    out[RESNET_BIN] = tv
    return out


def hub_env(root: Path, offline: bool = True) -> dict[str, str]:
    env = {"HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(root / "hf" / "hub"),
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakehub")
    return root, make_fake_hub(root)


@pytest.fixture
def offline_hub(fake_hub, monkeypatch, tmp_path):
    """The fake hub as huggingface_hub's cache, offline; converted files in a fresh folder per test."""
    from huggingface_hub import constants

    root, timm_models = fake_hub
    monkeypatch.setattr(constants, "HF_HOME", str(root / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "converted"))
    return root, timm_models


# --- helpers ---------------------------------------------------------------------------------------------

def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def _apply(module):   # one compilation per module (the same module loaded from several sources)
    return jax.jit(module.apply)


def logits_pair(loaded, tm, size=224, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    out = _apply(loaded.module)(loaded.variables, jnp.asarray(x.transpose(0, 2, 3, 1)))[0]
    return np.asarray(out), ref


# --- reading safetensors without torch ---------------------------------------------------------------------

def test_safetensors_reader_float32_float16_bfloat16(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=gen), "b.half": torch.randn(4, generator=gen).half(),
               "c.bf16": torch.randn(2, 3, 2, generator=gen).bfloat16(), "bn.num_batches_tracked": torch.tensor(7),
               "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    out = safetensors_io.read(path)
    assert set(out) == set(tensors)
    for key, value in tensors.items():
        ref = value.float().numpy() if value.is_floating_point() else value.numpy()
        assert out[key].dtype == ref.dtype and out[key].shape == ref.shape, key
        np.testing.assert_array_equal(out[key], ref)
    assert safetensors_io.read_metadata(path) == {"format": "pt"}
    raw = safetensors_io.read(path, float32=False)
    assert raw["c.bf16"].dtype.name == "bfloat16" and raw["b.half"].dtype == np.float16
    cleaned = timm_state.read_state_dict(path)
    assert "bn.num_batches_tracked" not in cleaned and cleaned["c.bf16"].dtype == np.float32
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(safetensors_io.SafetensorsError, match="bad.safetensors"):
        safetensors_io.read(tmp_path / "bad.safetensors")


# --- resolution through huggingface_hub, conversion, the converted cache ----------------------------------

def test_timm_name_resolves_from_the_hub_cache_with_parity(offline_hub, tmp_path):
    root, timm_models = offline_hub
    src = loading.resolve_weights(VIT, "auto", str(tmp_path / "no_checkpoints"))
    assert src.kind == "hub" and src.repo_id == f"timm/{VIT}"
    loaded = loading.load_model(VIT, checkpoint_dir=str(tmp_path / "no_checkpoints"))
    assert loaded.source == f"hf-hub:timm/{VIT}@{REVISION}" and loaded.trained
    assert Path(loaded.weights).is_relative_to(tmp_path / "converted") and REVISION in loaded.weights
    out, ref = logits_pair(loaded, timm_models[VIT])
    assert rel_err(out, ref) <= REL_TOL
    cfg = loaded.pretrained_cfg
    assert cfg["tag"] == "augreg_in21k_ft_in1k" and cfg["mean"] == [0.5] * 3 and cfg["crop_pct"] == 0.9
    assert cfg["num_classes"] == 1000 and cfg["crop_mode"] == "center"


def test_second_run_loads_the_converted_file(offline_hub, monkeypatch):
    first = loading.load_model(VIT)
    stamp = Path(first.weights).stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(timm_state, "convert_state_dict", no_conversion)
    second = loading.load_model(VIT, weights="hub")
    assert second.weights == first.weights and Path(second.weights).stat().st_mtime_ns == stamp
    for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(second.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_snapshot_and_its_config_json(offline_hub):
    _, timm_models = offline_hub
    tm = timm_models[RESNET_BF16]
    loaded = loading.load_model(RESNET_BF16)
    assert loaded.pretrained_cfg["crop_pct"] == HUB_CROP_PCT                 # config.json over the table
    assert pretrained.table_cfg("resnet18", "a1_in1k")["crop_pct"] == 0.95
    conv1 = np.asarray(loaded.variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(conv1, tm.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))   # exact upcast
    out, ref = logits_pair(loaded, tm)
    assert rel_err(out, ref) <= REL_TOL


def test_pytorch_model_bin_when_the_repository_has_no_safetensors(offline_hub):
    _, timm_models = offline_hub
    loaded = loading.load_model(RESNET_BIN)
    assert loaded.source.startswith(f"hf-hub:timm/{RESNET_BIN}@") and loaded.pretrained_cfg["interpolation"] == "bilinear"
    out, ref = logits_pair(loaded, timm_models[RESNET_BIN])
    assert rel_err(out, ref) <= REL_TOL


def test_explicit_sources_force_one(offline_hub, tmp_path):
    root, timm_models = offline_hub
    snapshot = root / "hf" / "hub" / f"models--timm--{VIT}" / "snapshots" / REVISION
    for weights in (str(snapshot / "model.safetensors"), str(snapshot)):      # a timm file or snapshot folder
        src = loading.resolve_weights(VIT, weights)
        assert src.kind == "file"
        loaded = loading.load_model(VIT, weights=weights)
        assert loaded.source == "file" and loaded.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"
        out, ref = logits_pair(loaded, timm_models[VIT])
        assert rel_err(out, ref) <= REL_TOL
    # a converted checkpoint in checkpoint_dir wins over the hub under 'auto'; 'hub' skips it
    ckpt_dir = tmp_path / "ckpts"
    path = checkpoint.save(ckpt_dir, "vit_tiny_patch16_224", "augreg_in21k_ft_in1k",
                           jax.tree.map(np.asarray, loaded.variables), loaded.pretrained_cfg, "test")
    assert loading.resolve_weights(VIT, "auto", str(ckpt_dir)).path == path
    assert loading.resolve_weights("vit_tiny_patch16_224", "auto", str(ckpt_dir)).path == path
    assert loading.resolve_weights(VIT, "hub", str(ckpt_dir)).kind == "hub"
    assert loading.resolve_weights(VIT, "checkpoint_dir", str(ckpt_dir)).path == path
    with pytest.raises(FileNotFoundError, match="built-in"):
        loading.resolve_weights(VIT, "builtin")
    assert loading.resolve_weights("vit_pico_patch4_32", "auto", str(ckpt_dir)).kind == "builtin"
    with pytest.raises(FileNotFoundError, match="own models, not on the hub"):
        loading.resolve_weights("resnet_pico", "auto", str(ckpt_dir))


# --- errors ---------------------------------------------------------------------------------------------

def test_offline_cache_miss_is_a_clear_error_within_seconds(offline_hub):
    root, _ = offline_hub
    name = "vit_small_patch16_224.dino"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        loading.load_model(name)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    for part in (name, str(root / "hf" / "hub"), "HF_HUB_OFFLINE=1", "--config.weights=/path/to/",
                 "python -m checkpoints_convert", "--from-file"):
        assert part in msg, part
    assert len(msg.splitlines()) == 2
    # an ablation-style check of several models names every uncached one before any compute
    with pytest.raises(FileNotFoundError, match="2 of the 3 models.*vit_small_patch16_224.dino.*resnet50.tv_in1k"):
        loading.check_weights([VIT, name, "resnet50.tv_in1k"], "auto", "")


def test_unknown_tag_lists_timm_tags(offline_hub):
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224\.nope.*augreg_in21k_ft_in1k \(default\), "
                                         r"augreg_in21k"):
        loading.resolve_weights("vit_tiny_patch16_224.nope")
    with pytest.raises(ValueError, match="resnet50.*tv_in1k"):
        loading.load_model("resnet50.nope", weights="untrained")
    with pytest.raises(ValueError, match="Did you mean"):
        loading.resolve_weights("vit_tiny_patch16_22.augreg_in21k")


def test_unreachable_hub_fails_within_seconds(tmp_path):
    """No HF_HUB_OFFLINE, nothing cached, the hub endpoint refuses connections: a clear error, fast (not
    huggingface_hub's ~25 s of retries). A local closed port stands in for a machine without internet."""
    code = textwrap.dedent("""
        import time
        from vitsparse_jax.weights import loading
        start = time.monotonic()
        try:
            loading.load_model("vit_small_patch16_224.dino")
        except FileNotFoundError as e:
            print("ELAPSED", time.monotonic() - start)
            print(e)
    """)
    env = {**os.environ, **hub_env(tmp_path, offline=False), "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    elapsed = float(proc.stdout.split("ELAPSED", 1)[1].split()[0])
    assert elapsed < 10, proc.stdout
    assert "cannot be reached" in proc.stdout and "vit_small_patch16_224.dino" in proc.stdout
    assert str(tmp_path / "hf" / "hub") in proc.stdout and "HF_HUB_OFFLINE=1" in proc.stdout


# --- untrained twins use their tag's cfg ----------------------------------------------------------------------

def _receptive_field_paper_models() -> list[str]:
    sys.path.insert(0, str(REPO))
    from configs import receptive_field

    return [n for n in receptive_field.PAPER_MODELS if "." in n]


@pytest.mark.parametrize("name", _receptive_field_paper_models())
def test_untrained_twin_uses_its_tags_cfg(name, monkeypatch):
    """Paper 2's trained-vs-untrained comparison changes the weights only, never the preprocessing."""
    monkeypatch.setattr(models, "init_untrained", lambda module, seed=0: models.variable_shapes(module))
    arch, tag = models.split_name(name)
    ref = timm.models.get_pretrained_cfg(name)             # what timm (and the hub weights) use for the tag
    loaded = loading.load_model(name, weights="untrained")
    cfg = loaded.pretrained_cfg
    assert not loaded.trained and loaded.tag == tag and cfg["tag"] == tag
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation", "input_size", "num_classes"):
        assert cfg[key] == (list(ref.to_dict()[key]) if isinstance(ref.to_dict()[key], tuple)
                            else ref.to_dict()[key]), key
    assert loaded.info.num_classes == ref.num_classes and loaded.info.img_size == ref.input_size[-1]
    assert cfg == pretrained.table_cfg(arch, tag)          # = the trained twin's cfg without a config.json


def test_dino_untrained_gets_imagenet_mean_std(monkeypatch):
    monkeypatch.setattr(models, "init_untrained", lambda module, seed=0: models.variable_shapes(module))
    loaded = loading.load_model("vit_small_patch16_224.dino", weights="untrained")
    assert loaded.pretrained_cfg["mean"] == [0.485, 0.456, 0.406] and loaded.info.num_classes == 0
    plain = loading.load_model("vit_small_patch16_224", weights="untrained")   # the default tag: augreg
    assert plain.pretrained_cfg["mean"] == [0.5] * 3 and plain.info.num_classes == 1000


def test_key_maps_and_weights_import_neither_torch_nor_timm():
    """The per-family key maps and vitsparse_jax.weights stay numpy: torch only in timm_state._torch_load
    (.pth/.bin files), timm nowhere."""
    import ast

    files = sorted((REPO / "vitsparse_jax" / "weights").rglob("*.py"))
    assert any(p.stem == "vit" for p in files) and any(p.stem == "hub" for p in files)
    for path in files:
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_torch_load":
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in allowed:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("torch", "timm", "torchvision") for n in names), \
                    f"{path.relative_to(REPO)}:{node.lineno} imports {names}"
