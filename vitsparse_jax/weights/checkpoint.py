"""Converted weights: `<dir>/<arch>.<tag>.safetensors` + `<dir>/<arch>.<tag>.json` (docs/design.md).

Keys are flax variable paths joined by '/', e.g. `params/blocks_3/attn/qkv/kernel`. Loading checks every
key and shape against the module and needs neither torch nor timm.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

import vitsparse_jax
from vitsparse_jax.runtime.workdir import atomic_write_bytes

FORMAT_VERSION = 1
SEP = "/"


def reconvert_hint(weights: Path, source: str = "") -> str:
    """How to replace a damaged converted checkpoint `<dir>/<arch>.<tag>.safetensors` (it is overwritten in place)."""
    command = f"python -m checkpoints_convert --model {weights.stem} --out {weights.parent}"
    if source.startswith("file:"):
        return f"Convert it again: {command} --from-file {source.removeprefix('file:')}"
    return (f"Convert it again: {command} (from the Hugging Face hub; add --from-file FILE for a local timm file), "
            f"or copy it again from where it came from.")


class CheckpointError(ValueError):
    """A converted checkpoint does not fit the model (missing / unexpected / mis-shaped parameter, wrong model)."""


def flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Nested flax variables -> {'params/blocks_0/attn/qkv/kernel': array}; flat input is returned as is."""
    if all(not isinstance(v, Mapping) for v in variables.values()):
        return dict(variables)
    return flax.traverse_util.flatten_dict(dict(variables), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return flax.traverse_util.unflatten_dict(dict(flat), sep=SEP)


def paths_for(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights .safetensors, metadata .json) of a checkpoint given either file."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{path}: a converted checkpoint is a .safetensors file with a .json next to it")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")



def _versions() -> dict[str, str]:
    versions = {"vitsparse_jax": vitsparse_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
                "numpy": np.__version__, "safetensors": safetensors.__version__}
    for name in ("torch", "timm"):   # recorded when the converter imported them; never imported here
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            versions[name] = str(mod.__version__)
    return versions


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save(out_dir: str | os.PathLike, arch: str, tag: str, variables: Mapping[str, Any],
         pretrained_cfg: Mapping[str, Any], source: str) -> Path:
    """Writes `<out_dir>/<arch>.<tag>.safetensors` and `.json` atomically; returns the .safetensors path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, meta_path = paths_for(out_dir / f"{arch}.{tag}.safetensors")
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(variables).items()}
    meta = {"model": arch, "tag": tag, "pretrained_cfg": _jsonable(dict(pretrained_cfg)), "source": source,
            "format_version": FORMAT_VERSION, "versions": _versions()}
    atomic_write_bytes(weights, safetensors.numpy.save(tensors, metadata={"model": arch, "tag": tag}))
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())   # written last: marks complete
    return weights


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    _, meta_path = paths_for(path)
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path} is missing (every converted .safetensors has a .json next to it)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the checkpoint's metadata is damaged. "
                              f"{reconvert_hint(meta_path.with_suffix('.safetensors'))}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds {type(meta).__name__}, not the checkpoint's metadata (a JSON "
                              f"object). {reconvert_hint(meta_path.with_suffix('.safetensors'))}")
    return meta


def load(path: str | os.PathLike, module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a converted checkpoint for `module`; returns (variables, meta). Strict: see CheckpointError."""
    from vitsparse_jax import models  # late import: models imports nothing from here

    weights, _ = paths_for(path)
    meta = read_meta(path)
    info = models.model_info(module)
    model = info.name
    if meta.get("model") != model:
        raise CheckpointError(f"wrong checkpoint: {weights.name} holds weights of {meta.get('model')!r}, "
                              f"the module is {model!r}")
    ckpt_classes = meta.get("pretrained_cfg", {}).get("num_classes")
    if ckpt_classes is not None and int(ckpt_classes) != info.num_classes:
        raise CheckpointError(f"{weights.name} has num_classes={ckpt_classes} but the {model} module has "
                              f"num_classes={info.num_classes}; build it with "
                              f"models.create_model({model!r}, num_classes={ckpt_classes})")
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing")
    try:
        tensors = safetensors.numpy.load_file(str(weights))
    except OSError as e:
        raise CheckpointError(f"{weights} cannot be read: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001  (safetensors' own SafetensorError)
        raise CheckpointError(f"{weights} cannot be read as .safetensors ({e}): it is truncated or damaged "
                              f"(e.g. an interrupted copy or download). "
                              f"{reconvert_hint(weights, str(meta.get('source', '')))}") from None
    tensors = models.fit_variables(module, tensors)   # e.g. DINOv2's 518 px position embedding run at 224
    expected = flatten(models.variable_shapes(module))
    check_tensors(tensors, {k: tuple(v.shape) for k, v in expected.items()}, model)
    for key in sorted(expected):   # an integer tensor would be cast silently: wrong numbers
        if jnp.issubdtype(expected[key].dtype, jnp.floating) and np.asarray(tensors[key]).dtype.kind != "f":
            raise CheckpointError(f"{weights}: tensor {key!r} is {np.asarray(tensors[key]).dtype}, but {model} "
                                  f"expects floating point there: the file is damaged or not a converted "
                                  f"checkpoint. {reconvert_hint(weights, str(meta.get('source', '')))}")
    variables = {k: jnp.asarray(tensors[k], dtype=expected[k].dtype) for k in expected}
    return unflatten(variables), meta


def check_tensors(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], model: str) -> None:
    """Raises CheckpointError naming the first missing, unexpected or mis-shaped parameter."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{model}: parameter {missing[0]!r} missing from the checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{model}: unexpected parameter {unexpected[0]!r} in the checkpoint"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key in sorted(expected):
        shape = tuple(np.shape(tensors[key]))
        if shape != tuple(expected[key]):
            raise CheckpointError(f"{model}: parameter {key!r} has shape {shape} in the checkpoint, "
                                  f"the model expects {tuple(expected[key])}")
