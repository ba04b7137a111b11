"""XLA:CPU code-generation defaults, set when the package is imported (before jax creates its CPU client).

jaxlib 0.10 hands convolutions, and LayerNorms fused into matmuls, to YNNPACK fusions that run several
times slower than XLA's own kernels on x86 CPUs (VGG16: 0.6 -> 5.6 images/s when they are off; see
BENCHMARKS.md, "The XLA:CPU flag"). The flag is CPU-only: GPU and TPU code is unchanged.

Left alone when XLA_FLAGS already names it, when VITSPARSE_JAX_KEEP_XLA_FLAGS=1, and when the installed
jaxlib does not know the flag (an unknown flag in XLA_FLAGS aborts the process). It only takes effect if
jax has not run anything yet: import vitsparse_jax before your first jax computation.
"""
from __future__ import annotations

import glob
import mmap
import os
from collections.abc import MutableMapping

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = f"--{YNN_FLAG_NAME}="          # an empty list of fusion types: no YNNPACK fusions
OPT_OUT_ENV = "VITSPARSE_JAX_KEEP_XLA_FLAGS"


def jaxlib_knows(flag_name: str) -> bool:
    """Whether a flag name appears in jaxlib's native libraries (flags are registered by name there)."""
    try:
        import jaxlib
    except ImportError:
        return False
    needle = flag_name.encode()
    for path in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "**", "*.so"), recursive=True):
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):   # unreadable or empty file
            continue
    return False


def set_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Adds the YNNPACK-off flag to XLA_FLAGS unless the user chose otherwise; True when it was added."""
    if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return False
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG_NAME in flags or not jaxlib_knows(YNN_FLAG_NAME):
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
    return True
