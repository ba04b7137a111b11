"""Quantities shared by experiments (no experiment imports another): `locality` (central regions, the
receptive-field locality summary and distances), `attention_distance` (mean attention distance, prefix
mass and entropy per head, computed in the jitted device step), `attention_summary` (those of every block of a
model, their per-image values for ordered totals and per-head results), `gradient_fields` (receptive-field
layers and the batched gradient program) and `units`. Imports only `vitsparse_jax.models` and `vitsparse_jax.data`
(the on-device normalisation)."""
