"""The layers one sparsity run measures (`Probe`) and the maps of one example image (`Example`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
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
    norm_captures: tuple[str, ...] = ()        # SPEC sec. 7: 'embed' and every block output, whose token norms
                                               # are measured (ViTs; () = off)

    @property
    def all_captures(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.captures + self.norm_captures))

    def column_means(self, aux: dict[str, jax.Array], block: int) -> tuple[st.Pair, st.Pair]:
        """Block `block`'s captured maps -> mu (B, prefix + patches) and mu_h (B, heads, prefix + patches), each
        as a (float32 mean, its rounding error) pair."""
        probs, index = aux[self.captures[block]], self.token_index[block]
        if index is None:
            return st.attention_column_means_split(probs)
        return st.window_column_means_split(probs, index)

    def reduce(self, aux: dict[str, jax.Array]) -> dict[str, Any]:
        """Captures -> the per-image device values that the host turns into statistics (`host_values`)."""
        if self.kind == "attention":
            means = [self.column_means(aux, l) for l in range(len(self.names))]
            out = {"mu": [mu for mu, _ in means], "last_mu_h": means[-1][1]}
            if self.norm_captures:   # (B, blocks + 1, N)
                out["norms"] = jnp.stack([jnp.linalg.norm(aux[c].astype(jnp.float32), axis=-1)
                                          for c in self.norm_captures], axis=1)
            return out
        acts = [aux[n] for n in self.names]
        return {"l1": [st.channel_l1(a) for a in acts], "active": jnp.stack([st.active_fraction(a) for a in acts], 1)}

    def host_values(self, reduced: dict[str, Any]) -> dict[str, np.ndarray]:
        """`reduce`'s output on the host -> every statistic of each image (float64), for `st.accumulate`."""
        if self.kind == "attention":
            mus = [st.hi_lo(m) for m in reduced["mu"]]
            values = st.attention_image_values(mus, st.hi_lo(reduced["last_mu_h"]), self.layout)
            if "norms" in reduced:
                values.update(st.norm_image_values(mus, np.asarray(reduced["norms"], np.float64), self.layout))
            return values
        return st.channel_image_values(reduced["l1"], reduced["active"], self.layout)

    def image_rows(self, reduced: dict[str, Any]) -> dict[str, np.ndarray]:
        """Per-image outputs (`sparsity.per_image`): the last block's mu over all columns, its top-k patch
        columns (token indices, k = `layout.top_k`) and, when measured, the token norms of the last block's
        input and output."""
        lay = self.layout
        mu = st.hi_lo(reduced["mu"][-1])
        top = np.argsort(-mu[:, lay.prefix:], axis=-1, kind="stable")[:, :lay.top_k] + lay.prefix
        rows = {"mu_last": mu.astype(np.float32), "top_columns": top.astype(np.int32)}
        if "norms" in reduced:
            norms = np.asarray(reduced["norms"], np.float32)
            rows.update(norm_in=norms[:, -2], norm_out=norms[:, -1])
        return rows


@dataclasses.dataclass
class Example:
    index: int                        # the image's index in the dataset
    image: np.ndarray                 # (S, S, 3) uint8 crop
    head_map: np.ndarray              # Fig. 1: (rows, cols) map of one head of the last block
    head_title: str
    top_cells: list[tuple[int, int]]  # (row, col) on the last block's grid of its top-3 columns
    heads: np.ndarray                 # Fig. S1: (heads, rows, cols) maps of one block
    heads_title: str
    norm_scatter: dict[str, np.ndarray] | None = None   # SPEC sec. 7: last block's mu and input norms, a few images
