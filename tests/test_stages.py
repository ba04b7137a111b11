"""`start` / `stop`: running a model stage by stage gives the full forward, for every family; the errors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.random_weights import random_variables
from vitsparse_jax import models

SWIN = {"img_size": 64, "embed_dim": 16, "depths": (1, 1, 2, 2), "num_heads": (1, 1, 2, 2), "num_classes": 10,
        "window_size": (2, 2, 2, 2)}
CASES = {   # small random configs, as in the parity tests
    "vit": ("vit_pico_patch4_32", {"depth": 2}),
    "deit_distilled": ("vit_pico_patch4_32", {"depth": 2, "distilled": True}),
    "vit_headless": ("vit_pico_patch4_32", {"depth": 2, "num_classes": 0}),
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "vgg": ("vgg_pico", {}),
    "vgg_bn": ("vgg_pico", {"batch_norm": True}),
    "resnet_basic": ("resnet_pico", {}),
    "resnet_bottleneck": ("resnet50", {"layers": (1, 1, 1, 1), "num_classes": 10, "img_size": 64}),
}
# (stop, a mask site in a later stage) per case
LATE_MASK = {"vit": ("blocks.0", "blocks.1.attn"), "swin": ("layers.0.blocks.0", "layers.3.blocks.1.attn"),
             "vgg": ("features.1", "pre_logits.act1"), "resnet_basic": ("stem", "layer4.0.act1")}


@functools.cache
def model(case: str):
    name, kw = CASES[case]
    module = models.create_model(name, **kw)
    size = module.info().img_size
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
    return module, random_variables(module), x


@pytest.mark.parametrize("case", list(CASES))
def test_chained_single_stages_equal_the_full_forward(case):
    module, variables, x = model(case)
    stages = module.info().stages
    full, aux = module.apply(variables, x, capture=("*",))
    h, got = x, {}
    for stage in stages:
        h, part = module.apply(variables, h, start=stage, stop=stage, capture=("*",))
        assert not set(part) & set(got), stage            # each capture is computed by exactly one stage
        got.update(part)
        if stage != stages[-1]:   # the output of stage s is what `start=<next stage>` takes: aux[s]
            np.testing.assert_allclose(h, aux[stage], rtol=1e-6, atol=1e-6, err_msg=stage)
    np.testing.assert_allclose(h, full, rtol=1e-6, atol=1e-6)
    assert set(got) == set(aux)
    for name, value in aux.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["vit", "swin", "vgg", "resnet_bottleneck"])
def test_stop_spans_and_defaults(case):
    module, variables, x = model(case)
    stages = module.info().stages
    full, aux = module.apply(variables, x, capture=("*",))
    np.testing.assert_array_equal(module.apply(variables, x, stop=stages[-1])[0], full)
    # a span of several stages, captures limited to the stages that run
    mid = stages[len(stages) // 2]
    out, part = module.apply(variables, aux[stages[0]], start=stages[1], stop=mid, capture=("*",))
    np.testing.assert_allclose(out, aux[mid], rtol=1e-6, atol=1e-6)
    assert mid in part and stages[0] not in part and not set(part) & {"pre_logits", "norm"}


@pytest.mark.parametrize("case", list(LATE_MASK))
def test_stop_errors(case):
    module, variables, x = model(case)
    stages = module.info().stages
    with pytest.raises(ValueError, match="unknown stop stage 'nope'; valid stages: " + stages[0]):
        module.apply(variables, x, stop="nope")
    with pytest.raises(ValueError, match=f"stop stage '{stages[0]}' lies before start stage '{stages[1]}'"):
        module.apply(variables, x, start=stages[1], stop=stages[0])
    stop, site = LATE_MASK[case]
    with pytest.raises(ValueError, match=f"mask site '{site}' lies after stop stage '{stop}'"):
        module.apply(variables, x, stop=stop, masks={site: jnp.ones((1, 1, 1, 1))})


def test_masks_inside_the_span_apply():
    module, variables, x = model("vit")
    keep = jnp.ones((2, 65)).at[:, 5:20].set(0.0)
    _, aux = module.apply(variables, x, masks={"blocks.0.attn": keep}, capture=("blocks.0",))
    out, _ = module.apply(variables, x, stop="blocks.0", masks={"blocks.0.attn": keep})
    np.testing.assert_array_equal(out, aux["blocks.0"])
