"""What a user can get wrong, through the real command line of every experiment and of the converter.

For each case: a non-zero exit status (2: a user error), a message that names the offending field, file
or value and says what to do, no traceback (that is for internal errors and --verbose), and no result
file written. Issue 16 point 3 and issue 17 point 1.

The cases run in this process: `vitsparse_jax.main.cli(argv)` and `checkpoints_convert.__main__.main(argv)`
are the command lines without the interpreter around them (same parsing, messages and exit statuses). The
process-level contract is proven once per exit status in a fresh interpreter (`python -m ...`): 2 (a user
error), 1 (an internal error, with its traceback) and 75 (stop_after_batches) here, 130 and 143 (SIGINT and
SIGTERM during a run, the state saved) in tests/test_multihost_stop.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "vitsparse_jax" / "assets" / "checkpoints"
VIT = "vit_pico_patch4_32.digits"
RESULTS = ("results.json", "results.csv", "report.md", "config.json", "versions.json", "COMPLETE.json",
           "tables.md", "receptive_fields.csv", "metrics.csv")
CONFIGS = {"ablate": "configs/ablate.py", "sparsity": "configs/sparsity.py", "rf": "configs/receptive_field.py",
           "train": "configs/train.py"}
SMALL = {"ablate": ["--config.data.num_images=8", "--config.data.batch_size=4", "--config.ablation.p=0.1",
                    "--config.ablation.n=1", "--config.ablation.draws=1", "--config.ablation.bootstrap=10"],
         "sparsity": ["--config.data.num_images=8", "--config.data.batch_size=4"],
         "rf": ["--config.data.num_images=8", "--config.data.batch_size=4", "--config.receptive_field.variants=trained",
                "--config.receptive_field.layers=blocks.0"],
         "train": ["--config.data.num_images=8", "--config.data.batch_size=4", "--config.train.batch_size=4",
                   "--config.train.steps=2"]}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VITSPARSE_JAX_VERBOSE"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return env


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """The commands' working directory (their configs/*.py paths are relative to it), without --verbose."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("VITSPARSE_JAX_VERBOSE", raising=False)


@dataclasses.dataclass
class Finished:
    """What a command left: its exit status and output (the fields of subprocess.CompletedProcess)."""
    returncode: int
    stdout: str
    stderr: str


def in_process(command: Callable[[list[str]], int], argv: list[str]) -> Finished:
    """`command(argv)` (a command line's entry point) with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = command(argv)
        except SystemExit as e:                 # argparse: a usage error or --help
            status = e.code if isinstance(e.code, int) else 1
    return Finished(status, out.getvalue(), err.getvalue())


def main_cli(*args: str) -> Finished:
    """`python -m vitsparse_jax.main <args>`, in this process."""
    from vitsparse_jax.main import cli

    return in_process(cli, ["vitsparse_jax.main", *args])


def main_argv(experiment: str, args: list[str], tmp_path: Path) -> list[str]:
    return [f"--config={CONFIGS[experiment]}", f"--config.workdir={tmp_path / 'run'}", "--config.progress=False",
            *SMALL[experiment], *args]


def python_m(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <args>` in a fresh interpreter (the process-level cases)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=300, check=False)


# --- helpers that make broken inputs ----------------------------------------------------------------------

def weights_copy(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(ASSETS / f"{VIT}{suffix}", tmp / f"{VIT}{suffix}")
    return tmp / f"{VIT}.safetensors"


def truncated_weights(tmp: Path) -> list[str]:
    path = weights_copy(tmp / "w")
    path.write_bytes(path.read_bytes()[:1000])
    return [f"--config.weights={path}"]


def garbage_weights(tmp: Path) -> list[str]:
    path = weights_copy(tmp / "w")
    path.write_bytes(b"\0" * 64)
    return [f"--config.weights={path}"]


def broken_json(tmp: Path) -> list[str]:
    path = weights_copy(tmp / "w")
    path.with_suffix(".json").write_text('{"model": "vit_pico_patch4_32", "tag": ')
    return [f"--config.weights={path}"]


def missing_json(tmp: Path) -> list[str]:
    path = weights_copy(tmp / "w")
    path.with_suffix(".json").unlink()
    return [f"--config.weights={path}"]


def image_folder(tmp: Path, n: int = 6, labelled: bool = False) -> Path:
    from PIL import Image

    from vitsparse_jax.data import DigitsSource

    source = DigitsSource("test")
    for i in range(n):
        folder = tmp / "imgs" / (str(source.label(i)) if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(source.read(i).data)).save(folder / f"{i:03d}.png")
    return tmp / "imgs"


def unreadable_images(tmp: Path) -> list[str]:
    folder = tmp / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return ["--config.data.source=images", f"--config.data.folder={folder}", "--config.data.num_images=0"]


def damaged_state(tmp: Path) -> list[str]:
    state = tmp / "run" / VIT / "resume_state.npz"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\3\4 half a zip")
    return []


def damaged_train_state(tmp: Path) -> list[str]:
    state = tmp / "run" / "checkpoints" / "train_state_0000001.msgpack"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x93 not msgpack")
    return []


def file_in_the_way(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"--config.workdir={tmp / 'afile' / 'run'}"]


def workdir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"--config.workdir={tmp / 'afile'}"]


def empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


# --- the matrix --------------------------------------------------------------------------------------------
# (id, experiment, args or a function tmp_path -> args, substrings the message must hold)
Case = tuple[str, str, "list[str] | Callable[[Path], list[str]]", list[str]]
CASES: list[Case] = [
    # the config itself
    ("unknown field", "ablate", ["--config.ablation.pp=0.1"], ["--config.ablation.pp", "Did you mean --config.ablation.p?"]),
    ("unknown section", "rf", ["--config.recptive_field.layers=x"], ["'recptive_field'", "--config.receptive_field"]),
    ("unknown field", "sparsity", ["--config.sparsity.top_fracton=0.1"], ["top_fracton", "top_fraction"]),
    ("unknown field", "train", ["--config.train.stesp=5"], ["stesp", "--config.train.steps"]),
    ("field of a value", "ablate", ["--config.seed.x=1"], ["--config.seed.x", "not a section"]),
    ("wrong type", "ablate", ["--config.data.num_images=abc"], ["--config.data.num_images=abc", "--helpshort"]),
    ("missing config file", "ablate", ["--config=configs/ablation.py"], ["configs/ablation.py", "No such file",
                                                                         "--config=ablate", "ablate:paper"]),
    ("unknown preset", "ablate", ["--config=configs/ablate.py:papr"], ["'papr'", "'paper'"]),
    ("unknown experiment", "ablate", ["--config.experiment=ablation"], ["'ablation'", "ablate, sparsity"]),
    # models and weights
    ("unknown model", "ablate", ["--config.model=vit_pico_patch4_23"], ["vit_pico_patch4_23", "vit_pico_patch4_32"]),
    ("unknown model", "sparsity", ["--config.model=resnet_50"], ["resnet_50", "Did you mean"]),
    ("missing weights file", "sparsity", ["--config.weights=/nonexistent/w.safetensors"],
     ["/nonexistent/w.safetensors", "does not exist", "checkpoints_convert"]),
    ("no converted weights", "ablate", lambda t: ["--config.weights=checkpoint_dir",
                                                   f"--config.checkpoint_dir={empty_dir(t)}"],
     ["no converted weights", "empty", "checkpoints_convert"]),
    ("truncated safetensors", "ablate", truncated_weights, [f"{VIT}.safetensors", "truncated or damaged",
                                                            "Convert it again"]),
    ("garbage safetensors", "rf", garbage_weights, [f"{VIT}.safetensors", "Convert it again"]),
    ("broken JSON sidecar", "rf", broken_json, [f"{VIT}.json", "not valid JSON", "Convert it again"]),
    ("missing JSON sidecar", "sparsity", missing_json, [f"{VIT}.safetensors", ".json is missing"]),
    ("weights of another model", "sparsity", lambda t: ["--config.model=vgg_pico",
                                                        f"--config.weights={weights_copy(t / 'w')}"],
     ["vit_pico_patch4_32", "vgg_pico"]),
    ("sparsity of attention in a CNN", "sparsity", ["--config.model=vgg_pico", "--config.sparsity.kind=attention"],
     ["vgg_pico", "no attention maps", "sparsity.kind='auto'"]),
    # data
    ("missing image folder", "ablate", ["--config.data.source=folder", "--config.data.folder=/nonexistent/imgs"],
     ["/nonexistent/imgs", "does not exist", "--config.data.folder"]),
    ("folder without images", "sparsity", lambda t: ["--config.data.source=images",
                                                     f"--config.data.folder={empty_dir(t)}"],
     ["no image files", "empty"]),
    ("no class subfolders", "ablate", lambda t: ["--config.data.source=folder",
                                                 f"--config.data.folder={image_folder(t)}"],
     ["no class subfolders", "data.source='images'"]),
    ("unlabelled images for the ablation", "ablate", lambda t: ["--config.data.source=images",
                                                                f"--config.data.folder={image_folder(t)}"],
     ["needs labelled images", "data.source='folder'"]),
    ("every image unreadable", "rf", unreadable_images, ["none of the 3 images", "could be read", "check the files"]),
    ("negative num_images", "ablate", ["--config.data.num_images=-5"], ["data.num_images", ">= 0", "-5"]),
    ("negative every_kth_class", "sparsity", ["--config.data.every_kth_class=-2"], ["data.every_kth_class", "-2"]),
    ("batch size not a multiple of the devices", "ablate", ["--config.data.batch_size=6"],
     ["batch_size=6", "multiple of the number of devices", "e.g. 4"]),
    ("zero batch size", "rf", ["--config.data.batch_size=0"], ["batch_size=0", "positive multiple", "e.g. 4"]),
    ("unknown data source", "ablate", ["--config.data.source=imagenet"], ["data.source", "'imagenet'", "digits"]),
    ("unknown digits split", "train", ["--config.data.split=val"], ["digits", "'val'", "'test'"]),
    ("TFDS dataset not prepared", "rf", lambda t: ["--config.data.source=tfds", "--config.data.name=imagenet2012",
                                                   f"--config.data.data_dir={empty_dir(t)}"],
     ["imagenet2012", "not prepared", "tfds build"]),
    # experiment switches
    ("p out of range", "ablate", ["--config.ablation.p=1.5"], ["p must lie in"]),
    ("n too large", "ablate", ["--config.ablation.n=7"], ["n must be between 1 and"]),
    ("unknown variant", "rf", ["--config.receptive_field.variants=both"], ["variants", "'trained'", "'untrained'"]),
    ("layer pattern matching nothing", "rf", ["--config.receptive_field.layers=block.*"],
     ["'block.*' matches no layer", "blocks.0"]),
    ("checkpoint glob matching nothing", "rf", ["--config.receptive_field.checkpoints=/nonexistent/*.safetensors"],
     ["/nonexistent/*.safetensors", "matches no file"]),
    ("zero training steps", "train", ["--config.train.steps=0"], ["train.steps must be positive"]),
    ("example image out of range", "sparsity", ["--config.sparsity.example_index=5000"],
     ["sparsity.example_index", "5000", "out of range"]),
    # the workdir
    ("damaged resume state", "ablate", damaged_state, ["resume_state.npz", "cannot be read", "rm ",
                                                       "--config.resume=False"]),
    ("damaged train state", "train", damaged_train_state, ["train_state_0000001.msgpack", "damaged", "rm "]),
    ("workdir under a file", "sparsity", file_in_the_way, ["afile", "--config.workdir"]),
    ("workdir is a file", "ablate", workdir_is_a_file, ["afile", "is a file, not a folder", "--config.workdir"]),
]


def run_cli(experiment: str, args: list[str], tmp_path: Path) -> Finished:
    """The experiment's command line (small), in this process."""
    return main_cli(*main_argv(experiment, args, tmp_path))


def assert_user_error(proc: Finished | subprocess.CompletedProcess, expected: list[str], outputs: list[Path]) -> None:
    err = proc.stderr
    assert proc.returncode == 2, f"status {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    message = err[err.rfind("error: "):]
    assert message, err[-3000:]
    for text in expected:
        assert text in message, f"{text!r} not in the message:\n{message}"
    written = [p for folder in outputs if folder.exists() for p in folder.rglob("*") if p.name in RESULTS
               or p.suffix == ".safetensors"]
    assert not written, written


@pytest.mark.parametrize("name, experiment, args, expected", CASES,
                         ids=[f"{c[1]}: {c[0]}" for c in CASES])
def test_a_user_error_is_one_message_without_traceback_and_writes_nothing(tmp_path, name, experiment, args,
                                                                           expected):
    args = args(tmp_path) if callable(args) else args
    if any(a.startswith("--config=") for a in args):      # the case replaces the config file
        proc = main_cli(*args, f"--config.workdir={tmp_path / 'run'}")
    else:
        proc = run_cli(experiment, args, tmp_path)
    expected = [e.replace("empty", str(tmp_path / "empty")) if e == "empty" else e for e in expected]
    assert_user_error(proc, expected, [tmp_path / "run", tmp_path / "afile"])


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
    """--verbose (or VITSPARSE_JAX_VERBOSE=1) lets the error out of the command line: python -m prints its
    traceback (the status-1 case below is that path)."""
    with pytest.raises(ValueError, match="data.num_images"):
        run_cli("ablate", ["--config.data.num_images=-5", "--verbose"], tmp_path)
    monkeypatch.setenv("VITSPARSE_JAX_VERBOSE", "1")
    with pytest.raises(AttributeError, match="pp"):      # the unknown field, as the config library raises it
        main_cli("--config=configs/ablate.py", "--config.ablation.pp=1")


# --- the process: one case per exit status in a fresh interpreter ------------------------------------------

def test_a_user_error_exits_2_with_one_message_and_no_traceback(tmp_path):
    proc = python_m("vitsparse_jax.main", *main_argv("ablate", ["--config.data.num_images=-5"], tmp_path))
    assert_user_error(proc, ["data.num_images", ">= 0", "-5"], [tmp_path / "run"])
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")   # the last line: nothing after it


def test_an_internal_error_exits_1_with_its_traceback(tmp_path):
    """An error that is not the user's input (here jax refusing an unknown platform): status 1, the traceback."""
    proc = python_m("vitsparse_jax.main", *main_argv("ablate", [], tmp_path), env=dict(_env(), JAX_PLATFORMS="none"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError" in proc.stderr, proc.stderr[-3000:]
    assert "Unable to initialize backend 'none'" in proc.stderr


def test_stop_after_batches_exits_75_with_the_state_saved_and_the_log_on_stderr(tmp_path):
    """A run stopped on request (stop_after_batches): status 75 (EX_TEMPFAIL), one line that says where the
    state is and how to continue, no traceback; the pass's log lines reach stderr, jax's TPU probing does not."""
    from vitsparse_jax.runtime.workdir import Workdir

    args = ["--config.data.num_images=16", "--config.data.batch_size=8", "--config.ablation.stop_after_batches=1"]
    proc = python_m("vitsparse_jax.main", *main_argv("ablate", args, tmp_path))
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    state = tmp_path / "run" / VIT
    assert last.startswith("stopped (stop_after_batches) at image 8 of 16") and str(state) in last, last
    assert "run the same command again to continue" in last
    assert "images 0..16 of 16" in proc.stderr                              # absl's log, on stderr
    assert "libtpu" not in proc.stderr and "Unable to initialize backend" not in proc.stderr
    assert Workdir(state).load_state()[1]["next_index"] == 8
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_workdir_in_use_is_refused_naming_the_holder(tmp_path):
    from vitsparse_jax.runtime.workdir import Workdir

    with Workdir(tmp_path / "run").lock("the first run"):
        proc = run_cli("sparsity", [], tmp_path)
    assert_user_error(proc, ["in use by another run", f"pid {os.getpid()}", "the first run", "--config.workdir"],
                      [tmp_path / "run"])


# --- the converter ------------------------------------------------------------------------------------------

def convert(tmp_path: Path, *args: str) -> Finished:
    """`python -m checkpoints_convert <args>`, in this process."""
    from checkpoints_convert.__main__ import main as convert_main

    return in_process(convert_main, list(args))


def _bad_pth(t: Path) -> Path:
    (t / "model.pth").write_bytes(b"PK\3\4 not a torch file")
    return t / "model.pth"


def _bad_safetensors(t: Path) -> Path:
    (t / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": ")
    return t / "model.safetensors"


CONVERTER_CASES = [
    ("missing file", lambda t: ["--model", "vit_tiny_patch16_224", "--from-file", str(t / "nope.pth"),
                                "--out", str(t / "out")], ["nope.pth", "does not exist"]),
    ("damaged .pth", lambda t: ["--model", "vit_tiny_patch16_224", "--from-file", str(_bad_pth(t)),
                                "--out", str(t / "out")], ["model.pth", "again"]),
    ("damaged .safetensors", lambda t: ["--model", "vit_tiny_patch16_224", "--from-file", str(_bad_safetensors(t)),
                                        "--out", str(t / "out")], ["model.safetensors", "again"]),
    ("unknown model", lambda t: ["--model", "vit_tiny_patch16_2244", "--from-file", str(_bad_pth(t)),
                                 "--out", str(t / "out")], ["vit_tiny_patch16_2244", "vit_tiny_patch16_224"]),
    ("offline hub", lambda t: ["--model", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--out", str(t / "out")],
     ["vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--from-file"]),
]


@pytest.mark.parametrize("name, args, expected", CONVERTER_CASES, ids=[c[0] for c in CONVERTER_CASES])
def test_converter_user_errors(tmp_path, monkeypatch, name, args, expected):
    from vitsparse_jax.weights import hub

    monkeypatch.setattr(hub, "offline", lambda: True)   # HF_HUB_OFFLINE=1 (read once, at import) in this process
    proc = convert(tmp_path, *args(tmp_path))
    assert_user_error(proc, expected, [tmp_path / "out"])
