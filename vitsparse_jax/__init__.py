"""vitsparse_jax: sparsity, ablation and receptive fields of ViTs and CNNs in JAX/Flax."""

from vitsparse_jax.runtime import xla_cpu_flags as _xla_cpu_flags

_xla_cpu_flags.set_cpu_defaults()   # before anything runs jax; see xla_cpu_flags.py

__version__ = "0.1.0"
