"""Ablation (paper 1, sec. 5): `experiment` (checks, the pass, results), `evaluator` (the jitted device step),
`units` (ranking, masks), `report` (metrics, tables), `figures`, `explorer` (report.html)."""
