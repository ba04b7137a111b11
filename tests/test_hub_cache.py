"""The model caches (issue 23 point 4), offline, on a hub-layout cache made from a random timm model:

- a read-only HF_HOME (a shared, admin-managed cache): its converted copies are used as they are; a model it
  lacks stops the run with one line naming VITSPARSE_JAX_CACHE, and with that variable set the run converts
  into it;
- a damaged download in the hub cache (content that does not match its sha256) names the folder to delete,
  and doing so (then downloading again) fixes it;
- a truncated converted copy is converted again automatically; a truncated copy in checkpoint_dir gives a
  command that, run as written, replaces it.
The DeiT is built small (depth 2, width 48); the command line runs in-process (`main.cli`).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
import safetensors.torch  # noqa: E402

from checkpoints_convert import convert  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from tests.test_hub_snapshot import REVISION, add_repo, hub_config  # noqa: E402
from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import main, models  # noqa: E402
from vitsparse_jax.weights import hub, loading  # noqa: E402

ARCH, TAG = "deit_small_patch16_224", "fb_in1k"
NAME = f"{ARCH}.{TAG}"
REPO_ID = f"timm/{NAME}"
SMALL = dict(depth=2, embed_dim=48, num_heads=2)


@pytest.fixture(scope="module")
def repo_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    tm = perturb(timm.create_model(NAME, pretrained=False, **SMALL), 0)
    return {"model.safetensors": safetensors.torch.save(tm.state_dict()), "config.json": hub_config(tm)}


@pytest.fixture
def home(tmp_path, monkeypatch, repo_files):
    """HF_HOME with the one repository, offline, VITSPARSE_JAX_CACHE unset; DeiT built small."""
    from huggingface_hub import constants

    create = models.create_model
    monkeypatch.setattr(models, "create_model", lambda name, **kw: create(
        name, **({**SMALL, **kw} if models.split_name(name)[0] == ARCH else kw)))
    root = tmp_path / "hf"
    add_repo(root / "hub", REPO_ID, repo_files)
    monkeypatch.setattr(constants, "HF_HOME", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    yield root
    for path in [root, *root.rglob("*")]:       # writable again, for the clean-up
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def read_only(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def run(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    status = main.cli(["vitsparse_jax.main", "--config=configs/sparsity.py", f"--config.model={NAME}",
                       f"--config.workdir={tmp_path / 'run'}", "--config.progress=False",
                       "--config.data.num_images=4", "--config.data.batch_size=4", *args])
    return status, capsys.readouterr().err


def one_line_error(status: int, err: str, *parts: str) -> str:
    assert status == 2 and "Traceback" not in err, err[-3000:]
    message = err[err.rfind("error: "):].strip()
    assert len(message.splitlines()) == 1, message
    for part in parts:
        assert part in message, (part, message)
    return message


def leaves(loaded) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(loaded.variables)]


# --- a read-only HF_HOME ---------------------------------------------------------------------------------------

def test_a_read_only_hf_home_stops_naming_the_variable_and_works_with_it(home, tmp_path, capsys, monkeypatch):
    read_only(home)
    if os.access(home, os.W_OK):
        pytest.skip("this user writes into read-only folders (root); the next test makes the folder unwritable")
    status, err = run(tmp_path, capsys)
    one_line_error(status, err, NAME, str(home), "VITSPARSE_JAX_CACHE", "export VITSPARSE_JAX_CACHE=")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "mine"))
    loaded = loading.load_model(NAME)
    assert Path(loaded.weights).is_relative_to(tmp_path / "mine") and REVISION in loaded.weights


def test_a_converted_folder_that_cannot_be_made_stops_naming_the_variable(home, tmp_path, capsys, monkeypatch):
    (home / "vitsparse_jax").write_text("a file where the folder of converted copies would go")
    status, err = run(tmp_path, capsys)
    one_line_error(status, err, NAME, str(home / "vitsparse_jax"), "VITSPARSE_JAX_CACHE")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "mine"))
    assert Path(loading.load_model(NAME).weights).is_relative_to(tmp_path / "mine")


def test_a_copy_converted_into_a_read_only_hf_home_is_used_as_it_is(home, monkeypatch):
    first = loading.load_model(NAME)                     # converted into <HF_HOME>/vitsparse_jax/converted
    assert Path(first.weights).is_relative_to(home / "vitsparse_jax" / "converted")
    stamp = Path(first.weights).stat().st_mtime_ns
    read_only(home)
    monkeypatch.setattr(hub.timm_state, "convert_file", lambda *a, **k: pytest.fail("converted again"))
    second = loading.load_model(NAME)
    assert second.weights == first.weights and Path(second.weights).stat().st_mtime_ns == stamp
    for a, b in zip(leaves(first), leaves(second)):
        np.testing.assert_array_equal(a, b)


# --- a damaged download ----------------------------------------------------------------------------------------

def damage(blob: Path, how: str) -> None:
    data = bytearray(blob.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:                                   # same size, one byte changed deep in the tensors: parses, wrong numbers
        data[-1000] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["altered", "truncated"])
def test_a_damaged_hub_download_names_the_folder_to_delete_and_that_fixes_it(home, tmp_path, capsys, repo_files,
                                                                             how):
    folder = home / "hub" / f"models--timm--{NAME}"
    damage((folder / "snapshots" / REVISION / "model.safetensors").resolve(), how)
    status, err = run(tmp_path, capsys)
    message = one_line_error(status, err, REPO_ID, "damaged", "sha256")
    command = message.split("rm -r ", 1)[1].split(", and run again", 1)[0]
    assert shlex.split(command) == [str(folder)]
    shutil.rmtree(*shlex.split(command))                  # as the message says; then the download again:
    assert not loading.hub.is_cached(ARCH, TAG)
    add_repo(home / "hub", REPO_ID, repo_files)
    loaded = loading.load_model(NAME)
    assert loaded.source == f"hf-hub:{REPO_ID}@{REVISION}"
    ref = safetensors.torch.load(repo_files["model.safetensors"])["pos_embed"].numpy()
    np.testing.assert_array_equal(np.asarray(loaded.variables["params"]["pos_embed"]), ref)


# --- damaged converted copies ----------------------------------------------------------------------------------

def test_a_truncated_converted_copy_is_converted_again(home, caplog):
    first = loading.load_model(NAME)
    path = Path(first.weights)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 3])      # an interrupted copy; its .json is still there
    with caplog.at_level(logging.WARNING, logger=hub.__name__):
        second = loading.load_model(NAME)
    assert "converting timm/" in caplog.text and "damaged" in caplog.text
    assert second.weights == first.weights and path.stat().st_size == size
    for a, b in zip(leaves(first), leaves(second)):
        np.testing.assert_array_equal(a, b)


def test_a_truncated_copy_in_checkpoint_dir_gives_a_command_that_replaces_it(home, tmp_path, capsys, repo_files):
    src = tmp_path / "model.safetensors"
    src.write_bytes(repo_files["model.safetensors"])
    ckpt = convert(NAME, tmp_path / "ckpt", from_file=src)
    good = safetensors.torch.load(ckpt.read_bytes())
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    status, err = run(tmp_path, capsys, "--config.weights=checkpoint_dir", f"--config.checkpoint_dir={ckpt.parent}")
    message = one_line_error(status, err, str(ckpt), "truncated", "python -m checkpoints_convert")
    command = shlex.split(message.split("Convert it again: ", 1)[1])
    assert command[:3] == ["python", "-m", "checkpoints_convert"] and "--from-file" in command
    assert convert_cli(command[3:]) == 0                  # the command, as written
    again = safetensors.torch.load(ckpt.read_bytes())
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert loading.load_model(NAME, weights="checkpoint_dir", checkpoint_dir=str(ckpt.parent)).weights == str(ckpt)
