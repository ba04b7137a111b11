"""vitsparse_jax: sparsity, ablation and receptive fields of ViTs and CNNs in JAX/Flax."""

__version__ = "0.1.0"
