"""Where `--config=...` finds its file, from any directory and after a normal (non-editable) install.

The config files live in one place, the checkout's `configs/` folder, which the wheel installs as the
package `vitsparse_jax.configs` (setup.py maps one onto the other). `--config` takes

- a path to a file that exists (`--config=my_configs/ablate_big.py`, `--config=configs/ablate.py:paper`):
  used as it is;
- the name of a shipped config, short (`ablate`, `ablate:paper`) or as the checkout spells it
  (`ablate.py`, `configs/ablate.py[:preset]`): `./configs/<name>.py` when the current directory has it (a
  checkout's file wins, edited or not), else the installed `vitsparse_jax/configs/<name>.py`.

Anything else is left as it is, and fails to load with a message listing the shipped names
(`main._parse_flags`). `resolve_argv` rewrites the `--config` value of a command line before absl parses it.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Sequence

PACKAGE = "vitsparse_jax.configs"      # configs/, as the installed package names it
LOCAL_DIR = "configs"                  # a checkout's folder, relative to the current directory
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def shipped_dir() -> Path | None:
    """The folder of the installed config files: `vitsparse_jax.configs` (wheel or editable install), else
    the `configs/` beside the package in a source tree used without installing it; None when neither exists."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    beside = Path(__file__).resolve().parents[2] / LOCAL_DIR    # <source tree>/configs next to vitsparse_jax/
    return beside if (beside / "__init__.py").is_file() else None


def shipped_names() -> list[str]:
    """The names of the shipped configs ('ablate', 'receptive_field', 'sparsity', 'train')."""
    folder = shipped_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def split(spec: str) -> tuple[str, str | None]:
    """'ablate:paper' -> ('ablate', 'paper'), 'configs/ablate.py:paper' -> ('configs/ablate.py', 'paper');
    a colon elsewhere (not after a '.py' path or a bare name) is left in the path."""
    head, sep, arg = spec.partition(":")
    if sep and (head.endswith(".py") or _NAME.match(head)):
        return head, arg
    return spec, None


def _shipped_name(path: str) -> str | None:
    """'ablate', 'ablate.py' or 'configs/ablate.py' -> 'ablate' (a shipped config's name), else None."""
    p = Path(path)
    if p.suffix == ".py" and p.parent in (Path("."), Path(LOCAL_DIR)):
        name = p.stem
    elif _NAME.match(path):
        name = path
    else:
        return None
    return name if name in shipped_names() else None


def resolve(spec: str) -> str:
    """The `--config` value with its file made one that exists (see the module docstring); the preset kept."""
    path, arg = split(spec)
    suffix = "" if arg is None else f":{arg}"
    if Path(os.path.expanduser(path)).is_file():
        return os.path.expanduser(path) + suffix
    name = _shipped_name(path)
    if name is None:
        return spec                    # not a shipped config: loading it fails with the list of names
    local = Path(LOCAL_DIR) / f"{name}.py"
    chosen = local if local.is_file() else shipped_dir() / f"{name}.py"
    return f"{chosen}{suffix}"


def resolve_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of `--config=X` (or `--config X`, made `--config=X`) resolved; every other
    argument unchanged."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config="):
            out.append("--config=" + resolve(arg.split("=", 1)[1]))
        elif arg == "--config" and i + 1 < len(argv):
            out.append("--config=" + resolve(argv[i + 1]))
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def usage_hint() -> str:
    """How to name a config, for error messages: the shipped names and the preset syntax."""
    names = shipped_names()
    listed = ", ".join(names) if names else "none found (is vitsparse_jax installed?)"
    return (f"Give a config file's path, or a shipped config by name: {listed} (e.g. --config=ablate; a "
            "preset after a colon: --config=ablate:paper)")
