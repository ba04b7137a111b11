"""The command line as a user meets it: --show_config (every field, its value and help), --dry_run, `~` and
environment variables in path fields (runs and the converter), the line that ends a run, the sanity
warnings, no TPU probing noise, and a finished run started again.

The command line runs in this process (`vitsparse_jax.main.cli`, as `python -m vitsparse_jax.main` does in its
own); its log lines are read through `caplog`. The process-level contract (exit statuses, tracebacks, log
lines and no TPU probing on stderr) is tested in a fresh interpreter by tests/test_bad_inputs.py and
tests/test_multihost_stop.py."""
import importlib.util
import json
import logging
import re
import shlex
from pathlib import Path

import ml_collections
import pytest

from vitsparse_jax import main
from vitsparse_jax.experiments import sanity
from vitsparse_jax.runtime import config_defaults, config_help

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"configs/ablate.py": (None, "paper"), "configs/sparsity.py": (None, "vgg", "paper", "paper_quirk"),
           "configs/receptive_field.py": (None, "paper", "training"), "configs/train.py": (None, "vgg", "resnet")}


def _config(path: str, arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("cfg_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m vitsparse_jax.main <args>` in this process: (exit status, stdout, stderr)."""
    status = main.cli(["vitsparse_jax.main", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def at_root(monkeypatch):
    """The repository as the current directory (the commands name configs/*.py relative to it)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("VITSPARSE_JAX_VERBOSE", raising=False)


@pytest.mark.parametrize("path,arg", [(p, a) for p, args in PRESETS.items() for a in args])
def test_every_config_field_has_help(path, arg):
    config = _config(path, arg)
    spec = f"{path}:{arg}" if arg else path
    assert config_help.missing_help(config, str(ROOT / spec)) == []
    text = config_help.describe_config(config, str(ROOT / spec))
    for name, value in config_help.flatten(config).items():
        assert f" {name} = " in text


def test_help_follows_sections_and_first_comment():
    helps = config_help.field_help(ROOT / "configs/ablate.py")
    assert helps["ablation.draws"].startswith("random draws per image")
    assert helps["data.batch_size"].startswith("global batch size")             # from config_defaults.py
    assert helps["distributed.coordinator"].startswith("'host:port'")
    rf = config_help.field_help(ROOT / "configs/receptive_field.py")
    assert "stage output + the four ViT sub-stages" in rf["receptive_field.layers"]   # a continued comment
    assert rf["data.num_images"] == helps["data.num_images"]                          # not the override's note
    sp = config_help.field_help(ROOT / "configs/sparsity.py")
    assert sp["sparsity.top_by"].startswith("Fig. 3b")                                # a section built by a function


def test_show_config_lists_values_and_overrides(tmp_path, capsys, monkeypatch, at_root):
    monkeypatch.setenv("HOME", str(tmp_path))
    status, stdout, stderr = _main(capsys, "--config=configs/ablate.py", "--config.seed=7",
                                   "--config.data.folder=~/imgs", "--show_config")
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert any(line.startswith("*seed = 7") and "# seeds" in line for line in lines)
    assert any(line.startswith(f"*data.folder = '{tmp_path}/imgs'") for line in lines)   # `~` expanded
    assert any(line.startswith(" ablation.p = (0.05, 0.1, 0.2, 0.3)") for line in lines)
    assert "Unable to initialize backend" not in stderr


def test_dry_run_says_what_would_run_and_writes_nothing(tmp_path, capsys, at_root):
    workdir = tmp_path / "run"
    status, text, stderr = _main(capsys, "--config=configs/ablate.py", f"--config.workdir={workdir}", "--dry_run")
    assert status == 0, stderr
    assert "vit_pico_patch4_32" in text and "built-in checkpoint" in text
    assert "400 images" in text and "10 classes" in text
    assert "total: 400 clean forward passes and 20,400 partial (ablated) passes over 400 images" in text
    assert not workdir.exists()
    assert "libtpu" not in stderr and "Unable to initialize backend" not in stderr


def test_expand_config_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA_ROOT", "/datasets")
    config = _config("configs/receptive_field.py", None)
    config.workdir = "~/runs/rf"
    config.checkpoint_dir = "$DATA_ROOT/ckpt"
    config.data.folder = "${DATA_ROOT}/imagenet/val"
    config.data.cache_dir = "gs://bucket/cache"
    config.receptive_field.checkpoints = "~/a.safetensors, $DATA_ROOT/b.safetensors"
    config_defaults.expand_config_paths(config)
    assert config.workdir == f"{tmp_path}/runs/rf"
    assert config.checkpoint_dir == "/datasets/ckpt"
    assert config.data.folder == "/datasets/imagenet/val"
    assert config.data.cache_dir == "gs://bucket/cache"
    assert config.receptive_field.checkpoints == f"{tmp_path}/a.safetensors,/datasets/b.safetensors"
    assert config.weights == "auto" or "~" not in config.weights


def test_data_source_expands_the_folder(tmp_path, monkeypatch):
    from PIL import Image

    from vitsparse_jax import data

    (tmp_path / "imgs" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "n01440764" / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_defaults.data_config(source="folder", folder="~/imgs")
    assert len(data.make_eval_source(cfg)) == 1


def test_converter_expands_its_paths(tmp_path, monkeypatch):
    import checkpoints_convert.__main__ as cli

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.pth").write_bytes(b"")
    seen = {}

    def fake_convert(model, out, from_file=None, num_classes=None, cache_dir=None):
        seen.update(out=out, from_file=from_file, cache_dir=cache_dir)
        return Path(out) / f"{model}.safetensors"

    monkeypatch.setattr(cli, "convert", fake_convert)
    assert cli.main(["--model", "resnet50.tv_in1k", "--from-file", "~/w.pth", "--out", "~/ckpt",
                     "--cache-dir", "$HOME/hf"]) == 0
    assert seen == {"out": f"{tmp_path}/ckpt", "from_file": f"{tmp_path}/w.pth", "cache_dir": f"{tmp_path}/hf"}


def test_sanity_provenance_and_warnings(tmp_path):
    untrained = {"weights": "untrained (seed 0)", "source": "untrained"}
    assert sanity.provenance(untrained)["kind"] == sanity.UNTRAINED
    assert "untrained" in sanity.weights_warnings("m", untrained)[0]
    assert sanity.weights_warnings("m", untrained, expect_trained=False) == []
    hub = {"weights": "/cache/x.safetensors", "source": "hf-hub:timm/vit_base_patch16_224.augreg_in21k@abc"}
    assert sanity.provenance(hub) == {"kind": "hub", "trained": True, "detail": hub["source"]}
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "m.json").write_text(json.dumps({"source": "file:/data/resnet50.pth"}))
    converted = sanity.provenance({"weights": str(tmp_path / "m.safetensors"), "source": "checkpoint_dir"})
    assert converted["kind"] == "converted" and "/data/resnet50.pth" in converted["detail"]
    unknown = {"weights": str(tmp_path / "n.safetensors"), "source": "file"}
    assert sanity.provenance(unknown)["trained"] is None and sanity.weights_warnings("m", unknown)
    assert sanity.chance_warning("m", 0.11, 400, 10) and not sanity.chance_warning("m", 0.98, 400, 10)
    assert sanity.label_space_warning("m", 10, 1000) and not sanity.label_space_warning("m", 1000, 1000)


def test_a_run_ends_with_its_files_warns_and_says_when_complete(tmp_path, capsys, caplog, monkeypatch, at_root):
    """A tiny ablation with untrained weights, its workdir under `~`: the last line names the report and the
    results, report.md and the log warn (untrained, A0 at chance), jax's TPU probing is silent (in a fresh
    interpreter too: tests/test_bad_inputs.py, status 75), and the same command again says that the run is
    complete."""
    args = ("--config=configs/ablate.py", "--config.workdir=~/runs/tiny", "--config.weights=untrained",
            "--config.data.num_images=16", "--config.data.batch_size=8", "--config.ablation.p=0.1",
            "--config.ablation.n=1", "--config.ablation.draws=1", "--config.ablation.bootstrap=20",
            "--config.ablation.whole_layer_reference=False", "--config.progress=False")
    monkeypatch.setenv("HOME", str(tmp_path))
    caplog.set_level(logging.INFO)                          # the run's log (python -m prints it on stderr)
    status, stdout, stderr = _main(capsys, *args)
    assert status == 0, stderr[-3000:]
    log = stderr + caplog.text
    assert "images 0..16 of 16" in log                      # the log is seen: the checks below can fail
    workdir = tmp_path / "runs" / "tiny"
    last = stdout.strip().splitlines()[-1]
    assert last == (f"report: {workdir}/report.html, report.md; "
                    f"results: {workdir}/results.json, results.csv, tables.md")
    assert "libtpu" not in log and "Unable to initialize backend" not in log
    assert "pruned" not in log                              # fontTools' subsetting INFO lines
    report = (workdir / "report.md").read_text()
    assert "## Warnings" in report and "untrained" in report and "not above chance" in report
    assert "the weights are untrained" in log and "not above chance" in log
    results = json.loads((workdir / "results.json").read_text())
    assert results["models"][0]["provenance"]["kind"] == "untrained" and len(results["warnings"]) >= 2

    status, stdout, stderr = _main(capsys, *args)
    assert status == 0, stderr[-3000:]
    assert "complete" in (stdout + stderr)
    assert stdout.strip().splitlines()[-1] == last


def _readme_inspection_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.startswith("python -m vitsparse_jax.main") and ("--show_config" in line or "--dry_run" in line)]


def test_readme_points_to_show_config_and_dry_run():
    text = (ROOT / "README.md").read_text()
    assert "--show_config" in text and "--dry_run" in text and "--helpfull" in text
    assert len(_readme_inspection_commands()) == 2


@pytest.mark.parametrize("command", _readme_inspection_commands())
def test_readme_inspection_commands_run(command, tmp_path, capsys, at_root):
    args = shlex.split(command)[3:]          # after 'python -m vitsparse_jax.main'
    status, stdout, stderr = _main(capsys, *args, "--config.workdir=" + str(tmp_path / "never"))
    assert status == 0, stderr[-2000:]
    assert not (tmp_path / "never").exists()
    if "--dry_run" in command:
        assert "dry run of experiment" in stdout and "weights:" in stdout
    else:
        assert "# ablation" in stdout and " ablation.p = " in stdout
