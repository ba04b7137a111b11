"""The eval transform equals timm's create_transform output; odd image files decode like PIL's convert."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax.data import EvalTransform, decode_image, normalize

# (timm name, interpolation, crop_pct) as timm's pretrained_cfg has them (checked in the test).
TIMM_MODELS = [
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "bicubic", 0.9),  # ViT augreg, mean/std 0.5
    ("deit_tiny_distilled_patch16_224.fb_in1k", "bicubic", 0.9),    # timm's DeiT cfg says 0.9, not 0.875
    ("swin_tiny_patch4_window7_224.ms_in1k", "bicubic", 0.9),
    ("resnet18.tv_in1k", "bilinear", 0.875),                         # tv_in1k (ResNet / VGG)
]


def photos() -> list[Image.Image]:
    """Real photographs (scikit-learn's china.jpg, flower.jpg, 640x427) in varied sizes and aspect ratios,
    plus generated noise and gradients."""
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (301, 459, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 333 * 250 * 3).reshape(333, 250, 3).astype(np.uint8)
    return [
        china, flower,
        china.crop((100, 0, 400, 427)),           # portrait 300x427
        flower.resize((1000, 257)),               # very wide
        china.resize((257, 1000)),                # very tall
        flower.crop((0, 0, 249, 249)),            # square, odd center-crop offsets
        china.resize((224, 224)),                 # exactly the crop size (upsampled to 248/256)
        flower.resize((117, 90)),                 # smaller than the crop: upsampling
        china.crop((10, 10, 11, 300)),            # 1 pixel wide
        noise, Image.fromarray(ramp),
    ]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return photos()


def _timm_cfg_and_transforms(name: str):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=False)
    cfg = resolve_data_config({}, model=model)
    return model.pretrained_cfg, cfg, create_transform(**cfg), create_transform(**cfg, normalize=False)


@pytest.mark.parametrize("name,interpolation,crop_pct", TIMM_MODELS)
def test_eval_transform_matches_timm_create_transform(images, name, interpolation, crop_pct):
    pretrained_cfg, cfg, timm_tf, timm_uint8 = _timm_cfg_and_transforms(name)
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == (interpolation, crop_pct, "center")
    ours = EvalTransform.from_cfg(pretrained_cfg)
    for img in images:
        crop = ours(img)
        # The uint8 crop is bit-identical (same PIL resize/crop calls with the same integer sizes).
        np.testing.assert_array_equal(crop, timm_uint8(img).permute(1, 2, 0).numpy(), err_msg=str(img.size))
        # Normalised floats: only float32 rounding of (x/255 - mean)/std differs (measured <= 1e-6).
        ref = timm_tf(img).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(normalize(crop, pretrained_cfg)), ref, rtol=0, atol=1e-5)


def test_bicubic_0875_matches_timm_transform(images):
    """DeiT's original recipe (bicubic, crop_pct 0.875), given explicitly."""
    pytest.importorskip("timm")
    from timm.data import create_transform

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875}
    timm_uint8 = create_transform(**cfg, normalize=False)
    for img in images:
        np.testing.assert_array_equal(EvalTransform.from_cfg(cfg)(img),
                                      timm_uint8(img).permute(1, 2, 0).numpy(), err_msg=str(img.size))


def test_resize_and_crop_sizes_follow_torchvision():
    t = EvalTransform(size=(224, 224), crop_pct=0.875, interpolation="bilinear")
    assert t.scale_size == (256, 256)
    assert EvalTransform(size=(224, 224), crop_pct=0.9).scale_size == (248, 248)  # floor(248.88)
    assert t(Image.new("RGB", (640, 427))).shape == (224, 224, 3)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def odd_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    grey = Image.fromarray(rgb[..., 0])
    palette = Image.fromarray(rgb).quantize(16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgba = Image.fromarray(np.dstack([rgb, rgb[..., 1]]))
    return {
        "grey_jpeg": _encode(grey, "JPEG"),
        "cmyk_jpeg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "palette_png": _encode(palette, "PNG"),
        "palette_transparent_png": _encode(palette_t, "PNG"),
        "rgba_png": _encode(rgba, "PNG"),
        "la_png": _encode(Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 2]])), "PNG"),
        "16bit_png": _encode(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG"),
        "32bit_int_tiff": _encode(Image.fromarray(rgb[..., 1].astype(np.int32) * 3), "TIFF"),
        "bw_bmp": _encode(grey.convert("1"), "BMP"),
    }


def test_odd_modes_decode_like_pil_convert_rgb():
    for kind, data in odd_files().items():
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
        got = decode_image(data)
        assert got.mode == "RGB", kind
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=kind)
        assert EvalTransform((16, 16))(got).shape == (16, 16, 3)


def test_16bit_png_is_clipped_like_pil():
    """PIL's convert('RGB') clips 16-bit values at 255 (no rescaling); timm's loader does the same."""
    data = _encode(Image.fromarray(np.array([[0, 200, 300, 65535]], np.uint16)), "PNG")
    np.testing.assert_array_equal(np.asarray(decode_image(data))[0, :, 0], [0, 200, 255, 255])


def test_unreadable_files_raise():
    jpeg = _encode(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90), "JPEG")
    for data in (jpeg[: len(jpeg) // 2], b"\x00garbage" * 10, b""):
        with pytest.raises(Exception):
            decode_image(data)


def test_normalize_uses_cfg_mean_std():
    x = np.array([[[0, 128, 255]]], np.uint8)
    out = np.asarray(normalize(x, {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}))
    np.testing.assert_allclose(out, [[[-1.0, 128 / 255 * 2 - 1, 1.0]]], atol=1e-6)
    imagenet = np.asarray(normalize(x))
    np.testing.assert_allclose(imagenet[0, 0, 0], (0 - 0.485) / 0.229, atol=1e-6)
