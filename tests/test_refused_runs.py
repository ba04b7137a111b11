"""What a refused or stopped run leaves behind (issue 23, point 5), through the real command line in-process.

A run refused for a user error at a workdir path that did not exist creates nothing there: no folder, no
`.lock`, no parent folder. A run stopped before its first batch says that nothing was saved (not "the state
is saved") and leaves nothing at a new path either.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import main
from vitsparse_jax.data import DigitsSource

SMALL = ["--config.progress=False", "--config.data.num_images=8", "--config.data.batch_size=4",
         "--config.ablation.p=0.1", "--config.ablation.n=1", "--config.ablation.draws=1",
         "--config.ablation.bootstrap=10"]


def unreadable(tmp: Path) -> list[str]:
    folder = tmp / "bad" / "0"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"\x89PNG but not really")
    return ["--config.data.source=folder", f"--config.data.folder={tmp / 'bad'}", "--config.data.num_images=0"]


def labelled_folder(tmp: Path) -> Path:
    source = DigitsSource("test")
    for i in range(4):
        folder = tmp / "imgs" / str(source.label(i))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(source.read(i).data)).save(folder / f"{i}.png")
    return tmp / "imgs"


# (id, extra arguments or a function tmp -> arguments, words of the message)
REFUSALS: list[tuple[str, "list[str] | Callable[[Path], list[str]]", list[str]]] = [
    ("unknown model", ["--config.model=vit_pico_patch4_23"], ["vit_pico_patch4_23"]),
    ("p out of range", ["--config.ablation.p=1.5"], ["p must lie in"]),
    ("missing image folder", ["--config.data.source=folder", "--config.data.folder=/nonexistent/imgs"],
     ["/nonexistent/imgs"]),
    ("batch size not a multiple of the devices", ["--config.data.batch_size=6"], ["batch_size=6"]),
    ("missing weights file", ["--config.weights=/nonexistent/w.safetensors"], ["/nonexistent/w.safetensors"]),
    ("no readable image", unreadable, ["none of the 3 images", "could be read"]),
    ("unlabelled images for the ablation", lambda t: ["--config.data.source=images",
                                                      f"--config.data.folder={labelled_folder(t) / '0'}"],
     ["labelled"]),
]


@pytest.mark.parametrize("name, args, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_run_creates_nothing_at_a_new_workdir_path(tmp_path, capsys, name, args, words):
    args = args(tmp_path) if callable(args) else args
    new = tmp_path / "new"                                   # neither it nor its child exist
    status = main.cli(["vitsparse_jax.main", "--config=configs/ablate.py", f"--config.workdir={new / 'run'}",
                       *SMALL, *args])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err and all(w in err for w in words), err[-3000:]
    assert not new.exists(), sorted(str(p) for p in new.rglob("*"))   # no folder, no .lock, no parent


def test_a_stop_before_the_first_batch_says_nothing_was_saved_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from vitsparse_jax.runtime import stopping
    from vitsparse_jax.weights import loading

    original = loading.load_model

    def load_then_sigterm(*args, **kwargs):   # a SIGTERM while the model is loaded (before the pass)
        stopping.request(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", load_then_sigterm)
    new = tmp_path / "new"
    status = main.cli(["vitsparse_jax.main", "--config=configs/ablate.py", f"--config.workdir={new / 'run'}",
                       *SMALL])
    err = capsys.readouterr().err
    assert status == 143, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped (SIGTERM) before the first image") and "nothing" in line, line
    assert "state is saved" not in err and "Traceback" not in err
    assert not new.exists(), sorted(str(p) for p in new.rglob("*"))
