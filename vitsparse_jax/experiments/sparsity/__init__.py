"""Sparsity (paper 1, sec. 3-4): `run` (the pass), `probe`, `stats` (streaming statistics), `report`, `figures`."""
