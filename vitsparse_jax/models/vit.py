"""timm's VisionTransformer in Flax linen, with captures, masks and stages: ViT, DeiT (plain and distilled),
DeiT III, DINOv2 (with and without registers), CLIP and SigLIP image towers, pooled (`*_gap_*`) ViTs.

Parameter layout mirrors timm (`blocks.3.attn.qkv` -> `blocks_3/attn/qkv`), so that conversion is a
rename plus transposes. Interface: docs/design.md ("Models").
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.models import base
from vitsparse_jax.models.base import Array, ModelInfo
from vitsparse_jax.models.layers import Mlp, TimmDense, trunc_normal, trunc_normal_tf
from vitsparse_jax.models.pos_embed import resample_abs_pos_embed

FAMILY = "vit"
LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Initialisers (timm's init_weights: trunc_normal_ std .02 with ABSOLUTE bounds [-2, 2], i.e. practically a
# plain normal; torch's default Conv2d init for the patch embedding, which timm leaves untouched).

def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def torch_conv_uniform(fan_in: int) -> Callable:
    """torch.nn.Conv2d default (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


# ---------------------------------------------------------------------------------------------------------
# Layers

class Attention(nn.Module):
    """Multi-head self-attention; keep factors multiply the post-softmax columns (docs/science.md#ablation-units)."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, renormalize: bool) -> tuple[Array, Array]:
        b, n, d = x.shape
        hd = self.dim // self.num_heads
        dense = lambda feats, name, bias=True: nn.Dense(  # noqa: E731
            feats, use_bias=bias, dtype=self.dtype, precision=self.precision, kernel_init=trunc_normal(.02),
            bias_init=nn.initializers.zeros, name=name)

        qkv = dense(3 * self.dim, "qkv", self.qkv_bias)(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, H, N, hd)
        q = q * hd ** -0.5                                                   # timm scales q before q @ k^T
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if mask is not None:
            probs = mask_columns(probs, mask, renormalize)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, precision=self.precision)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        return dense(self.dim, "proj")(out), probs


def mask_columns(probs: Array, mask: Array, renormalize: bool) -> Array:
    """Multiplies column j of every head and query row by mask[:, j]; optionally renormalises rows.

    probs (B, H, N, N) float32, mask (B, N). Rows whose mass is all dropped stay zero. With renormalize,
    images whose mask keeps everything are returned untouched, so an all-ones mask is exactly a no-op.
    """
    if mask.shape != (probs.shape[0], probs.shape[-1]):
        raise ValueError(f"attention mask must have shape (B, N) = {(probs.shape[0], probs.shape[-1])}, "
                         f"got {mask.shape}")
    mask = jnp.asarray(mask, jnp.float32)
    kept = probs * mask[:, None, None, :]
    if not renormalize:
        return kept
    total = kept.sum(-1, keepdims=True)
    renormed = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)
    untouched = jnp.all(mask == 1.0, axis=-1)[:, None, None, None]
    return jnp.where(untouched, kept, renormed)


class LayerScale(nn.Module):
    """timm LayerScale: multiplies the channels by a learned `gamma` (init: `init_values`)."""

    init_values: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block; returns the block output and its named intermediates.

    With `init_values` (layer scale, DeiT III / DINOv2) each branch is multiplied by its `ls1` / `ls2` gamma
    INSIDE the branch: the `attn` and `mlp` captures are the branch outputs after layer scale, i.e. exactly what
    is added to the residual stream (receptive-field sub-stages stay "before the residual add").
    """

    dim: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool = True
    init_values: float | None = None
    norm_eps: float = LN_EPS
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, renormalize: bool) -> tuple[Array, dict[str, Array]]:
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        attn, probs = Attention(self.dim, self.num_heads, self.qkv_bias, self.dtype, self.precision, name="attn")(
            norm("norm1")(x), mask, renormalize)
        if self.init_values is not None:
            attn = LayerScale(self.init_values, self.dtype, name="ls1")(attn)
        x = x + attn
        attn_res = x
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.precision, name="mlp")(norm("norm2")(x))
        if self.init_values is not None:
            mlp = LayerScale(self.init_values, self.dtype, name="ls2")(mlp)
        x = x + mlp
        return x, {"attn.probs": probs, "attn": attn, "attn_res": attn_res, "mlp": mlp}


class AttentionPoolLatent(nn.Module):
    """timm's AttentionPoolLatent (SigLIP's MAP head, latent_len 1, pool 'token'): a learned latent query
    attends to the tokens (`q`, `kv`, `proj`), then a pre-norm residual MLP. Returns (B, D) and the pooling
    attention (B, heads, 1, N), post-softmax."""

    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = LN_EPS
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        b, n, d = x.shape
        hd = d // self.num_heads
        dense = lambda feats, name: TimmDense(feats, dtype=self.dtype, precision=self.precision,  # noqa: E731
                                              name=name)
        latent = self.param("latent", trunc_normal_tf(d ** -0.5), (1, 1, d))
        q = dense(d, "q")(jnp.broadcast_to(latent, (b, 1, d)).astype(x.dtype))
        q = q.reshape(b, 1, self.num_heads, hd).transpose(0, 2, 1, 3)                     # (B, H, 1, hd)
        kv = dense(2 * d, "kv")(x).reshape(b, n, 2, self.num_heads, hd)
        k, v = (kv[:, :, i].transpose(0, 2, 1, 3) for i in range(2))                      # (B, H, N, hd)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * hd ** -0.5, k, precision=self.precision)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, precision=self.precision)
        out = dense(d, "proj")(out.transpose(0, 2, 1, 3).reshape(b, 1, d))
        out = out + Mlp(int(d * self.mlp_ratio), self.dtype, self.precision, name="mlp")(
            nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(out))
        return out[:, 0], probs


# ---------------------------------------------------------------------------------------------------------
# Model

GLOBAL_POOLS = ("token", "avg", "map")


def valid_sizes_near(size: int, patch: int, count: int = 2) -> list[int]:
    """The multiples of `patch` around `size` (up to `count` below and above), for error messages."""
    below = [patch * (size // patch - i) for i in range(count) if size // patch - i >= 1]
    above = [patch * (size // patch + 1 + i) for i in range(count)]
    return sorted(set(below + above))


def check_img_size(arch: str, img_size: int, patch_size: int) -> tuple[int, int]:
    """The patch grid of a square image; an image size that is not a whole number of patches is a ValueError
    naming the valid sizes near it."""
    if img_size < patch_size or img_size % patch_size:
        near = ", ".join(str(s) for s in valid_sizes_near(img_size, patch_size))
        raise ValueError(f"{arch}: img_size={img_size} is not a whole number of {patch_size}x{patch_size} patches "
                         f"({img_size}/{patch_size} = {img_size / patch_size:g}); valid sizes near it: {near} "
                         f"(any multiple of {patch_size})")
    g = img_size // patch_size
    return g, g


class VisionTransformer(nn.Module):
    """timm VisionTransformer with the options of the ViT families that researchers study (docs/design.md):

    - prefix tokens: `class_token` (on/off), `reg_tokens` register tokens after it (DINOv2 reg4, *_reg*_gap_*),
      `distilled=True` (timm's VisionTransformerDistilled: cls + dist token, eval = mean of two heads);
    - `no_embed_class`: the position embedding covers the patches only and is added before the prefix tokens
      are prepended (DeiT III, DINOv2 reg4); else it covers prefix + patches (ViT, DeiT, DINOv2, CLIP);
    - `init_values`: layer scale `ls1` / `ls2` inside each branch (DeiT III, DINOv2, *_gap_*);
    - `pre_norm`: LayerNorm `norm_pre` after the embedding, and a patch embedding without bias (CLIP);
    - `global_pool`: 'token' (class token), 'avg' (mean of the patch tokens) or 'map' (SigLIP's attention-pool
      head `attn_pool`); `use_fc_norm` (timm's `fc_norm`; None = on for 'avg'): the final norm moves after
      the pooling (`fc_norm`);
    - `qkv_bias`, `norm_eps` (1e-6; CLIP 1e-5), any `patch_size` (14 for DINOv2) and any `img_size` that is
      a whole number of patches (weights of another size are resampled at conversion, `models.pos_embed`).
    """

    arch: str
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    distilled: bool = False
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    init_values: float | None = None
    pre_norm: bool = False
    global_pool: str = "token"
    use_fc_norm: bool | None = None   # timm's `fc_norm` (build() accepts that name too)
    qkv_bias: bool = True
    norm_eps: float = LN_EPS
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    # --- static facts -----------------------------------------------------------------------------------
    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return (("cls",) if self.class_token else ()) + (("dist",) if self.distilled else ()) \
            + ("reg",) * self.reg_tokens

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix_kinds)

    @property
    def has_fc_norm(self) -> bool:
        """timm: fc_norm=None means on for global_pool='avg'; then the final norm acts on the pooled features."""
        return self.global_pool == "avg" if self.use_fc_norm is None else bool(self.use_fc_norm)

    @property
    def grid(self) -> tuple[int, int]:
        return check_img_size(self.arch, self.img_size, self.patch_size)

    def check_options(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"{self.arch}: global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError(f"{self.arch}: global_pool='token' needs the class token (class_token=True)")
        if self.distilled and (not self.class_token or self.global_pool != "token" or self.reg_tokens):
            raise ValueError(f"{self.arch}: distilled=True is DeiT's class + distillation token model "
                             "(class_token=True, global_pool='token', no registers)")
        if self.reg_tokens < 0:
            raise ValueError(f"{self.arch}: reg_tokens must be >= 0, got {self.reg_tokens}")
        self.grid   # noqa: B018 (checks img_size)

    def stage_names(self) -> tuple[str, ...]:
        return ("embed", *(f"blocks.{l}" for l in range(self.depth)), "head")

    def capture_names(self) -> tuple[str, ...]:
        names = ["embed"]
        for l in range(self.depth):
            p = f"blocks.{l}"
            names += [f"{p}.attn.probs", f"{p}.attn", f"{p}.attn_res", f"{p}.mlp", p]
        if not self.has_fc_norm:
            names.append("norm")
        if self.global_pool == "map":
            names.append("attn_pool.probs")
        return (*names, "pre_logits")

    def info(self) -> ModelInfo:
        self.check_options()
        sites = tuple(f"blocks.{l}.attn" for l in range(self.depth))
        cfg = ARCHS[self.arch]["default_cfg"] if self.arch in ARCHS else {}
        return ModelInfo(name=self.arch, family=FAMILY, num_classes=self.num_classes, img_size=self.img_size,
                         num_prefix_tokens=self.num_prefix_tokens, patch_grid=self.grid,
                         stages=self.stage_names(), mask_sites=sites, ablation_sites=sites,
                         capture_names=self.capture_names(), default_cfg=dict(cfg),
                         prefix_kinds=self.prefix_kinds)

    # --- forward ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.check_options()
        d, p = self.embed_dim, self.patch_size
        self.patch_embed = PatchEmbed(d, p, not self.pre_norm, self.dtype, self.precision)
        if self.class_token:
            self.cls_token = self.param("cls_token", normal(1e-6), (1, 1, d))
        if self.distilled:
            self.dist_token = self.param("dist_token", trunc_normal(.02), (1, 1, d))
        if self.reg_tokens:
            self.reg_token = self.param("reg_token", normal(1e-6), (1, self.reg_tokens, d))
        n = self.grid[0] * self.grid[1] + (0 if self.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = self.param("pos_embed", trunc_normal(.02), (1, n, d))
        norm = lambda: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)  # noqa: E731
        if self.pre_norm:
            self.norm_pre = norm()
        self.blocks = [Block(d, self.num_heads, self.mlp_ratio, self.qkv_bias, self.init_values, self.norm_eps,
                             self.dtype, self.precision) for _ in range(self.depth)]
        if self.has_fc_norm:
            self.fc_norm = norm()
        else:
            self.norm = norm()
        if self.global_pool == "map":
            self.attn_pool = AttentionPoolLatent(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype,
                                                 self.precision)
        if self.num_classes > 0:
            head = lambda: nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,  # noqa: E731
                                    kernel_init=trunc_normal(.02), bias_init=nn.initializers.zeros)
            self.head = head()
            if self.distilled:
                self.head_dist = head()

    def __call__(self, x: Array, *, masks: Mapping[str, Array] | None = None, capture: tuple[str, ...] = (),
                 start: str | None = None, stop: str | None = None, renormalize: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        """Images (B, H, W, 3), or the input of stage `start`, -> (logits or pooled features, captures).

        With `stop`, the run ends after that stage and returns its output (the input of the next stage)
        instead of the logits. A mask of a block before `start` or after `stop` is an error (that block
        does not run).
        """
        valid = self.capture_names()
        base.select_captures({}, capture, valid)   # validates the patterns before any compute
        masks = base.check_masks(masks, tuple(f"blocks.{l}.attn" for l in range(self.depth)))
        stages = self.stage_names()
        first = base.check_start(start, stages)   # 0 = embed, 1 + l = blocks.l, depth + 1 = head
        last = base.check_stop(stop, stages, first)
        base.check_masks_run(masks, lambda site: site.removesuffix(".attn"), stages, first, start, last, stop)
        wanted = lambda name: any(fnmatch.fnmatchcase(name, p) for p in capture)  # noqa: E731
        found: dict[str, Array] = {}

        def keep(name: str, value: Array) -> None:
            if wanted(name):
                found[name] = value

        if first == 0:
            x = self.embed(x)
            keep("embed", x)
        else:
            self.check_tokens(x, stages[first])
        for l in range(max(first - 1, 0), min(last, self.depth)):   # block l is stage 1 + l
            x, parts = self.blocks[l](x, masks.get(f"blocks.{l}.attn"), renormalize)
            for key, value in parts.items():
                keep(f"blocks.{l}.{key}", value)
            keep(f"blocks.{l}", x)
        if last <= self.depth:   # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, valid)
        out, parts = self.forward_head(x)
        for key, value in parts.items():
            keep(key, value)
        return out, base.select_captures(found, capture, valid)

    def forward_head(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """Tokens after the last block -> (logits or pooled features, {'norm', 'attn_pool.probs', 'pre_logits'})."""
        parts: dict[str, Array] = {}
        if not self.has_fc_norm:
            x = parts["norm"] = self.norm(x)
        if self.distilled:
            pooled = (x[:, 0] + x[:, 1]) / 2
        elif self.global_pool == "token":
            pooled = x[:, 0]
        elif self.global_pool == "avg":
            pooled = x[:, self.num_prefix_tokens:].mean(axis=1)
        else:   # 'map': the attention pool sees the patch tokens only (timm: pool_include_prefix=False)
            pooled, parts["attn_pool.probs"] = self.attn_pool(x[:, self.num_prefix_tokens:])
        if self.has_fc_norm:
            pooled = self.fc_norm(pooled)
        parts["pre_logits"] = pooled
        if self.num_classes == 0:
            return pooled, parts
        if self.distilled:   # timm eval: mean of the class-token and distillation-token heads
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2, parts
        return self.head(pooled), parts

    def check_images(self, images: Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.arch}: expected normalised images (B, H, W, 3), got shape {images.shape}")
        if tuple(images.shape[1:3]) != (self.img_size, self.img_size):
            h, w = images.shape[1:3]
            sizes = sorted({s for side in (h, w) for s in ([side] if side % self.patch_size == 0 and
                                                           side >= self.patch_size else
                                                           valid_sizes_near(side, self.patch_size))})
            raise ValueError(
                f"{self.arch} was built for {self.img_size}x{self.img_size} images, got {h}x{w}. Create the model "
                f"at the images' size (create_model/load_model(..., img_size=S); the position embedding is "
                f"resampled when the weights are converted) with S a multiple of {self.patch_size}, e.g. "
                f"{', '.join(str(s) for s in sizes)}")

    def check_tokens(self, x: Array, stage: str) -> None:
        n = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        if x.ndim != 3 or x.shape[1:] != (n, self.embed_dim):
            raise ValueError(f"{self.arch}: the input of stage {stage!r} must be tokens (B, {n}, {self.embed_dim}) "
                             f"(the output of the stage before it), got shape {x.shape}")

    def embed(self, images: Array) -> Array:
        """(B, H, W, 3) normalised images -> (B, N, D) tokens: patches, prefix tokens (class, distillation,
        registers, in that order), position embedding, and `norm_pre` for pre-norm (CLIP) models."""
        self.check_images(images)
        x = self.patch_embed(images.astype(self.dtype))
        b = x.shape[0]
        prefix = [self.cls_token] if self.class_token else []
        prefix += [self.dist_token] if self.distilled else []
        prefix += [self.reg_token] if self.reg_tokens else []
        prefix = [jnp.broadcast_to(t, (b, t.shape[1], self.embed_dim)).astype(x.dtype) for t in prefix]
        pos = self.pos_embed.astype(x.dtype)
        if self.no_embed_class:   # DeiT III, DINOv2 reg4: position embedding on patches only, then prepend
            x = jnp.concatenate([*prefix, x + pos], axis=1)
        else:                     # ViT, DeiT, DINOv2, CLIP: the embedding covers prefix + patches
            x = jnp.concatenate([*prefix, x], axis=1) + pos
        if self.pre_norm:
            x = self.norm_pre(x)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv (explicit VALID padding), flattened row-major like timm (NCHW flatten)."""

    dim: int
    patch: int
    use_bias: bool = True   # False for pre-norm (CLIP) models, as timm
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = torch_conv_uniform(x.shape[-1] * self.patch * self.patch)
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    use_bias=self.use_bias, dtype=self.dtype, precision=self.precision, kernel_init=init,
                    bias_init=init, name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


# ---------------------------------------------------------------------------------------------------------
# Weights of another image size

def resample_pos_embed_for(module: VisionTransformer, posemb: np.ndarray) -> np.ndarray:
    """A position embedding (1, N, D) of any square grid -> the module's grid, as timm resamples it when a model
    is created at another size than its weights (`models.pos_embed`: bicubic, antialias; prefix entries kept,
    none for `no_embed_class`). Returned unchanged when it already fits; ValueError when it cannot."""
    posemb = np.asarray(posemb)
    prefix = 0 if module.no_embed_class else module.num_prefix_tokens
    grid = module.grid
    if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[2] != module.embed_dim:
        raise ValueError(f"{module.arch}: position embedding of shape {posemb.shape}, expected (1, N, "
                         f"{module.embed_dim})")
    if posemb.shape[1] == grid[0] * grid[1] + prefix:
        return posemb
    return resample_abs_pos_embed(posemb, grid, num_prefix_tokens=prefix)


def fit_variables(module: VisionTransformer, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat variables ('params/pos_embed', ...) made to fit `module` where that is timm's own doing: a position
    embedding of another grid (weights of another image size) is resampled to the module's grid. Everything else
    is returned as it is (the strict key / shape checks come after). For loaders of converted checkpoints."""
    key = "params/pos_embed"
    if key not in flat:
        return dict(flat)
    value = np.asarray(flat[key])
    fitted = resample_pos_embed_for(module, value)
    return {**flat, key: fitted if fitted is value else fitted.astype(value.dtype)}


# ---------------------------------------------------------------------------------------------------------
# Registry: timm arch name -> constructor kwargs + the default tag's pretrained_cfg

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
# (embed_dim, depth, num_heads)
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
          "medium": (512, 12, 8), "betwixt": (640, 12, 10), "little": (320, 14, 5)}


def _cfg(tag: str, img: int, norm: dict, num_classes: int = 1000, crop_pct: float | None = None) -> dict:
    """timm pretrained_cfg fields of a tag: crop_pct .9 at 224 px, else 1.0 (384 px; the 32 px pico model),
    unless given."""
    if crop_pct is None:
        crop_pct = 0.9 if img == 224 else 1.0
    return dict(tag=tag, input_size=(3, img, img), crop_pct=crop_pct, interpolation="bicubic",
                num_classes=num_classes, **norm)


def _entry(dims: tuple[int, int, int], patch: int, img: int, cfg: dict, **kw: Any) -> dict:
    dim, depth, heads = dims
    kwargs = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  num_classes=cfg["num_classes"], **kw)
    return {"kwargs": kwargs, "default_cfg": cfg}


def _make_archs() -> dict[str, dict]:
    archs = {}
    # timm's ViT names; default tag augreg_in21k_ft_in1k unless noted.
    default_tag = {("base", 16, 224): "augreg2_in21k_ft_in1k", ("large", 32, 384): "orig_in21k_ft_in1k"}
    for size, patch, img in [("tiny", 16, 224), ("tiny", 16, 384), ("small", 16, 224), ("small", 16, 384),
                             ("small", 32, 224), ("small", 32, 384), ("base", 16, 224), ("base", 16, 384),
                             ("base", 32, 224), ("base", 32, 384), ("large", 16, 224), ("large", 16, 384),
                             ("large", 32, 384)]:
        tag = default_tag.get((size, patch, img), "augreg_in21k_ft_in1k")
        archs[f"vit_{size}_patch{patch}_{img}"] = _entry(_SIZES[size], patch, img, _cfg(tag, img, _HALF))
    # vit_large_patch32_224 only has in21k weights without a classifier (timm's default: num_classes 0).
    archs["vit_large_patch32_224"] = _entry(_SIZES["large"], 32, 224, _cfg("orig_in21k", 224, _HALF, 0))
    # DeiT (fb_in1k, ImageNet mean/std), plain and distilled.
    for size in ("tiny", "small", "base"):
        cfg = _cfg("fb_in1k", 224, _IMAGENET)
        archs[f"deit_{size}_patch16_224"] = _entry(_SIZES[size], 16, 224, cfg)
        archs[f"deit_{size}_distilled_patch16_224"] = _entry(_SIZES[size], 16, 224, cfg, distilled=True)
    cfg = _cfg("fb_in1k", 384, _IMAGENET)
    archs["deit_base_patch16_384"] = _entry(_SIZES["base"], 16, 384, cfg)
    archs["deit_base_distilled_patch16_384"] = _entry(_SIZES["base"], 16, 384, cfg, distilled=True)
    # DeiT III: position embedding on the patches only, layer scale (init 1e-6).
    for size, img in [("small", 224), ("small", 384), ("medium", 224), ("base", 224), ("base", 384),
                      ("large", 224)]:
        archs[f"deit3_{size}_patch16_{img}"] = _entry(_SIZES[size], 16, img, _cfg("fb_in1k", img, _IMAGENET),
                                                      no_embed_class=True, init_values=1e-6)
    # DINOv2 (headless, 518 px, patch 14, layer scale 1e-5); reg4: 4 registers without position embedding.
    for size in ("small", "base", "large"):
        cfg = _cfg("lvd142m", 518, _IMAGENET, 0)
        archs[f"vit_{size}_patch14_dinov2"] = _entry(_SIZES[size], 14, 518, cfg, init_values=1e-5)
        archs[f"vit_{size}_patch14_reg4_dinov2"] = _entry(_SIZES[size], 14, 518, cfg, init_values=1e-5,
                                                          reg_tokens=4, no_embed_class=True)
    # CLIP image towers (pre-norm, LayerNorm eps 1e-5; default tags fine-tuned on ImageNet).
    clip = dict(pre_norm=True, norm_eps=1e-5)
    tag = "laion2b_ft_in12k_in1k"
    archs["vit_base_patch16_clip_224"] = _entry(_SIZES["base"], 16, 224, _cfg(tag, 224, _CLIP, crop_pct=0.95), **clip)
    archs["vit_base_patch32_clip_224"] = _entry(_SIZES["base"], 32, 224, _cfg(tag, 224, _CLIP), **clip)
    archs["vit_large_patch14_clip_224"] = _entry(_SIZES["large"], 14, 224, _cfg(tag, 224, _HALF, crop_pct=1.0),
                                                 **clip)
    # SigLIP image towers: no class token, MAP attention-pool head (or average pooling: *_siglip_gap_*).
    for img in (224, 256):
        archs[f"vit_base_patch16_siglip_{img}"] = _entry(_SIZES["base"], 16, img, _cfg("v2_webli", img, _HALF, 0,
                                                                                       crop_pct=0.9),
                                                         class_token=False, global_pool="map")
    archs["vit_base_patch16_siglip_gap_224"] = _entry(_SIZES["base"], 16, 224, _cfg("v2_webli", 224, _HALF, 0),
                                                      class_token=False, global_pool="avg", use_fc_norm=False)
    # Pooled ViTs (timm's *_gap_*): no class token, average of the patch tokens; reg*: registers.
    gap = dict(class_token=False, global_pool="avg")
    archs["vit_medium_patch16_gap_256"] = _entry(_SIZES["medium"], 16, 256, _cfg("sw_in12k_ft_in1k", 256, _HALF,
                                                                                 crop_pct=0.95),
                                                 qkv_bias=False, init_values=1e-6, use_fc_norm=False, **gap)
    reg4 = dict(reg_tokens=4, no_embed_class=True, **gap)
    archs["vit_base_patch16_reg4_gap_256"] = _entry(_SIZES["base"], 16, 256,   # timm: no pretrained weights
                                                    _cfg("untrained", 256, _HALF, crop_pct=0.9), **reg4)
    for size, tag, kw in [("medium", "sbb_in12k_ft_in1k", {}), ("betwixt", "sbb2_e200_in12k_ft_in1k", {}),
                          ("little", "sbb_in1k", {"mlp_ratio": 5.6})]:
        archs[f"vit_{size}_patch16_reg4_gap_256"] = _entry(_SIZES[size], 16, 256, _cfg(tag, 256, _HALF,
                                                                                       crop_pct=0.95),
                                                           init_values=1e-5, **reg4, **kw)
    # The project's own small model for the built-in 32x32 digit images (trained by vitsparse_jax.experiments.train.run).
    archs["vit_pico_patch4_32"] = _entry((64, 6, 4), 4, 32, _cfg("builtin", 32, _HALF, 10), mlp_ratio=2.0)
    return archs


ARCHS: dict[str, dict] = _make_archs()


def build(arch: str, **overrides: Any) -> VisionTransformer:
    """The Flax module of a registered arch; `overrides` replace constructor fields (num_classes, img_size,
    dtype, ...). An img_size that is not a whole number of patches, or options that do not go together, are a
    ValueError here."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    if "fc_norm" in overrides:   # timm's keyword
        overrides["use_fc_norm"] = overrides.pop("fc_norm")
    kwargs = {**ARCHS[arch]["kwargs"], **overrides}
    module = VisionTransformer(arch=arch, **kwargs)
    module.check_options()
    return module
