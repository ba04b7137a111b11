"""A linear classifier for a headless tower (`head_weights`, `--config.head_weights=PATH`).

timm's DINOv2, SigLIP, CLIP (`openai`, `laion2b`, ...), MAE and DINO weights have no classifier
(num_classes=0): their output is the pooled features (`pre_logits`, (B, D)). A linear classifier trained
elsewhere on those features (a linear probe) is a `.npz` or `.safetensors` file with

    weight  (num_classes, D)   PyTorch's nn.Linear layout (out, in)
    bias    (num_classes,)

`attach(module, variables, head)` rebuilds the module with `num_classes` classes and puts the file in its
classifier (`kernel = weight.T`), every other variable unchanged: logits = pre_logits @ weight.T + bias.
`drop(module, variables)` removes a classifier (num_classes=0), as timm's `num_classes=0`.
"""
from __future__ import annotations

import dataclasses
import zipfile
import zlib
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.runtime.hashing import sha256_file
import vitsparse_jax.weights.checkpoint as checkpoint
import vitsparse_jax.weights.safetensors_io as safetensors_io

SUFFIXES = (".npz", ".safetensors")
LAYOUT = "'weight' (num_classes, dim) [PyTorch layout] and 'bias' (num_classes,)"


@dataclasses.dataclass(frozen=True)
class Head:
    """A linear classifier read from a file (float32)."""

    path: str
    weight: np.ndarray          # (num_classes, dim)
    bias: np.ndarray            # (num_classes,)
    sha256: str

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def describe(self) -> dict[str, str]:
        """{'weights': path, 'sha256': ...}: the form of `runtime.fingerprint.weights`, so resume keys and the
        completion marker notice a replaced file."""
        return {"weights": self.path, "sha256": self.sha256}


def _shape(a: Any) -> str:
    return "(" + ", ".join(str(d) for d in np.shape(a)) + ("," if np.ndim(a) == 1 else "") + ")"


def read_head(path: str | Path) -> Head:
    """The classifier in `path` (.npz or .safetensors with 'weight' and 'bias'); strict checks, clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head_weights: {path} is not a file (a linear classifier: .npz or .safetensors "
                                f"with {LAYOUT})")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"head_weights: {path} is neither .npz nor .safetensors; save the classifier as one of "
                         f"them with {LAYOUT}, e.g. numpy.savez(path, weight=W, bias=b)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: np.asarray(f[k]) for k in f.files}
        else:
            tensors = safetensors_io.read(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:   # a truncated or foreign file
        detail = str(e) or "no data"
        raise ValueError(f"head_weights: cannot read {path} ({type(e).__name__}: {detail}): it is truncated, damaged "
                         f"or not a {path.suffix} file; save the classifier again ({LAYOUT}, e.g. "
                         f"numpy.savez(path, weight=W, bias=b)) or copy it again") from None
    missing = [k for k in ("weight", "bias") if k not in tensors]
    if missing:
        raise ValueError(f"head_weights: {path} lacks {' and '.join(repr(k) for k in missing)}; it holds "
                         f"{sorted(tensors) or 'nothing'}. Expected exactly {LAYOUT}")
    extra = sorted(set(tensors) - {"weight", "bias"})
    if extra:
        raise ValueError(f"head_weights: {path} holds more than a linear classifier ({extra}); expected only {LAYOUT}")
    weight, bias = tensors["weight"], tensors["bias"]
    for key, a in (("weight", weight), ("bias", bias)):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"head_weights: {path}: {key!r} has dtype {a.dtype}; expected floating point")
    for key, a in (("weight", weight), ("bias", bias)):
        bad = int(np.size(a) - np.isfinite(a).sum())
        if bad:
            raise ValueError(f"head_weights: {path}: {key!r} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or "
                             f"Inf) of {np.size(a)}: the classifier is broken (a diverged training run?); use a "
                             f"classifier with finite weights")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] < 1:
        raise ValueError(f"head_weights: {path} has weight {_shape(weight)} and bias {_shape(bias)}; expected "
                         f"weight (num_classes, dim) and bias (num_classes,) with the same num_classes >= 1 "
                         f"(PyTorch's nn.Linear layout)")
    digest = sha256_file(path)
    return Head(str(path), weight.astype(np.float32), bias.astype(np.float32), digest)


def classifier_keys(module: nn.Module, num_classes: int) -> tuple[str, str, int]:
    """(kernel key, bias key, feature dim) of the one linear classifier of `module` built with `num_classes`
    classes: the variables that exist only with a classifier."""
    with_head = checkpoint.flatten(models.variable_shapes(module.clone(num_classes=num_classes)))
    without = checkpoint.flatten(models.variable_shapes(module.clone(num_classes=0)))
    keys = sorted(k for k, v in with_head.items() if k not in without or without[k].shape != v.shape)
    kernels = [k for k in keys if k.endswith("/kernel") and len(with_head[k].shape) == 2]
    biases = [k for k in keys if k.endswith("/bias") and with_head[k].shape == (num_classes,)]
    name = models.model_info(module).name
    if len(keys) != 2 or len(kernels) != 1 or len(biases) != 1:
        raise ValueError(f"head_weights: {name} has no single linear classifier to load a head into (its classifier "
                         f"variables are {keys}); a distilled DeiT, for one, has two")
    return kernels[0], biases[0], int(with_head[kernels[0]].shape[0])


def feature_dim(module: nn.Module) -> int:
    """D, the size of the pooled features (`pre_logits`) that a classifier of `module` takes."""
    return classifier_keys(module, 1)[2]


def check(module: nn.Module, head: Head) -> None:
    """A head that does not fit `module`'s pooled features is a ValueError naming the shapes expected."""
    dim = feature_dim(module)
    if head.dim != dim:
        name = models.model_info(module).name
        raise ValueError(f"head_weights: {head.path} does not fit {name}: its pooled features are {dim}-dimensional, "
                         f"so the file needs weight ({head.num_classes}, {dim}) and bias ({head.num_classes},) "
                         f"(PyTorch layout: (num_classes, dim)); it has weight {_shape(head.weight)} and bias "
                         f"{_shape(head.bias)}")


def attach(module: nn.Module, variables: Any, head: Head) -> tuple[nn.Module, Any]:
    """(module with head.num_classes classes, variables with the file's classifier; the rest unchanged)."""
    check(module, head)
    new = module.clone(num_classes=head.num_classes)
    kernel, bias, _ = classifier_keys(module, head.num_classes)
    flat = checkpoint.flatten(variables)
    out = {}
    for key, spec in checkpoint.flatten(models.variable_shapes(new)).items():
        if key == kernel:
            out[key] = jnp.asarray(head.weight.T, dtype=spec.dtype)
        elif key == bias:
            out[key] = jnp.asarray(head.bias, dtype=spec.dtype)
        else:
            out[key] = flat[key]
    return new, checkpoint.unflatten(out)


def drop(module: nn.Module, variables: Any) -> tuple[nn.Module, Any]:
    """(the module without a classifier, its variables): timm's num_classes=0, output = pooled features."""
    new = module.clone(num_classes=0)
    flat = checkpoint.flatten(variables)
    return new, checkpoint.unflatten({k: flat[k] for k in checkpoint.flatten(models.variable_shapes(new))})
