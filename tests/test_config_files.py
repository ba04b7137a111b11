"""`--config` from any folder (vitsparse_jax/runtime/config_files.py): a shipped config by name or as the checkout
spells it, the checkout's file first where the current folder has one, a path as it is, and errors that suggest a
config that works. In-process (`main.cli`), with --show_config: nothing is computed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from vitsparse_jax.main import cli
from vitsparse_jax.runtime import config_files

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def _header(out: str) -> str:
    """The config file --show_config names on its first line."""
    return re.match(r"# (.+?\.py)", out).group(1)


def test_the_shipped_configs_are_the_checkouts_files():
    """One copy: the installed `vitsparse_jax.configs` (an editable install or this source tree) is configs/."""
    assert config_files.shipped_names() == SHIPPED
    assert {"ablate", "sparsity", "receptive_field", "train"} <= set(SHIPPED)
    assert config_files.shipped_dir().samefile(ROOT / "configs")


@pytest.mark.parametrize("spec", ["ablate", "ablate.py", "configs/ablate.py", "ablate:paper",
                                  "configs/ablate.py:paper"])
def test_a_shipped_config_is_found_from_a_folder_without_configs(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, arg = config_files.split(config_files.resolve(spec))
    assert Path(path).samefile(ROOT / "configs" / "ablate.py") and arg == ("paper" if ":" in spec else None)


def test_show_config_by_name_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["vitsparse_jax.main", "--config", "ablate:paper", "--config.seed=3", "--show_config"]) == 0
    out = capsys.readouterr().out
    assert Path(_header(out)).samefile(ROOT / "configs" / "ablate.py") and "(preset 'paper')" in out
    assert re.search(r"^\*seed = 3 ", out, re.M)                 # the overrides still apply
    assert "a relative path is under the current directory" in out   # where runs/ goes


def test_the_current_folders_configs_win(tmp_path, monkeypatch, capsys):
    """A checkout (or any folder with configs/ablate.py): its file, not the installed one."""
    (tmp_path / "configs").mkdir()
    own = (ROOT / "configs" / "ablate.py").read_text().replace("ab.draws = 3 ", "ab.draws = 7 ")
    assert own != (ROOT / "configs" / "ablate.py").read_text()
    (tmp_path / "configs" / "ablate.py").write_text(own)
    monkeypatch.chdir(tmp_path)
    for spec in ("ablate", "configs/ablate.py"):
        assert cli(["vitsparse_jax.main", f"--config={spec}", "--show_config"]) == 0
        out = capsys.readouterr().out
        assert _header(out) == "configs/ablate.py" and re.search(r"^ ablation\.draws = 7 ", out, re.M), spec


def test_a_path_is_used_as_it_is(tmp_path, monkeypatch):
    mine = tmp_path / "elsewhere" / "ablate.py"
    mine.parent.mkdir()
    mine.write_text("")
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve(f"{mine}:paper") == f"{mine}:paper"
    assert config_files.resolve("elsewhere/ablate.py") == "elsewhere/ablate.py"
    assert config_files.resolve("nowhere/ablate.py") == "nowhere/ablate.py"   # not a shipped name: fails to load
    argv = config_files.resolve_argv(["p", "--config", "ablate", "--config.seed=1"])
    assert argv[0] == "p" and argv[2] == "--config.seed=1" and Path(argv[1].split("=")[1]).name == "ablate.py"


@pytest.mark.parametrize("argv", [["--config=ablat"], ["--config=configs/nope.py:paper"], []],
                         ids=["misspelt", "missing file", "no config"])
def test_a_config_error_suggests_a_config_that_works(argv, tmp_path, monkeypatch, capsys):
    """The message lists the shipped names and an example; the example it gives runs from the same folder."""
    monkeypatch.chdir(tmp_path)
    assert cli(["vitsparse_jax.main", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert ", ".join(SHIPPED) in err and "configs/ablate.py" not in err
    suggested = re.findall(r"(--config=\S+?)[;)]", err)
    assert suggested == ["--config=ablate", "--config=ablate:paper"], err
    for flag in suggested:
        assert cli(["vitsparse_jax.main", flag, "--show_config"]) == 0, flag
    capsys.readouterr()
