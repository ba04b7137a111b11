"""docs/api.md runs as written, and the API it promises: aux in forward order (also under jit), the eval
transform on a path / PIL image / bytes, one-call normalised batches from files, batches without a mesh."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.random_weights import zero_variables   # the order of aux does not depend on the values
from vitsparse_jax import data, models
from vitsparse_jax.data import DigitsSource, decode_image
from vitsparse_jax.weights import load_model

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)


@pytest.fixture
def digit_dir(tmp_path, monkeypatch):
    digit = decode_image(DigitsSource("test").read(0).data)
    Image.fromarray(np.asarray(digit)).save(tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


EXAMPLES = (("1. Attention maps of an image", 'capture="blocks.*.attn.probs"'),
            ("2. An ablated forward pass with a mask", "masks={last: keep}"),
            ("3. The receptive field of one layer", "jax.grad(central_sum)"))


def test_api_doc_has_the_three_examples():
    """The doc's python blocks are exactly the three examples, each under its own numbered section and doing
    what its title says (the call it is about); test_api_example_runs runs them and checks what they print."""
    sections = re.split(r"^## ", API_DOC.read_text(), flags=re.M)[1:]   # 'title\n...' of every section
    found = [(text.splitlines()[0], re.findall(r"```python\n(.*?)```", text, re.S)) for text in sections]
    with_code = [(title, blocks) for title, blocks in found if blocks]
    assert [title for title, _ in with_code] == [title for title, _ in EXAMPLES]
    for (title, blocks), (_, call) in zip(with_code, EXAMPLES):
        assert len(blocks) == 1 and call in blocks[0], title
    assert [blocks[0] for _, blocks in with_code] == _examples()          # no block outside those sections


@pytest.mark.parametrize("index", range(3))
def test_api_example_runs(index, tmp_path, monkeypatch, capsys):
    """Each example, as written, from an empty folder: it needs no file the docs do not explain."""
    monkeypatch.chdir(tmp_path)
    code = _examples()[index]
    exec(compile(code, f"docs/api.md example {index + 1}", "exec"), {"__name__": f"api_example_{index}"})
    out = capsys.readouterr().out
    if index == 0:
        names = re.findall(r"^(blocks\.\d+)\.attn\.probs", out, re.M)
        assert names == [f"blocks.{l}" for l in range(6)]              # forward order
        assert "predicted class:" in out and (tmp_path / "attention.png").stat().st_size > 0
    elif index == 1:
        dropped = re.search(r"dropped columns: \[(.*)\]", out).group(1).split(",")
        assert len(dropped) == 5 and all(int(c) >= 1 for c in dropped)   # never the class token
        assert float(re.search(r"logit change: (\S+)", out).group(1)) > 0
    else:
        r0, r1, c0, c1 = (int(v) for v in re.search(r"rows (\d+) - (\d+) cols (\d+) - (\d+)", out).groups())
        assert r0 <= 12 and r1 >= 19 and c0 <= 12 and c1 >= 19        # covers the central 2 x 2 patches (8 px)


def test_api_receptive_field_matches_the_experiment(digit_dir):
    """Example 3's gradient is the experiment's receptive-field map of the same layer and central region."""
    from vitsparse_jax.measures import gradient_fields as rf_grad
    from vitsparse_jax.measures import locality

    m = load_model("vit_pico_patch4_32", weights="builtin")
    x = data.load_images(["digit.png"], m.pretrained_cfg)
    p, (gh, gw) = m.info.num_prefix_tokens, m.info.patch_grid

    def central_sum(x):
        tokens, _ = m.module.apply(m.variables, x, stop="blocks.3")
        grid = tokens[0, p:].reshape(gh, gw, -1)
        return grid[gh // 2 - 1:gh // 2 + 1, gw // 2 - 1:gw // 2 + 1].sum()

    ours = np.asarray(jnp.abs(jax.grad(central_sum)(x))[0].sum(-1))
    fraction = 2 / gh                                                  # the central 2 x 2 of the 8 x 8 grid
    region = locality.central_region((gh, gw), fraction)
    assert (region.row0, region.row1, region.col0, region.col1) == (3, 5, 3, 5)
    layers = rf_grad.layer_specs(m.module, m.variables, m.info, ["blocks.3"], fraction, (32, 32))
    theirs = rf_grad.receptive_field_maps(m.module, m.variables, x, layers, p)[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(np.abs(theirs).max()))


def test_aux_is_in_forward_order_under_jit():
    module = models.create_model("vit_pico_patch4_32", depth=12)
    info = models.model_info(module)
    variables = zero_variables(module)
    x = jnp.zeros((1, 32, 32, 3))
    for fn in (module.apply, jax.jit(module.apply, static_argnames="capture")):
        _, aux = fn(variables, x, capture=("blocks.*.attn.probs", "norm", "embed"))
        expected = ["embed"] + [f"blocks.{l}.attn.probs" for l in range(12)] + ["norm"]
        assert list(aux) == expected
        assert list(aux) == [n for n in info.capture_names if n in aux]
        assert sorted(aux) == expected                                 # the keys sort in forward order too
        assert aux["blocks.10.attn.probs"].ndim == 4
    # the keys are plain strings for everything else
    key = next(iter(aux))
    assert key == "embed" and isinstance(key, str) and hash(key) == hash("embed")
    # a cotangent built from aux's own keys has aux's structure (what jax.vjp needs)
    assert jax.tree.structure(aux) == jax.tree.structure({k: 0 for k in aux})


@pytest.mark.parametrize("family", ["vgg_pico", "resnet_pico"])
def test_cnn_aux_is_in_forward_order(family):
    module = models.create_model(family)
    info = models.model_info(module)
    _, aux = jax.jit(module.apply, static_argnames="capture")(zero_variables(module),
                                                              jnp.zeros((1, 32, 32, 3)), capture=("*",))
    assert list(aux) == list(info.capture_names)


def test_eval_transform_accepts_path_pil_bytes_and_array(tmp_path):
    img = decode_image(DigitsSource("test").read(3).data)
    path = tmp_path / "d.png"
    img.save(path)
    t = data.EvalTransform.from_cfg({"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"})
    want = t(img)
    for given in (path, str(path), path.read_bytes(), np.asarray(img), img.convert("L").convert("RGB")):
        np.testing.assert_array_equal(t(given), want)
    assert t(img.convert("RGBA")).shape == (32, 32, 3)                  # any PIL mode is made RGB


def test_load_images_gives_a_normalised_batch(tmp_path, monkeypatch):
    m = load_model("vit_pico_patch4_32", weights="builtin")
    src = DigitsSource("test")
    files = []
    for i in range(3):
        decode_image(src.read(i).data).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    x = data.load_images(files, m.pretrained_cfg)
    assert x.shape == (3, 32, 32, 3) and x.dtype == jnp.float32
    t = data.EvalTransform.from_cfg(m.pretrained_cfg)
    np.testing.assert_allclose(x[1], data.normalize(t(files[1]), m.pretrained_cfg), rtol=1e-6)
    assert data.load_images(files[0], m.pretrained_cfg).shape == (1, 32, 32, 3)   # one file
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.load_images("~/2.png", m.pretrained_cfg).shape == (1, 32, 32, 3)  # '~' expanded


def test_batches_without_a_mesh():
    src = data.subset(DigitsSource("test"), num_images=10)
    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic", "num_classes": 10}
    got = list(data.batches(src, cfg, 4 * jax.device_count()))
    assert sum(int(b["valid"].sum()) for b in got) == 10
    assert got[0]["image"].shape == (4 * jax.device_count(), 32, 32, 3)


def test_docs_use_the_shipped_image_not_an_unexplained_file():
    for doc in (API_DOC, README):
        assert "digit.png" not in doc.read_text() and "data.example_image()" in doc.read_text(), doc.name


def test_readme_attention_example_uses_num_prefix_tokens():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "num_prefix_tokens" in code and "mu[1:]" not in code
