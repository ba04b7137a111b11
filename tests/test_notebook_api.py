"""The Python API as a notebook user meets it: a loaded model prints as one line, `m.apply` is jitted and
compiled once per static arguments, `weights.list_models(filter, pretrained=True)` is timm's list for the archs
the package has, a tag's pretrained_cfg keeps timm's hf_hub_id / license / classifier, and the package ships
an image to try things on."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import data, models
from vitsparse_jax.weights import list_models, load_model, loading, pretrained, safetensors_io

CAPTURE = "blocks.*.attn.probs"


@pytest.fixture(scope="module")
def pico():
    return load_model("vit_pico_patch4_32", weights="builtin")


def test_a_loaded_model_prints_as_one_short_line(pico):
    """Was the dataclass's repr of every variable (108,763 characters for this model)."""
    text = repr(pico)
    stored = safetensors_io.read(pico.weights)       # the checkpoint file, counted without the package's tree
    n = sum(math.prod(a.shape) for k, a in stored.items() if k.startswith("params/"))
    assert text == str(pico) and "\n" not in text and len(text) < 250, text
    assert text.startswith("LoadedModel(vit_pico_patch4_32.digits: vit, ")
    assert f"{n:,} parameters" in text and "32 px" in text and "10 classes" in text
    assert f"weights: builtin {pico.weights}" in text
    untrained = load_model("vit_pico_patch4_32", weights="untrained", seed=3)
    assert repr(untrained).endswith("weights: untrained (seed 3))")


def test_parameters_are_counted_as_timm_counts_them():
    """timm's count of the same model (untrained, one block, DINO's headless tag)."""
    timm = pytest.importorskip("timm")
    ours = load_model("vit_small_patch16_224.dino", weights="untrained", depth=1, img_size=32)
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1, img_size=32)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert f"{ours.num_params() / 1e6:.1f}M parameters" in repr(ours) and "headless" in repr(ours)


def test_apply_is_jitted_once_per_static_arguments(pico):
    x = data.load_images([data.example_image()], pico.pretrained_cfg)
    eager, eager_aux = pico.module.apply(pico.variables, x, capture=(CAPTURE,))
    jitted = loading._jitted_apply(pico.module)      # shared by every LoadedModel of this module (other tests')
    logits, aux = pico.apply(x, capture=CAPTURE)
    compiled = jitted._cache_size()
    for capture in ([CAPTURE], (CAPTURE,)):          # one pattern, a list or a tuple: the same program
        pico.apply(x, capture=capture)
    assert jitted._cache_size() == compiled
    np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-5)
    assert list(aux) == list(eager_aux) == [f"blocks.{i}.attn.probs" for i in range(6)]
    site = pico.info.ablation_sites[-1]
    for drop in (1, 2):                                # another mask value: no new program
        keep = jnp.ones((1, 65)).at[0, drop].set(0.0)
        dropped, _ = pico.apply(x, masks={site: keep})
        assert not np.allclose(dropped, logits)
        compiled = jitted._cache_size() if drop == 1 else compiled
    assert jitted._cache_size() == compiled
    assert loading._jitted_apply(load_model("vit_pico_patch4_32", weights="builtin").module) is jitted   # cached


def test_list_models_with_tags_is_timms_list_for_our_archs():
    timm = pytest.importorskip("timm")
    ours = set(models.list_models())
    expected = {n for n in timm.list_models(pretrained=True) if n.split(".")[0] in ours}
    builtin = {"vit_pico_patch4_32.digits", "vgg_pico.digits"}          # the shipped checkpoints
    assert set(list_models(pretrained=True)) == expected | builtin
    for pattern in ("vit_small_patch16_224", "deit_*distilled*", "resnet5*.tv*"):
        assert list_models(pattern, pretrained=True) == timm.list_models(pattern, pretrained=True), pattern
    assert list_models(["vgg1?", "*pico*"]) == ["resnet_pico", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_pico",
                                                "vit_pico_patch4_32"]


def test_a_tags_pretrained_cfg_keeps_timms_hub_id_license_and_classifier():
    timm = pytest.importorskip("timm")
    name = "vit_small_patch16_224.dino"
    theirs = timm.models.get_pretrained_cfg(name)
    for cfg in (load_model(name, weights="untrained", depth=1, img_size=32).pretrained_cfg,
                # a hub config.json (timm writes it without hf_hub_id): the table gives the repository
                pretrained.resolve_cfg("vit_small_patch16_224", "dino",
                                       {"num_classes": 0, "pretrained_cfg": {"tag": "dino", "license": "x"}})):
        assert cfg["hf_hub_id"] == theirs.hf_hub_id == f"timm/{name}"
        assert cfg["classifier"] == theirs.classifier
    assert load_model(name, weights="untrained", depth=1, img_size=32).pretrained_cfg["license"] == theirs.license
    builtin = load_model("vgg_pico", weights="builtin").pretrained_cfg
    assert "hf_hub_id" not in builtin                                  # no hub for the project's own models


def test_the_example_image_is_shipped_and_loads():
    path = data.example_image()
    assert path.is_file() and path.parent.name == "images" and (path.parent / "README.md").is_file()
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (512, 600)
    cfg = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic"}
    x = data.load_images([path], cfg)
    assert x.shape == (1, 224, 224, 3) and float(x.std()) > 0.1       # a photo, not a blank
