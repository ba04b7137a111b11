"""VGG and ResNet against timm with random weights (BatchNorm statistics randomised too).

Tolerances, all max|diff| / max|ref| per tensor: logits <= 1e-5, every captured activation <= 1e-5.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.weights.checkpoint import CheckpointError  # noqa: E402
from vitsparse_jax.weights.timm_keys import resnet as resnet_convert  # noqa: E402
from vitsparse_jax.weights.timm_keys import vgg as vgg_convert  # noqa: E402

LOGIT_TOL = 1e-5
ACT_TOL = 1e-5
CONVERTERS = {"vgg": vgg_convert, "resnet": resnet_convert}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_nhwc(t: "torch.Tensor") -> np.ndarray:
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def to_nchw(a) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@functools.lru_cache(maxsize=2)
def pair(name: str):
    """(timm model in eval mode, flax module, converted variables); BN affine and statistics randomised."""
    torch.manual_seed(0)
    tmodel = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for m in tmodel.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    module = models.create_model(name)
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    flat = CONVERTERS[models.model_info(module).family].convert_state_dict(sd, module)
    variables = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return tmodel, module, variables


@functools.lru_cache(maxsize=None)
def untrained(name: str):
    """(flax module, timm-scheme random variables, seed 0) of a built-in pico model (init compiles slowly)."""
    module = models.create_model(name)
    return module, models.init_untrained(module, seed=0)


def timm_modules(tmodel, family: str) -> dict:
    """Our capture name -> the timm module whose output it is (`pre_logits` = the pooled features)."""
    if family == "vgg":
        mods = {f"features.{i}": m for i, m in enumerate(tmodel.features)}
        mods.update({"pre_logits.act1": tmodel.pre_logits.act1, "pre_logits.act2": tmodel.pre_logits.act2,
                     "pre_logits": tmodel.head.global_pool})
        return mods
    mods = {"act1": tmodel.act1, "stem": tmodel.maxpool, "pre_logits": tmodel.global_pool}
    for s in range(1, 5):
        for b, block in enumerate(getattr(tmodel, f"layer{s}")):
            mods[f"layer{s}.{b}"] = block
            mods.update({f"layer{s}.{b}.{a}": getattr(block, a) for a in ("act1", "act2", "act3")
                         if hasattr(block, a)})
    return mods


def run_timm(tmodel, family: str, x: np.ndarray, masks: dict | None = None) -> tuple[np.ndarray, dict]:
    """timm logits and every hooked output (NHWC); `masks` (NHWC) multiply the named module outputs."""
    mods, outs, handles = timm_modules(tmodel, family), {}, []
    masks = masks or {}

    def hook(name):
        def fn(_, __, out):
            if name in masks:
                out = out * to_nchw(masks[name])
            outs[name] = to_nhwc(out.clone())  # clone: the next ReLU works in place
            return out
        return fn

    for name, m in mods.items():
        handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            logits = tmodel(to_nchw(x)).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, outs


PARITY = [("vgg11", 96), ("vgg11_bn", 64), ("resnet18", 64), ("resnet50", 64),
          pytest.param("vgg16", 224, marks=pytest.mark.slow), pytest.param("resnet50", 224, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,size", PARITY)
def test_logits_and_activations_match_timm(name, size, rng):
    tmodel, module, variables = pair(name)
    info = models.model_info(module)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    ref_logits, ref_acts = run_timm(tmodel, info.family, x)
    logits, aux = jax.jit(functools.partial(module.apply, capture=("*",)))(variables, x)
    assert rel_err(logits, ref_logits) <= LOGIT_TOL
    assert set(aux) == set(info.capture_names) == set(ref_acts)
    errs = {k: rel_err(aux[k], ref_acts[k]) for k in info.capture_names}
    assert max(errs.values()) <= ACT_TOL, {k: e for k, e in errs.items() if e > ACT_TOL}


def last_sites(name: str) -> list[str]:
    return list(models.model_info(models.create_model(name)).ablation_sites[-3:])


@pytest.mark.parametrize("name,size", [("vgg16", 64), ("resnet50", 64)])
@pytest.mark.parametrize("unit", ["channel", "spatial"])
def test_masks_match_timm_hooks(name, size, unit, rng):
    tmodel, module, variables = pair(name)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    _, clean = module.apply(variables, x, capture=tuple(last_sites(name)))
    masks = {}
    for site in last_sites(name):
        b, h, w, c = clean[site].shape
        shape = (b, 1, 1, c) if unit == "channel" else (b, h, w, 1)
        masks[site] = (rng.random(shape) > 0.3).astype(np.float32)
    ref_logits, _ = run_timm(tmodel, "vgg" if name.startswith("vgg") else "resnet", x, masks)
    logits, aux = module.apply(variables, x, masks=masks, capture=tuple(masks))
    assert rel_err(logits, ref_logits) <= LOGIT_TOL
    clean_logits, _ = module.apply(variables, x)
    assert rel_err(logits, clean_logits) > 1e-4  # the masks did something
    for site, m in masks.items():  # dropped units are exactly zero
        assert np.all(np.asarray(aux[site])[np.broadcast_to(m, aux[site].shape) == 0] == 0)


@pytest.mark.parametrize("name", ["vgg_pico", "resnet_pico"])
def test_all_ones_mask_is_exact_and_values_do_not_recompile(name, rng):
    module, variables = untrained(name)
    info = models.model_info(module)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    _, aux = module.apply(variables, x, capture=info.mask_sites)
    traces = []

    @jax.jit
    def f(variables, x, masks):
        traces.append(1)
        return module.apply(variables, x, masks=masks)[0]

    ones = {s: jnp.ones((2, 1, 1, aux[s].shape[-1])) for s in info.mask_sites}
    clean = jax.jit(lambda v, x: module.apply(v, x)[0])(variables, x)
    np.testing.assert_array_equal(f(variables, x, ones), clean)
    halves = {s: 0.5 * m for s, m in ones.items()}
    assert not np.array_equal(f(variables, x, halves), clean)
    assert len(traces) == 1


@pytest.mark.parametrize("name,size,starts", [
    ("vgg11_bn", 64, ("features.0", "features.12", "features.21", "pre_logits", "head")),
    ("resnet50", 64, ("stem", "layer1.0", "layer3.2", "layer4.2", "head")),
    ("resnet_pico", 32, ("layer2.0", "head")),
])
def test_start_from_captured_stage_reproduces_logits(name, size, starts, rng):
    module, variables = untrained(name) if name.endswith("pico") else pair(name)[1:]
    info = models.model_info(module)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    logits, aux = module.apply(variables, x, capture=info.capture_names)
    for start in starts:
        i = info.stages.index(start)
        inp = x if i == 0 else aux[info.stages[i - 1]]
        np.testing.assert_allclose(module.apply(variables, inp, start=start)[0], logits, rtol=1e-6, atol=1e-6)
    site = info.ablation_sites[-1]
    i = info.stages.index(site if site in info.stages else site.rsplit(".", 1)[0])  # stage holding the site
    drop = {site: jnp.zeros((1, 1, 1, 1))}
    masked, _ = module.apply(variables, x, masks=drop)
    np.testing.assert_allclose(module.apply(variables, aux[info.stages[i - 1]], start=info.stages[i],
                                            masks=drop)[0], masked, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="before start"):
        module.apply(variables, aux[info.stages[i]], start=info.stages[i + 1], masks=drop)


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg16_bn",
                                  "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_parameter_count_equals_timm(name):
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    shapes = models.variable_shapes(models.create_model(name))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes["params"]))
    assert ours == ref


def test_sites_and_names():
    vgg16 = models.model_info(models.create_model("vgg16"))
    assert vgg16.ablation_sites == tuple(f"features.{i}" for i in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29))
    assert vgg16.mask_sites == vgg16.ablation_sites + ("pre_logits.act1", "pre_logits.act2")
    assert vgg16.stages[-2:] == ("pre_logits", "head") and len(vgg16.stages) == 31 + 2
    r50 = models.model_info(models.create_model("resnet50"))
    assert len(r50.ablation_sites) == 16 and all(s.endswith(".act2") for s in r50.ablation_sites)
    assert r50.ablation_sites[-1] == "layer4.2.act2" and r50.stages[:2] == ("stem", "layer1.0")
    r18 = models.model_info(models.create_model("resnet18"))
    assert r18.ablation_sites[:3] == ("layer1.0.act1", "layer1.0.act2", "layer1.1.act1")
    assert len(r18.ablation_sites) == 16
    assert models.model_info(models.create_model("vgg11_bn")).ablation_sites[0] == "features.2"
    with pytest.raises(ValueError, match="valid sites"):
        models.create_model("resnet18").apply({}, jnp.zeros((1, 32, 32, 3)), masks={"layer1.0.act3": 1.0})


def test_untrained_init_follows_timm():
    params = untrained("resnet_pico")[1]["params"]
    kernel = np.asarray(params["layer4_0"]["conv1"]["kernel"])  # 3x3x64x128, fan_out = 9*128
    assert abs(kernel.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.02
    assert np.all(np.asarray(params["layer1_0"]["bn2"]["scale"]) == 0)  # zero_init_last
    assert np.all(np.asarray(params["layer1_0"]["bn1"]["scale"]) == 1)
    assert np.abs(np.asarray(params["fc"]["kernel"])).max() <= 1 / np.sqrt(128)
    vgg = untrained("vgg_pico")[1]["params"]
    assert np.all(np.asarray(vgg["features_0"]["bias"]) == 0)
    assert abs(np.asarray(vgg["head"]["fc"]["kernel"]).std() / 0.01 - 1) < 0.1


def test_train_mode_batchnorm_matches_timm(rng):
    tmodel, _, variables = pair("resnet18")
    module = models.create_model("resnet18", train=True)
    x = rng.standard_normal((4, 64, 64, 3)).astype(np.float32)
    (logits, _), updated = module.apply(variables, x, mutable=["batch_stats"])
    state = {k: v.clone() for k, v in tmodel.state_dict().items()}
    tmodel.train()
    try:
        with torch.no_grad():
            ref = tmodel(to_nchw(x)).numpy()
        ref_mean = tmodel.bn1.running_mean.numpy().copy()
    finally:
        tmodel.load_state_dict(state)
        tmodel.eval()
    assert rel_err(logits, ref) <= LOGIT_TOL
    # Running means follow torch (momentum 0.1); running variances differ: flax uses the biased variance.
    np.testing.assert_allclose(updated["batch_stats"]["bn1"]["mean"], ref_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_converter_is_strict(name):
    tmodel, module, _ = pair(name)
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    convert = CONVERTERS[models.model_info(module).family].convert_state_dict
    assert not any("num_batches_tracked" in k for k in convert(sd, module))
    with pytest.raises(CheckpointError, match=f"{name}.*'extra.weight'"):
        convert({**sd, "extra.weight": np.zeros(3)}, module)
    key = "features.1.running_var" if name.startswith("vgg") else "layer2.0.downsample.1.running_var"
    with pytest.raises(CheckpointError, match=f"{name}.*missing"):
        convert({k: v for k, v in sd.items() if k != key}, module)
    with pytest.raises(CheckpointError, match="shape"):
        convert({**sd, key: np.zeros(7, np.float32)}, module)


def test_torchvision_vgg_classifier_names_convert_like_timm():
    tmodel, module, _ = pair("vgg11_bn")
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    renames = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3", "head.fc": "classifier.6"}
    tv = {}
    for key, value in sd.items():
        mod, _, param = key.rpartition(".")
        tv[f"{renames.get(mod, mod)}.{param}"] = value.reshape(value.shape[0], -1) if param == "weight" \
            and mod in renames else value
    ours, ref = vgg_convert.convert_state_dict(tv, module), vgg_convert.convert_state_dict(sd, module)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_round_trip_through_converter_and_checkpoint(tmp_path, rng):
    import checkpoints_convert
    from vitsparse_jax.weights import checkpoint

    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    # a local .pth of a timm ResNet
    tmodel, module, variables = pair("resnet18")
    torch.save(tmodel.state_dict(), tmp_path / "resnet18.pth")
    path = checkpoints_convert.convert("resnet18.test", tmp_path / "out", from_file=tmp_path / "resnet18.pth")
    loaded, meta = checkpoint.load(path, module)
    assert meta["model"] == "resnet18" and meta["tag"] == "test"
    np.testing.assert_array_equal(module.apply(loaded, x)[0], module.apply(variables, x)[0])
    # a live timm VGG module
    tmodel, module, variables = pair("vgg11_bn")
    live, cfg = checkpoints_convert.convert_timm_module(tmodel)
    path = checkpoint.save(tmp_path / "out", "vgg11_bn", "live", live, cfg, "live timm module")
    loaded, _ = checkpoint.load(path, module)
    np.testing.assert_array_equal(module.apply(loaded, x)[0], module.apply(variables, x)[0])
