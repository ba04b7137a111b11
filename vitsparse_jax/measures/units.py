"""How many units a fraction selects, shared by the ablation (units dropped) and the sparsity statistics
(top columns, channels): docs/science.md#ablation-units."""
from __future__ import annotations


def count(p: float, units: int) -> int:
    """k = round(p * U) (Python's round: halves go to the even neighbour)."""
    return int(round(p * units))
