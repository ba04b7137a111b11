"""Attention distance against gradient receptive fields, per block (docs/science.md#attention-distance)."""
