"""The layers one sparsity run measures (`Probe`) and the maps of one example image (`Example`)."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vitsparse_jax.experiments.sparsity import stats as st


@dataclasses.dataclass(frozen=True)
class Probe:
    """The layers measured in one model and the static layout of their statistics."""

    kind: str                                  # 'attention' | 'cnn'
    names: tuple[str, ...]                     # blocks ('blocks.3', 'layers.2.blocks.1') or CNN layers
    captures: tuple[str, ...]                  # capture names of the forward pass
    layout: st.AttentionLayout | st.ChannelLayout
    token_index: tuple[np.ndarray | None, ...] = ()   # Swin: window column -> raster token, per block

    def column_means(self, aux: dict[str, jax.Array], block: int) -> tuple[jax.Array, jax.Array]:
        """Block `block`'s captured maps -> mu (B, prefix + patches) and mu_h (B, heads, prefix + patches)."""
        probs, index = aux[self.captures[block]], self.token_index[block]
        return st.attention_column_means(probs) if index is None else st.window_column_means(probs, index)

    def reduce(self, aux: dict[str, jax.Array]) -> tuple[list[jax.Array], jax.Array]:
        """Attention captures -> every block's mu and the last block's mu_h."""
        means = [self.column_means(aux, l) for l in range(len(self.names))]
        return [mu for mu, _ in means], means[-1][1]


@dataclasses.dataclass
class Example:
    index: int                        # the image's index in the dataset
    image: np.ndarray                 # (S, S, 3) uint8 crop
    head_map: np.ndarray              # Fig. 1: (rows, cols) map of one head of the last block
    head_title: str
    top_cells: list[tuple[int, int]]  # (row, col) on the last block's grid of its top-3 columns
    heads: np.ndarray                 # Fig. S1: (heads, rows, cols) maps of one block
    heads_title: str
