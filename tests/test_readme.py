"""The README runs as written: its Python example (on the built-in model and a digit image), and every
command line of its bash blocks resolves its config and the weights of every model it names (built-in,
converted, the Hugging Face hub or untrained) without downloading anything."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import models
from vitsparse_jax.data import DigitsSource, decode_image
from vitsparse_jax.weights import loading, pretrained

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_attention_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    digit = decode_image(DigitsSource("test").read(0).data)
    Image.fromarray(np.asarray(digit)).save(tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("top-3 patch columns") == 6 and "predicted class:" in out


# --- the command lines ---------------------------------------------------------------------------------------

def readme_commands(text: str) -> list[list[str]]:
    """Every command of the README's bash blocks as argv lists (continuations joined, comments and `...`
    placeholders dropped, `a && b` split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in shlex.split(line, comments=True) if w != "..."]
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in commands if c]


def experiment_config(argv: list[str]):
    """The config that `python -m vitsparse_jax.main <argv>` runs with (only its --config flags)."""
    from absl import flags
    from ml_collections import config_flags

    args = ["main", *[a for a in argv if a.startswith("--config")]]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=args)
    fv(args)
    return fv.config


def model_weights(config) -> list[tuple[str, str]]:
    """(model name, weights) of every model the run loads."""
    section = config.get(config.experiment.replace("ablate", "ablation"))
    listed = getattr(section, "models", "") if section is not None else ""
    names = [n.strip() for n in listed.split(",") if n.strip()] if listed else [config.model]
    variants = getattr(section, "variants", "trained") if section is not None else "trained"
    pairs = [(n, config.weights) for n in names]
    if "untrained" in variants:
        pairs += [(n, loading.UNTRAINED) for n in names]
    return pairs


def test_readme_has_the_one_step_real_model_commands():
    text = README.read_text()
    commands = readme_commands(text)
    mains = [c for c in commands if c[:3] == ["python", "-m", "vitsparse_jax.main"]]
    assert len(mains) >= 6
    assert any(a.startswith("--config.model=") and "." in a.split("=", 1)[1] for c in mains for a in c)
    assert not any(a.startswith("--config.checkpoint_dir") for c in mains for a in c), \
        "real models need no converted checkpoints"
    assert any(c[:3] == ["python", "-m", "checkpoints_convert"] and "--from-file" in c for c in commands)


@pytest.mark.parametrize("argv", readme_commands(README.read_text()), ids=lambda argv: " ".join(argv)[:90])
def test_readme_command_resolves_its_weights(argv, monkeypatch):
    """Each command's config loads and every model's weights resolve (nothing is downloaded); a README command
    whose weights cannot be found fails here."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("vitsparse_jax.weights.hub.offline", lambda: False)   # resolving only: no cache check
    if argv[:3] == ["python", "-m", "vitsparse_jax.main"]:
        config = experiment_config(argv[3:])
        pairs = model_weights(config)
        assert pairs
        for name, weights in pairs:
            src = loading.resolve_weights(name, weights, config.checkpoint_dir)
            assert src.kind in (loading.BUILTIN, loading.HUB, loading.UNTRAINED, loading.CHECKPOINT_DIR), src
            if src.kind == loading.HUB:
                assert src.tag in pretrained.known_tags(src.arch) and pretrained.has_hub_weights(src.arch, src.tag)
        if config.experiment == "receptive_field" and config.receptive_field.checkpoints:
            return   # the training series: files written by the train command of the README
    elif argv[:3] == ["python", "-m", "checkpoints_convert"]:
        from checkpoints_convert.__main__ import build_parser

        args = build_parser().parse_args(argv[3:])
        arch, tag = models.split_name(args.model)
        models.create_model(arch)
        if tag:
            pretrained.check_tag(arch, tag)
        if args.from_file is None:
            loading.resolve_weights(args.model, loading.HUB)
    elif argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        assert argv[0] != "pip" or "-e" in argv
    else:
        pytest.fail(f"README command {' '.join(argv)!r} is not checked by tests/test_readme.py")
