"""Weights files a user can get wrong, through the real command line in-process (`main.cli`; issue 23 point 3).

Each is exit status 2 and one message that names the file and says what to do, no traceback, no result file:
a pickled training checkpoint that torch's weights_only loader refuses (zip and legacy format), a damaged
.bin, a .pth without torch installed, a truncated .npz head file, non-finite head weights, integer tensors
where the model has float parameters (a Swin file that also carries its integer buffers, which are dropped,
not refused), a truncated timm .safetensors. The converter's cases are in tests/test_checkpoint.py.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import safetensors.torch  # noqa: E402

from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import main, models  # noqa: E402
from vitsparse_jax.weights import loading  # noqa: E402

PICO = "vit_pico_patch4_32"
SWIN = "swin_tiny_patch4_window7_224"
SMALL_SWIN = dict(depths=(2, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 2, 2))   # block 0.1 is shifted: an attn_mask
RESULTS = ("results.json", "report.md", "COMPLETE.json", "config.json")


def run(tmp_path: Path, capsys, *args: str, model: str = PICO) -> tuple[int, str]:
    status = main.cli(["vitsparse_jax.main", "--config=configs/sparsity.py", f"--config.model={model}",
                       f"--config.workdir={tmp_path / 'run'}", "--config.progress=False",
                       "--config.data.num_images=4", "--config.data.batch_size=4", *args])
    return status, capsys.readouterr().err


def user_error(tmp_path: Path, status: int, err: str, *parts: str) -> str:
    """The one-line message of a user error; nothing written."""
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err[err.rfind("error: "):].strip()
    assert len(message.splitlines()) == 1, message
    for part in parts:
        assert part in message, (part, message)
    written = [p.name for p in (tmp_path / "run").rglob("*") if p.name in RESULTS]
    assert not written, written
    return message


def pico_state_dict() -> dict[str, torch.Tensor]:
    """timm's VisionTransformer with the built-in pico ViT's layout (32 px, patches of 4, 10 classes)."""
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10).state_dict()


# --- torch files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pickled_training_checkpoint_is_refused_with_advice_that_works(tmp_path, capsys, monkeypatch, zipped):
    path = tmp_path / "train.pth"
    torch.save({"model": pico_state_dict(), "args": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=zipped)
    status, err = run(tmp_path, capsys, f"--config.weights={path}")
    message = user_error(tmp_path, status, err, str(path), "argparse.Namespace", "weights_only=True", "If you trust")
    # the advice, as written: its command saves the weights as a plain state dict, which then loads
    code = re.search(r'python -c "(.+?)"', message).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code, {})                                          # what `python -c` runs, without starting an interpreter
    loaded = loading.load_model(PICO, weights=str(tmp_path / "state_dict.pth"))
    np.testing.assert_array_equal(np.asarray(loaded.variables["params"]["pos_embed"]),
                                  pico_state_dict()["pos_embed"].numpy())


def test_a_damaged_torch_file_says_to_copy_it_again(tmp_path, capsys):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\3\4 half a zip")
    status, err = run(tmp_path, capsys, f"--config.weights={path}")
    user_error(tmp_path, status, err, str(path), "cannot read", "as a torch file", "download or copy it again")


def test_a_pth_without_torch_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save(pico_state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)        # `import torch` fails, as in an install without it
    status, err = run(tmp_path, capsys, f"--config.weights={path}")
    user_error(tmp_path, status, err, str(path), "needs torch", 'pip install "vitsparse_jax[convert]"')


def test_a_truncated_timm_safetensors_says_to_copy_it_again(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    data = safetensors.torch.save(pico_state_dict())
    path.write_bytes(data[: len(data) // 2])
    status, err = run(tmp_path, capsys, f"--config.weights={path}")
    user_error(tmp_path, status, err, str(path), "Download or copy it again")


# --- head files ----------------------------------------------------------------------------------------------------

def test_a_truncated_head_file_is_named(tmp_path, capsys):
    path = tmp_path / "probe.npz"
    np.savez(path, weight=np.ones((10, 64), np.float32), bias=np.zeros(10, np.float32))
    path.write_bytes(path.read_bytes()[:300])
    status, err = run(tmp_path, capsys, f"--config.head_weights={path}")
    user_error(tmp_path, status, err, "head_weights", str(path), "truncated", "save the classifier again")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_head_weights_are_refused_naming_the_array(tmp_path, capsys, bad):
    path = tmp_path / "probe.npz"
    weight, bias = np.ones((10, 64), np.float32), np.zeros(10, np.float32)
    bias[3] = bad
    np.savez(path, weight=weight, bias=bias)
    status, err = run(tmp_path, capsys, f"--config.head_weights={path}")
    user_error(tmp_path, status, err, str(path), "'bias' holds 1 non-finite value")


# --- integer tensors -------------------------------------------------------------------------------------------------

@pytest.fixture
def small_swin(monkeypatch):
    create = models.create_model

    def small(name, **overrides):
        arch, _ = models.split_name(name)
        return create(name, **({**SMALL_SWIN, **overrides} if arch == SWIN else overrides))

    monkeypatch.setattr(models, "create_model", small)


def swin_file(tmp_path: Path, quantised: str | None = None) -> tuple[torch.nn.Module, Path]:
    """A Swin state dict as original checkpoints carry it: with its integer relative_position_index and its
    attn_mask buffers (and a BatchNorm-style counter); `quantised` names a parameter stored as int8."""
    torch.manual_seed(0)
    tm = perturb(timm.create_model(SWIN, pretrained=False, **SMALL_SWIN), 0)
    sd = {**tm.state_dict(), **dict(tm.named_buffers())}
    assert sd["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert any(k.endswith("attn_mask") for k in sd)
    sd["layers.0.blocks.0.norm1.num_batches_tracked"] = torch.tensor(7)
    if quantised:
        sd[quantised] = (sd[quantised] * 100).to(torch.int8)
    path = tmp_path / ("int8.safetensors" if quantised else "model.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return tm, path


def test_integer_parameters_are_refused_naming_the_tensor(tmp_path, capsys, small_swin):
    _, path = swin_file(tmp_path, quantised="layers.1.blocks.0.mlp.fc1.weight")
    status, err = run(tmp_path, capsys, f"--config.weights={path}", model=f"{SWIN}.ms_in1k")
    user_error(tmp_path, status, err, str(path), "'layers.1.blocks.0.mlp.fc1.weight'", "int8",
               "floating-point parameters", "original float weights")


def test_a_swin_file_with_its_integer_buffers_loads_exactly(tmp_path, small_swin):
    tm, path = swin_file(tmp_path)
    loaded = loading.load_model(f"{SWIN}.ms_in1k", weights=str(path))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    out = np.asarray(loaded.module.apply(loaded.variables, jnp.asarray(x.transpose(0, 2, 3, 1)))[0])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
