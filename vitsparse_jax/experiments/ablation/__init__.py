"""Ablation (paper 1, sec. 5): `run` (the pass), `units` (ranking, masks), `report` (metrics, tables), `figures`."""
