"""The README runs as written: its Python example (on the built-in model and the image shipped with the
package, from an empty folder), and every command line of its bash blocks resolves its config (by name, from
any folder) and the weights of every model it names (built-in, converted, the Hugging Face hub or untrained)
without downloading anything; its pip commands install the package or the pinned CPU torch."""
import re
import shlex
from pathlib import Path

import pytest

from vitsparse_jax import models
from vitsparse_jax.runtime import config_files
from vitsparse_jax.weights import loading, pretrained

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_attention_example_runs(tmp_path, monkeypatch, capsys):
    """From an empty folder: the example needs no file of its own (a missing digit.png failed here), and the
    loaded model prints as one short line."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("top-3 patch columns") == 6 and "predicted class:" in out
    first = out.splitlines()[0]
    assert first.startswith("LoadedModel(vit_pico_patch4_32.digits: vit, ") and len(first) < 250, first


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
    """The config that `python -m vitsparse_jax.main <argv>` runs with (only its --config flags; the config
    file found as the command finds it)."""
    from absl import flags
    from ml_collections import config_flags

    args = config_files.resolve_argv(["main", *[a for a in argv if a.startswith("--config")]])
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


def convert_pins() -> dict[str, str]:
    """The exact versions the `convert` extra of pyproject.toml pins (torch, torchvision)."""
    extra = re.search(r"^convert = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    return dict(re.findall(r'"([\w-]+)==([^"]+)"', extra))


@pytest.mark.parametrize("argv", readme_commands(README.read_text()), ids=lambda argv: " ".join(argv)[:90])
def test_readme_command_resolves_its_weights(argv, monkeypatch, tmp_path):
    """Each command's config loads (from a folder without configs/: the short names work anywhere) and every
    model's weights resolve (nothing is downloaded); a README command whose weights cannot be found fails here."""
    monkeypatch.chdir(tmp_path)
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
    elif argv[:2] == ["pip", "install"] and "--index-url" in argv:   # the CPU torch: the convert extra's pins
        assert argv[argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
        pins = dict(a.split("==") for a in argv if "==" in a)
        assert pins == convert_pins(), (pins, convert_pins())
    elif argv[:2] == ["pip", "install"]:                     # the package itself, with extras or not
        assert all(a.startswith(("-", ".", '".', "jax[")) for a in argv[2:]), argv
    elif argv[:3] == ["python", "-m", "pytest"]:
        pass
    else:
        pytest.fail(f"README command {' '.join(argv)!r} is not checked by tests/test_readme.py")
