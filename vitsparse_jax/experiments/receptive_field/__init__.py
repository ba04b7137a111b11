"""Receptive fields (paper 2): `run`, `grad` (the vjps), `locality` (E_r, S, mean radius), `report`, `figures`."""
