"""Shared helpers of the benchmark scripts: machine facts, timing, FLOP counting, result rows.

Not a benchmark itself. Every script in this folder:
  - runs this project (JAX, jitted) and its PyTorch peer in the same process, interleaved run by run,
    on the same device kind (GPU when both jax and torch see one, else CPU), same dtype and batch size;
  - reports the median of `--runs` timed runs (after warm-up / compilation, which is reported apart), the
    ratio of the medians, and the 1-minute load average of the machine before and after each figure;
  - prints a markdown row per figure and, with `--json PATH`, appends one record per figure to PATH.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run as `python benchmarks/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# Before any jax computation: the package's XLA:CPU flags (vitsparse_jax/xla_cpu_flags.py) apply to both the
# project and jax-only baselines such as the matmul peak; XLA_FLAGS, as in effect, is recorded per figure,
# and the command line shows only what the user set.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
import vitsparse_jax  # noqa: E402,F401

# Pause between timed runs, so that the spinning worker threads of the framework that ran last (OpenMP in
# torch, Eigen in XLA:CPU) have gone to sleep before the other framework starts its run.
SETTLE_S = 0.5

# Constructor overrides per timm arch name, applied by flax_model(), model_pair() and timm_model():
# name -> (timm.create_model kwargs, models.create_model kwargs). Empty for real measurements; the GPU suite's
# --smoke mode fills it with tiny variants of the same architectures (benchmarks/gpu_suite.py).
MODEL_OVERRIDES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
# When not None, every timm model that timm_model() builds is perturbed with tests/timm_perturb.py (seeded
# with this) before it moves to its device: LayerNorm/BatchNorm away from identity, non-zero biases, peaked
# attention, so that predictions differ between images and under ablation (as in the parity tests).
PERTURB_SEED: int | None = None


# --------------------------------------------------------------------------------------------------------
# Machine and versions

def loadavg() -> float:
    """1-minute load average of the machine (0.0 where /proc/loadavg is missing)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_same_device_kind() -> str:
    """'gpu' or 'cpu'; refuses to compare a GPU run of one framework with a CPU run of the other."""
    import jax

    jax_kind = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else jax.default_backend()
    try:
        torch_kind = "gpu" if torch_device() == "cuda" else "cpu"
    except ImportError:
        return jax_kind
    if jax_kind != torch_kind:
        raise SystemExit(f"jax runs on {jax_kind} but torch on {torch_kind}: the comparison would not be on the "
                         f"same device. Install the matching CUDA builds of both (or hide the GPU from both).")
    return jax_kind


def machine() -> dict[str, Any]:
    """Device, core count and versions, for the record of every figure."""
    import jax
    import jaxlib

    out: dict[str, Any] = {"host_cpu": cpu_model(), "host_cores": os.cpu_count(),
                           "jax_backend": jax.default_backend(),
                           "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
                           "xla_flags": os.environ.get("XLA_FLAGS", ""),
                           "python": platform.python_version(), "jax": jax.__version__,
                           "jaxlib": jaxlib.__version__}
    for name in ("flax", "numpy", "torch", "timm"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
        else:
            out["torch_device"] = "cpu"
    except ImportError:
        pass
    return out


def device_label(info: Mapping[str, Any]) -> str:
    if info["jax_backend"] == "cpu":
        return f"CPU {info['host_cpu']} x{info['host_cores']} cores"
    return ", ".join(sorted(set(info["jax_devices"])))


def versions_label(info: Mapping[str, Any]) -> str:
    return (f"jax {info['jax']}, flax {info['flax']}, torch {info['torch']}, timm {info['timm']}, "
            f"python {info['python']}; XLA_FLAGS in effect: {info['xla_flags'] or '(none)'}")


def command_line() -> str:
    """The command as typed, with XLA_FLAGS in front when the user set it (it changes XLA's code generation;
    what the package adds on import is in the record's `xla_flags`)."""
    flags = USER_XLA_FLAGS
    prefix = f"XLA_FLAGS={shlex.quote(flags)} " if flags else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in sys.argv)


def wait_for_calm(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> float:
    """Waits until the 1-minute load average is below `max_load` (at most `max_wait_s`); returns it."""
    start = time.time()
    load = loadavg()
    while max_load > 0 and load >= max_load and time.time() - start < max_wait_s:
        print(f"  load average {load:.2f} >= {max_load}: waiting ({time.time() - start:.0f} s so far)", flush=True)
        time.sleep(poll_s)
        load = loadavg()
    return load


def add_common_args(parser: argparse.ArgumentParser, *, runs: int = 3) -> None:
    parser.add_argument("--runs", type=int, default=runs, help="timed runs per measurement (median reported)")
    parser.add_argument("--json", default="", help="append one JSON record per figure to this file")
    parser.add_argument("--wait_load", type=float, default=0.0,
                        help="before each measurement, wait until the 1-min load average is below this (0 = never)")
    parser.add_argument("--wait_max_s", type=float, default=2400.0, help="longest wait for --wait_load")
    parser.add_argument("--seed", type=int, default=0)


# --------------------------------------------------------------------------------------------------------
# dtypes

def jax_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def torch_precision(device: str, dtype: str) -> Any:
    """A context manager for the torch side: fp32 = strict fp32 (no TF32), bf16 = torch.autocast."""
    import contextlib

    import torch

    if device == "cuda":   # the project computes fp32 matmuls/convs at HIGHEST precision: no TF32 on either side
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# Timing

@dataclasses.dataclass
class Timed:
    """Seconds of each timed run of one contender; `work` = units of work (e.g. images) per run."""

    name: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    work: float = 1.0
    warmup_s: float = 0.0      # first call(s): compilation, autotuning, caches
    last: Any = None           # the result of the last timed call (synced), for sanity checks

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """work per second, from the median run."""
        return self.work / self.median_s

    @property
    def rate_per_cpu_s(self) -> float:
        """work per CPU-second of this process (median over runs): on a CPU this hardly depends on what else
        runs on the machine, unlike the wall-clock rate."""
        return statistics.median(self.work / c for c in self.cpu_seconds if c > 0) if self.cpu_seconds else 0.0

    def spread(self) -> str:
        return f"{min(self.seconds):.3g}-{max(self.seconds):.3g} s"


def timed_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of fn() up to `sync(result)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(out)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleaved(contenders: Mapping[str, tuple[Callable[[], Any], Callable[[Any], Any]]], *, runs: int,
                work: float, warmup: int = 1, iters: int = 1,
                verbose: bool = True) -> tuple[dict[str, Timed], list[float]]:
    """Times each contender `runs` times, alternating between them run by run (A B C A B C ...).

    contenders: name -> (fn, sync). Each run calls fn `iters` times; `work` is the work of one call.
    Returns the Timed of each and the load averages seen (before the first and after each round).
    """
    out = {name: Timed(name, work=work * iters) for name in contenders}
    for name, (fn, sync) in contenders.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            sync(fn())
        out[name].warmup_s = time.perf_counter() - t0
        if verbose:
            print(f"  warm-up {name}: {out[name].warmup_s:.1f} s", flush=True)
    loads = [loadavg()]
    for r in range(runs):
        for name, (fn, sync) in contenders.items():
            time.sleep(SETTLE_S)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                res = fn()
            sync(res)
            out[name].last = res
            out[name].seconds.append(time.perf_counter() - wall)
            out[name].cpu_seconds.append(time.process_time() - cpu)
            if verbose:
                print(f"  run {r + 1}/{runs} {name}: {out[name].seconds[-1]:.3f} s", flush=True)
        loads.append(loadavg())
    return out, loads


def jax_sync(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def torch_sync_fn(device: str) -> Callable[[Any], Any]:
    import torch

    def sync(_: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
    return sync


# --------------------------------------------------------------------------------------------------------
# FLOPs, counted from the program's shapes

def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def _sub_jaxprs(value: Any) -> list[Any]:
    if hasattr(value, "eqns"):                      # core.Jaxpr
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):   # core.ClosedJaxpr
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: Any) -> float:
    """Multiply-add FLOPs (2 per MAC) of every dot_general and conv_general_dilated in a jaxpr, from the
    operand shapes; recurses into sub-programs (pjit, custom_jvp/vjp, remat, scan x length, cond = max
    branch). Elementwise work (softmax, GELU, norms, adds) is not counted."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * _prod(eqn.outvars[0].aval.shape) * _prod([lhs[i] for i in lhs_contract])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec   # (out feature, in feature, *spatial) dims
            in_per_group = rhs[spec[1]]                       # already C_in / feature_group_count
            # lhs_dilation > 1 (the input gradient of a strided conv) inserts zeros between the inputs: only
            # 1 / prod(lhs_dilation) of the kernel taps meet a real input, the others are not counted
            dilation = _prod(eqn.params.get("lhs_dilation") or (1,))
            total += (2.0 * _prod(eqn.outvars[0].aval.shape) * in_per_group * _prod([rhs[d] for d in spec[2:]])
                      / dilation)
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "cond":
            total += max(jaxpr_flops(j) for j in subs)
        elif name == "scan":
            total += eqn.params["length"] * sum(jaxpr_flops(j) for j in subs)
        elif name == "while":
            total += sum(jaxpr_flops(j) for j in subs)   # trip count unknown: counted once
        else:
            total += sum(jaxpr_flops(j) for j in subs)
    return total


def count_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of fn(*args) (matmuls and convolutions, 2 per multiply-add), from its jaxpr."""
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(jitted: Any, *args: Any) -> float | None:
    """XLA's own cost analysis of the compiled program ('flops'), for cross-checking; None if unavailable."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:   # noqa: BLE001 - cost analysis is optional on some backends
        return None


def vit_flops_closed_form(depth: int, dim: int, tokens: int, patch: int, img: int, classes: int,
                          mlp_ratio: float = 4.0) -> float:
    """Closed-form ViT forward FLOPs (2 per MAC): per block 2N(3D^2 + D^2 + 2 r D^2) + 2 * 2 N^2 D, plus the
    patch embedding and the head."""
    n, d = tokens, dim
    block = 2 * n * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * n * n * d
    embed = 2 * (img // patch) ** 2 * d * 3 * patch * patch
    return depth * block + embed + 2 * d * classes


# --------------------------------------------------------------------------------------------------------
# Models

def flax_model(name: str, dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """(module, variables) of this project's model with timm's random init (weights do not matter for speed)."""
    from vitsparse_jax import models

    module = models.create_model(name, dtype=jax_dtype(dtype), **MODEL_OVERRIDES.get(name, ({}, {}))[1])
    return module, models.init_untrained(module, seed)


def timm_model(name: str, device: str, *, fused_attn: bool | None = None) -> Any:
    """timm model with pretrained=False (random init; perturbed when PERTURB_SEED is set), eval mode, on
    `device`. fused_attn=False turns off F.scaled_dot_product_attention in every attention module (needed to
    see the attention maps); None keeps timm's default (also after the perturbation, which turns it off)."""
    import timm

    if PERTURB_SEED is not None:   # timm's init draws from torch's global generator: the same weights every run
        import torch

        torch.manual_seed(PERTURB_SEED)
    model = timm.create_model(name, pretrained=False, **MODEL_OVERRIDES.get(name, ({}, {}))[0])
    if PERTURB_SEED is not None:
        from tests.timm_perturb import perturb

        fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
        perturb(model, PERTURB_SEED)
        for m, on in fused.items():
            m.fused_attn = on
    model = model.eval().to(device)
    if fused_attn is not None:
        set_fused_attn(model, fused_attn)
    return model


def set_fused_attn(module: Any, on: bool) -> int:
    count = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = on
            count += 1
    return count


def model_pair(name: str, dtype: str, device: str, seed: int = 0, *, share: bool = True,
               fused_attn: bool | None = None) -> tuple[Any, Any, Any, Any | None]:
    """(timm model, project module, variables, shared): with `share`, variables = the timm model's weights
    converted (`shared` is them too); else, or when conversion fails, the project's own random init (`shared`
    None). The init is skipped when the weights are shared: jitting `module.init` costs seconds per model."""
    from vitsparse_jax import models

    model = timm_model(name, device, fused_attn=fused_attn)
    module = models.create_model(name, dtype=jax_dtype(dtype), **MODEL_OVERRIDES.get(name, ({}, {}))[1])
    shared = shared_weights(model, module) if share else None
    return model, module, (shared if shared is not None else models.init_untrained(module, seed)), shared


def shared_weights(timm_model_: Any, module: Any) -> Any | None:
    """The timm model's weights as this project's variables (checkpoints_convert), so that both sides
    compute the same function and their outputs can be compared; None when conversion fails."""
    try:
        from checkpoints_convert import convert_timm_module

        variables, _ = convert_timm_module(timm_model_, module)
        import jax

        return jax.device_put(variables)
    except Exception as e:   # noqa: BLE001 - the comparison is a sanity check, the timing does not need it
        print(f"  (weights not shared: checkpoints_convert failed: {type(e).__name__}: {e})")
        return None


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (B, S, S, 3) random crops (content does not matter for speed)."""
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def normalized_nhwc(images: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Output

def md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def start(with_torch: bool = True, extra: str = "") -> dict[str, Any]:
    """Machine facts; checks that jax and torch use the same device kind (`with_torch`); prints the command,
    the device and the versions (+ `extra`). Every script begins with this."""
    info = machine()
    if with_torch:
        check_same_device_kind()
    print(f"command: {command_line()}\ndevice: {device_label(info)}; {versions_label(info)}{extra}")
    return info


def print_table_head(columns: Sequence[str]) -> None:
    print(md_row(columns))
    print(md_row(["---"] * len(columns)))


def fmt_rate(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def append_json(path: str, record: Mapping[str, Any]) -> None:
    """Appends `record` to the JSON list in `path` (created if missing)."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(p.read_text()) if p.exists() and p.read_text().strip() else []
    rows.append(record)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    tmp.replace(p)


def record(benchmark: str, info: Mapping[str, Any], loads: Sequence[float], **fields: Any) -> dict[str, Any]:
    return {"benchmark": benchmark, "command": command_line(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": device_label(info), "machine": dict(info),
            "load_avg_1min": [round(x, 2) for x in loads], **fields}


def load_label(loads: Sequence[float]) -> str:
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
