"""timm's eval transform, reproduced with PIL + numpy, and on-device normalisation.

timm's `create_transform(**resolve_data_config(model=m))` for eval (crop_mode 'center', square input) is
  torchvision Resize(floor(size / crop_pct), interpolation)  -> PIL `Image.resize` (antialiased)
  torchvision CenterCrop(size)                                 -> PIL `Image.crop` at round()ed offsets
  ToTensor + Normalize(mean, std)                              -> `normalize` below, on device.
The same PIL calls with the same integer sizes give the same uint8 crop, bit for bit.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

# timm.data.constants
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875

# What `EvalTransform`, `read_image` and `load_images` take: a file path, encoded file bytes, a PIL image or
# a uint8 (H, W, 3) / (H, W) array.
ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize + center crop of timm's eval transform. `__call__`: an image (path, bytes, PIL image or uint8
    array; see `read_image`) -> uint8 (H, W, 3)."""

    size: tuple[int, int]  # (height, width) of the crop
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    crop_mode: str = "center"  # 'center' (timm's default) or 'squash'

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported; use 'center' or 'squash'")
        if self.crop_mode == "center" and self.size[0] != self.size[1]:
            raise ValueError(f"crop_mode 'center' is implemented for square inputs only, got {self.size}")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> EvalTransform:
        """From a timm pretrained_cfg / data config (missing keys take timm's defaults)."""
        input_size = cfg.get("input_size", (3, 224, 224))
        if cfg.get("crop_border_pixels"):
            raise ValueError("crop_border_pixels is not supported")
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":  # timm's train-only option; eval resolves it to bilinear
            interpolation = "bilinear"
        return cls(size=(int(input_size[-2]), int(input_size[-1])),
                   crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                   interpolation=interpolation,
                   crop_mode=cfg.get("crop_mode") or "center")

    @property
    def scale_size(self) -> tuple[int, int]:
        return (math.floor(self.size[0] / self.crop_pct), math.floor(self.size[1] / self.crop_pct))

    def params(self) -> dict[str, Any]:
        """Everything that determines the output (the cache key)."""
        return {"size": list(self.size), "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "crop_mode": self.crop_mode}

    def __call__(self, img: ImageLike) -> np.ndarray:
        """An image (a file path, encoded bytes, a PIL image of any mode or a uint8 array) -> uint8 crop."""
        if not (isinstance(img, Image.Image) and img.mode == "RGB"):
            img = read_image(img)
        resample = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "squash":
            img = _resize_to(img, self.scale_size, resample)
        else:
            img = _resize_shorter(img, self.scale_size[0], resample)
        out = np.asarray(_center_crop(img, self.size), dtype=np.uint8)
        if out.shape != (*self.size, 3):
            raise ValueError(f"expected an RGB image, got an array of shape {out.shape}")
        return out


def _resize_to(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    h, w = size
    return img if img.size == (w, h) else img.resize((w, h), resample)


def _resize_shorter(img: Image.Image, short: int, resample: Image.Resampling) -> Image.Image:
    """torchvision Resize(int): shorter side -> `short`, longer side truncated like torchvision does."""
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return _resize_to(img, (size[1], size[0]), resample)


def _center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision CenterCrop: zero-pad if too small, then offsets int(round((dim - crop) / 2))."""
    th, tw = size
    w, h = img.size
    if tw > w or th > h:
        padded = Image.new(img.mode, (max(w, tw), max(h, th)), 0)
        padded.paste(img, ((tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0))
        img = padded
        w, h = img.size
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def read_image(image: ImageLike) -> Image.Image:
    """A file path (`~` and environment variables expanded), encoded bytes, a PIL image or a uint8 array
    -> fully decoded RGB PIL image (`decode_image`)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(os.path.expandvars(os.path.expanduser(os.fspath(image))))
        return decode_image(path.read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    if isinstance(image, (Image.Image, np.ndarray)):
        return decode_image(image)
    raise TypeError(f"expected an image file path, encoded bytes, a PIL image or a uint8 array, got "
                    f"{type(image).__name__}")


def load_images(images: ImageLike | Sequence[ImageLike], pretrained_cfg: Mapping[str, Any] | None = None, *,
                dtype: Any = jnp.float32) -> jax.Array:
    """Images (file paths, bytes, PIL images or uint8 arrays; one or a list) -> the model's input batch
    (B, S, S, 3): timm's eval transform (`EvalTransform.from_cfg(pretrained_cfg)`) then `normalize`.

        x = data.load_images(["cat.jpg", "dog.png"], loaded.pretrained_cfg)
        logits, aux = loaded.module.apply(loaded.variables, x)
    """
    cfg = pretrained_cfg or {}
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    transform = EvalTransform.from_cfg(cfg)
    crops = [transform(image) for image in images]
    if not crops:
        raise ValueError("load_images needs at least one image")
    return normalize(np.stack(crops), cfg, dtype=dtype)


def decode_image(data: bytes | np.ndarray | Image.Image) -> Image.Image:
    """Encoded file bytes (any format PIL reads) or a uint8 array -> fully decoded RGB PIL image.

    Colour handling is PIL's `convert('RGB')` for every mode (L, LA, P, PA, RGBA, CMYK, I;16, I, ...),
    as timm's loader does. Raises on unreadable data (garbage, truncated files): callers count those.
    """
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"decoded images must be uint8 arrays, got {data.dtype}")
        return Image.fromarray(data).convert("RGB")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:   # PIL's own text names the in-memory buffer (<_io.BytesIO object at 0x...>)
        raise UnidentifiedImageError(f"not an image format PIL can read ({len(data)} bytes starting "
                                     f"{bytes(data[:8])!r})") from None
    with img:
        img.load()  # decode everything now: a truncated file raises here, not later
        return img.convert("RGB")


def normalize(images: jax.Array | np.ndarray, cfg: Mapping[str, Any] | None = None, *,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
              dtype: Any = jnp.float32) -> jax.Array:
    """uint8 (..., 3) crops -> (x / 255 - mean) / std, as torchvision's ToTensor + Normalize.

    mean/std come from `cfg` (a timm pretrained_cfg) unless given; default: ImageNet's. jit-friendly.
    """
    cfg = cfg or {}
    mean = mean if mean is not None else cfg.get("mean", IMAGENET_DEFAULT_MEAN)
    std = std if std is not None else cfg.get("std", IMAGENET_DEFAULT_STD)
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)
