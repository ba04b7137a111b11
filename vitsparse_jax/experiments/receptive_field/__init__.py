"""Receptive fields (paper 2): `run`, `grad` (the vjps), `report`, `figures`; the locality summary (E_r, S, mean
radius) is `vitsparse_jax.measures.locality`."""
