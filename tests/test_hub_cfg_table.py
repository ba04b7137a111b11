"""The shipped table of timm's pretrained cfgs (vitsparse_jax/weights/pretrained_cfgs.json) against timm's
registry: every registered timm architecture is in it, and every row equals timm's cfg of that tag.
Regenerate it with `python -m checkpoints_convert.make_cfg_table` after adding models."""
from __future__ import annotations

import json
import warnings

import pytest

timm = pytest.importorskip("timm")

from checkpoints_convert import make_cfg_table  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.weights import pretrained  # noqa: E402

REGENERATE = "regenerate it: python -m checkpoints_convert.make_cfg_table"


def test_every_registered_timm_arch_is_in_the_table():
    shipped = pretrained.table()["models"]
    missing = [a for a in models.list_models() if timm.models.get_arch_pretrained_cfgs(a) and a not in shipped]
    assert not missing, f"archs missing from {pretrained.TABLE_PATH.name}: {missing}; {REGENERATE}"
    unknown = sorted(set(shipped) - set(models.list_models()))
    assert not unknown, f"the table lists archs that vitsparse_jax.models does not register: {unknown}; {REGENERATE}"


def test_table_rows_equal_timms_registry():
    shipped = pretrained.table()["models"]
    fresh = make_cfg_table.build_table(sorted(shipped))["models"]
    for arch, entry in shipped.items():
        assert entry["default_tag"] == fresh[arch]["default_tag"], (arch, REGENERATE)
        for tag, row in entry["tags"].items():
            assert tag in fresh[arch]["tags"], f"timm no longer knows {arch}.{tag}; {REGENERATE}"
            assert row == fresh[arch]["tags"][tag], (f"{arch}.{tag}", REGENERATE)
        new = [t for t in fresh[arch]["tags"] if t not in entry["tags"]]
        if new:
            message = f"timm {timm.__version__} knows tags of {arch} that the table lacks: {new}; {REGENERATE}"
            if timm.__version__ == pretrained.table()["timm_version"]:
                pytest.fail(message)
            warnings.warn(message)   # a newer timm than the table's: not an error


def test_the_file_is_the_scripts_formatting():
    text = pretrained.TABLE_PATH.read_text()
    assert make_cfg_table.dumps(json.loads(text)) == text, REGENERATE


def test_table_cfgs_are_complete_and_in_the_order_of_precedence():
    for arch, entry in pretrained.table()["models"].items():
        assert entry["default_tag"] == next(iter(entry["tags"])), arch      # default first (timm's order)
        for tag, row in entry["tags"].items():
            cfg = pretrained.table_cfg(arch, tag)
            assert {"input_size", "crop_pct", "interpolation", "mean", "std", "num_classes", "tag"} <= set(cfg), \
                f"{arch}.{tag}"
    hub_config = {"num_classes": 7, "pretrained_cfg": {"tag": "dino", "crop_pct": 0.5, "input_size": [3, 224, 224],
                                                        "mean": [0, 0, 0], "std": [1, 1, 1]}}
    cfg = pretrained.resolve_cfg("vit_small_patch16_224", "dino", hub_config)
    assert cfg["crop_pct"] == 0.5 and cfg["num_classes"] == 7                          # config.json first
    assert pretrained.resolve_cfg("vit_small_patch16_224", "dino")["num_classes"] == 0     # then the table
    assert pretrained.resolve_cfg("vit_pico_patch4_32", None)["input_size"] == [3, 32, 32]  # then the arch's
