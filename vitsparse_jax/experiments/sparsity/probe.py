"""The layers one sparsity run measures (`Probe`) and the maps of one example image (`Example`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.measures.attention_summary import BlockMeasures
from vitsparse_jax.runtime.ordered import OrderedSums

HOST_CHUNK = 64    # images whose statistics are computed together on the host (measured: 64 beats 128 to 1024: the
                   # chunk's arrays stay in the CPU's caches, and glibc keeps reusing their memory)


@dataclasses.dataclass(frozen=True)
class Probe:
    """The layers measured in one model and the static layout of their statistics."""

    kind: str                                  # 'attention' | 'cnn'
    names: tuple[str, ...]                     # blocks ('blocks.3', 'layers.2.blocks.1') or CNN layers
    captures: tuple[str, ...]                  # capture names of the forward pass
    layout: st.AttentionLayout | st.ChannelLayout
    token_index: tuple[np.ndarray | None, ...] = ()   # Swin: window column -> raster token, per block
    norm_captures: tuple[str, ...] = ()        # high-norm-tokens: 'embed' and every block output, whose token norms
                                               # are measured (ViTs; () = off)
    distances: BlockMeasures | None = None     # attention distance, prefix mass, entropy per block and head
                                               # (docs/science.md#attention-distance; attention only)

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
            if self.distances is not None:   # (B, blocks, heads) each
                out["distances"] = self.distances(aux)
            return out
        acts = [aux[n] for n in self.names]
        return {"l1": [st.channel_l1(a) for a in acts], "active": jnp.stack([st.active_fraction(a) for a in acts], 1)}

    def host_values(self, reduced: dict[str, Any]) -> dict[str, np.ndarray]:
        """`reduce`'s output on the host -> every statistic of each image (vectorised; float64 but for counts
        and bin indices), for the totals of `totals`. A large batch is computed HOST_CHUNK images at a time
        (the arrays of a chunk stay in the CPU's caches; each image's values do not depend on its batch)."""
        rows = len(jax.tree.leaves(reduced)[0])
        if rows > HOST_CHUNK:
            chunks = [slice(start, start + HOST_CHUNK) for start in range(0, rows, HOST_CHUNK)]
            parts = [self._host_values(jax.tree.map(lambda x, chunk=chunk: np.asarray(x)[chunk], reduced))
                     for chunk in chunks]
            return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        return self._host_values(reduced)

    def _host_values(self, reduced: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.kind == "attention":
            norms = np.asarray(reduced["norms"]) if "norms" in reduced else None   # float32: ranked as it is
            shapes = {np.shape(hi) for hi, _ in reduced["mu"]}
            if len(shapes) == 1:   # blocks of one size (ViT): prefix and patch columns (B, blocks, ...)
                (b, n), = shapes
                p, blocks = self.layout.prefix, len(reduced["mu"])
                mus = st.SplitMu(np.empty((b, blocks, p)), np.empty((b, blocks, n - p)))
                for block, (hi, lo) in enumerate(reduced["mu"]):   # = hi_lo, in place
                    hi, lo = np.asarray(hi), np.asarray(lo)
                    np.add(hi[:, :p], lo[:, :p], out=mus.prefix[:, block], dtype=np.float64)
                    np.add(hi[:, p:], lo[:, p:], out=mus.patch[:, block], dtype=np.float64)
            else:
                mus = [st.hi_lo(m) for m in reduced["mu"]]
            values = st.attention_image_values(mus, st.hi_lo(reduced["last_mu_h"]), self.layout, norms)
            if self.distances is not None:
                values.update(self.distances.host_values(reduced["distances"]))
            return values
        return st.channel_image_values(reduced["l1"], reduced["active"], self.layout)

    def totals(self, values: dict[str, np.ndarray], images: int) -> OrderedSums:
        """The ordered totals of `host_values` (shaped like `values`, any batch) over `images` images."""
        return st.totals_for(values, images, self.layout)

    def image_rows(self, reduced: dict[str, Any]) -> dict[str, np.ndarray]:
        """Per-image outputs (`sparsity.per_image`): the last block's mu over all columns, its top-k patch
        columns (token indices, k = `layout.top_k`), when measured, the token norms of the last block's
        input and output, and each block's per-head attention distances and prefix mass."""
        lay = self.layout
        mu = st.hi_lo(reduced["mu"][-1])
        patch = mu[:, lay.prefix:]
        chosen = st.top_mask_of_sorted(patch, np.sort(patch, axis=-1), lay.top_k)   # k per row, ties: lower index
        cols = np.nonzero(chosen)[1].reshape(len(mu), lay.top_k)                  # ascending index
        ranked = np.argsort(-np.take_along_axis(patch, cols, axis=-1), axis=-1, kind="stable")
        top = np.take_along_axis(cols, ranked, axis=-1) + lay.prefix             # by mu, ties: lower index
        rows = {"mu_last": mu.astype(np.float32), "top_columns": top.astype(np.int32)}
        if "norms" in reduced:
            norms = np.asarray(reduced["norms"], np.float32)
            rows.update(norm_in=norms[:, -2], norm_out=norms[:, -1])
        if self.distances is not None:   # each block's per-head distances (all, central queries), prefix mass
            rows.update(self.distances.image_rows(reduced["distances"]))
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
    norm_scatter: dict[str, np.ndarray] | None = None   # high-norm-tokens: last block's mu, input norms, a few images
