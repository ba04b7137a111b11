"""Exact, ordered totals of per-image values, added a batch at a time without a per-image loop.

Every experiment sums per-image values (statistics, receptive-field maps) over a dataset. Floating-point sums
depend on the order of the additions, so the order is fixed by the images' global indices alone:

- the images are grouped into blocks of K aligned to the global index (block b = images [bK, (b+1)K));
- a block is reduced once all of its images have been seen, vectorised, as a pairwise tree over its K slots
  (slot i = image bK + i; an unreadable image, or a slot past the last image, is an exact zero);
- the reduced blocks are merged into the total one after the other, in block order.

Plain float values are summed; a moment group stored as `<g>_n`, `<g>_mean`, `<g>_cm` (counts, means and
centred co-moments, any group axes between the image axis and the variable axes) is merged with Chan et
al.'s pairwise update at every step; integer values are summed directly, and bin indices (`bins`) counted
directly, at once (both exact in any order).

Because each step depends only on image indices, the totals are bitwise the same for any split of the images
into batches, any padding, any device count, and for images spread over several accumulators (one per host)
whose states are merged (`merge`). Rows of a block that is not complete yet wait in the state; a reduced
block that cannot be merged yet (an earlier block is missing: another host holds it) waits as one reduced
block; nothing is kept after its merge.

The state is a flat dict of numpy arrays (keys start with `prefix`), so a resume state (`Workdir.save_state`)
keeps it. After the images [0, n) in any order it has the same shapes as `init()`: the rows of the open
block live in a fixed (K, ...) buffer, and the arrays of waiting rows and blocks are empty.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping

import numpy as np

FORMAT = 2   # layout of these totals in a resume state; in the pass's key, so that a state of layout 1 (the
             # per-image totals added one by one, before this module) is refused, not misread
MOMENT_PARTS = ("n", "mean", "cm")
CHUNK_BYTES = 64 << 20   # complete blocks are reduced this many bytes of rows at a time (bounded temporaries)


def chan_merge(a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled (n, mean, cm) of two moment groups (Chan et al.), elementwise over any leading axes.

    n (...), mean (..., V), cm (..., V, V). An empty side (n = 0, mean = 0, cm = 0) leaves the other as it is.
    """
    (na, ma, ca), (nb, mb, cb) = a, b
    n = na + nb
    some = n > 0
    f = nb / n if some.all() else np.where(some, nb / np.where(some, n, 1.0), 0.0)
    delta = mb - ma
    cm = ca + cb + delta[..., :, None] * delta[..., None, :] * (na * f)[..., None, None]
    return n, ma + delta * f[..., None], cm


@dataclasses.dataclass(frozen=True)
class OrderedSums:
    """Exact ordered totals of per-image values over the images [0, total) of a dataset.

    shapes: name -> (shape of one image's value, dtype). Float values are kept in their own dtype while
    they wait (float32 maps stay float32) and summed in float64; integer and bool values are summed as int64.
    bins: name -> B for integer values that are bin indices in [0, B) (..., U): their total (..., B) counts
    them over all images and units (a histogram without a per-image histogram).
    """

    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]
    total: int
    block: int = 64
    prefix: str = "sums__"
    bins: Mapping[str, int] = dataclasses.field(default_factory=dict)
    _scratch: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _keys: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"the block size must be a power of two, got {self.block}")
        if self.total < 0:
            raise ValueError(f"the number of images must be >= 0, got {self.total}")
        object.__setattr__(self, "shapes", {k: (tuple(s), np.dtype(d)) for k, (s, d) in self.shapes.items()})
        for name, count in self.bins.items():
            if name not in self.shapes or name in self.floats or not self.shapes[name][0] or count < 1:
                raise ValueError(f"bins[{name!r}] = {count}: needs an integer value with a unit axis "
                                 f"({self.shapes.get(name)}) and at least one bin")
        for g in self.groups:
            (n, _), (mean, _), (cm, _) = (self.shapes[f"{g}_{p}"] for p in MOMENT_PARTS)
            if mean[:-1] != n or cm != mean + mean[-1:]:
                raise ValueError(f"moment group {g!r}: n {n}, mean {mean}, cm {cm} do not fit (n (...), mean "
                                 "(..., V), cm (..., V, V))")

    @classmethod
    def like(cls, values: Mapping[str, np.ndarray], total: int, **kw) -> OrderedSums:
        """Totals for per-image values shaped like `values` (one batch: leading axis = images)."""
        return cls({k: (np.shape(v)[1:], np.asarray(v).dtype) for k, v in values.items()}, total, **kw)

    # --- what is what (fixed by `shapes` and `bins`; computed once) -------------------------------------
    @functools.cached_property
    def floats(self) -> tuple[str, ...]:
        """Values that wait in blocks: float values and moment groups."""
        return tuple(k for k, (_, d) in self.shapes.items() if np.issubdtype(d, np.floating))

    @functools.cached_property
    def groups(self) -> tuple[str, ...]:
        names = [k[:-3] for k in self.floats if k.endswith("_cm")]
        return tuple(g for g in names if all(f"{g}_{p}" in self.floats for p in MOMENT_PARTS))

    @functools.cached_property
    def ints(self) -> tuple[str, ...]:
        """Integer values summed directly (bin indices excluded)."""
        return tuple(k for k in self.shapes if k not in self.floats and k not in self.bins)

    @functools.cached_property
    def plain(self) -> tuple[str, ...]:
        in_group = {f"{g}_{p}" for g in self.groups for p in MOMENT_PARTS}
        return tuple(k for k in self.floats if k not in in_group)

    @functools.cached_property
    def _row_bytes(self) -> int:
        """float64 bytes of one image's float values (the reductions' temporaries)."""
        return sum(int(np.prod(self.shapes[n][0], dtype=np.int64)) * 8 for n in self.floats)

    @property
    def blocks(self) -> int:
        return -(-self.total // self.block)

    def _key(self, part: str, name: str = "") -> str:
        key = self._keys.get((part, name))
        if key is None:
            key = self._keys[(part, name)] = f"{self.prefix}{part}__{name}" if name else f"{self.prefix}{part}"
        return key

    def _total_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float64) if name in self.floats else np.dtype(np.int64)

    # --- state -------------------------------------------------------------------------------------------
    def init(self) -> dict[str, np.ndarray]:
        """The state before any image: zero totals, an empty open block, nothing waiting."""
        k, state = self.block, {self._key("next_block"): np.zeros((), np.int64),
                                self._key("open_seen"): np.zeros(self.block, bool),
                                self._key("rows_index"): np.zeros(0, np.int64),
                                self._key("ahead_block"): np.zeros(0, np.int64)}
        for name, (shape, dtype) in self.shapes.items():
            total_shape = shape[:-1] + (self.bins[name],) if name in self.bins else shape
            state[self._key("total", name)] = np.zeros(total_shape, self._total_dtype(name))
            if name in self.floats:
                state[self._key("open", name)] = np.zeros((k, *shape), dtype)
                state[self._key("rows", name)] = np.zeros((0, *shape), dtype)
                state[self._key("ahead", name)] = np.zeros((0, *shape), np.float64)
        return state

    def add(self, state: dict[str, np.ndarray], values: Mapping[str, np.ndarray], valid: np.ndarray,
            index: np.ndarray) -> dict[str, np.ndarray]:
        """Adds one batch, in place: `values[name]` (B, ...) per image, `valid` (B,) (False: an unreadable image,
        counted as seen with zero values, whatever its row holds), `index` (B,) global image indices (< 0: a
        padding row, ignored). Returns `state` (other keys of the dict are left alone)."""
        index = np.asarray(index).reshape(-1).astype(np.int64)
        seen = index >= 0
        valid = np.asarray(valid, bool).reshape(-1) & seen
        if set(values) != set(self.shapes):
            raise ValueError(f"values {sorted(values)} are not the ones these totals were made for "
                             f"{sorted(self.shapes)}")
        all_seen, all_valid = bool(seen.all()), bool(valid.all())
        for name in self.ints:
            v = np.asarray(values[name])
            key = self._key("total", name)
            state[key] = state[key] + (v if all_valid else v[valid]).sum(axis=0, dtype=np.int64)
        for name, count in self.bins.items():
            v = np.asarray(values[name])
            key = self._key("total", name)
            state[key] = state[key] + self._count(name, v if all_valid else v[valid], count)
        rows = {}
        for name in self.floats:
            v = np.asarray(values[name])
            if v.shape[1:] != self.shapes[name][0]:
                raise ValueError(f"{name}: per-image shape {v.shape[1:]}, expected {self.shapes[name][0]}")
            rows[name] = (v if all_seen else v[seen]).astype(self.shapes[name][1], copy=False)
        self._settle(state, index[seen], rows, valid[seen], np.zeros(0, np.int64), {})
        return state

    def merge(self, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The state of the images of `a` and of `b` together (disjoint images, e.g. two hosts' shares of the
        same batches): bitwise the state one accumulator fed with all of them would reach. At most one of them
        may have merged blocks into its totals: an accumulator that goes on after a merge is the merged state on
        one process, a fresh `init()` on the others."""
        na, nb = int(a[self._key("next_block")]), int(b[self._key("next_block")])
        if na and nb:
            raise ValueError(f"both states have merged blocks into their totals ({na} and {nb} blocks): they hold "
                             "the same images")
        base, other = (a, b) if na >= nb else (b, a)
        state = {k: np.array(base[k]) for k in self.init()}
        for name in (*self.ints, *self.bins):
            state[self._key("total", name)] = state[self._key("total", name)] + other[self._key("total", name)]
        idx, rows = self._waiting_rows(other)
        blocks = np.asarray(other[self._key("ahead_block")], np.int64)
        self._settle(state, idx, rows, np.ones(idx.size, bool), blocks,
                     {n: np.asarray(other[self._key("ahead", n)]) for n in self.floats})
        return state

    def pending(self, state: Mapping[str, np.ndarray]) -> int:
        """Images seen but not merged into the totals yet (waiting rows, or blocks waiting for an earlier one)."""
        return int(state[self._key("open_seen")].sum() + state[self._key("rows_index")].size
                   + state[self._key("ahead_block")].size * self.block)

    def current(self, state: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        """The total of `name` so far: exact at any time for integer values and bin counts (added at once); for
        float values, the blocks merged so far."""
        return np.array(state[self._key("total", name)])

    def result(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The totals, once every image [0, total) has been added (in any order, by any accumulators)."""
        merged = int(state[self._key("next_block")])
        if merged != self.blocks:
            raise RuntimeError(f"the totals are incomplete: {merged} of {self.blocks} blocks of {self.block} "
                               f"images merged ({self.pending(state)} images waiting)")
        return {name: np.array(state[self._key("total", name)]) for name in self.shapes}

    # --- internals ---------------------------------------------------------------------------------------
    def _count(self, name: str, idx: np.ndarray, count: int) -> np.ndarray:
        """Bin indices (R, ..., U) -> counts (..., count) over rows and units."""
        shape = self.shapes[name][0]
        if idx.shape[1:] != shape:
            raise ValueError(f"{name}: per-image shape {idx.shape[1:]}, expected {shape}")
        lead = int(np.prod(shape[:-1], dtype=np.int64))
        if lead > 1 and idx.size and idx.max() >= count:   # would spill into the next row's bins
            raise ValueError(f"{name}: bin indices must lie in [0, {count}), got up to {idx.max()}")
        flat = idx + (np.arange(lead) * count).reshape(shape[:-1] + (1,)) if lead > 1 else idx
        try:   # negative indices raise here, too large ones make the counts too long
            counts = np.bincount(flat.reshape(-1), minlength=lead * count)
        except ValueError as e:
            raise ValueError(f"{name}: bin indices must lie in [0, {count}): {e}") from e
        if counts.size > lead * count:
            raise ValueError(f"{name}: bin indices must lie in [0, {count}), got up to {idx.max()}")
        return counts.reshape(shape[:-1] + (count,))

    def _waiting_rows(self, state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Global indices and rows of every image waiting in `state` (open block, then other rows); rows of
        unreadable images wait as zeros."""
        slots = np.flatnonzero(state[self._key("open_seen")])
        idx = np.concatenate([int(state[self._key("next_block")]) * self.block + slots,
                              np.asarray(state[self._key("rows_index")], np.int64)])
        rows = {n: np.concatenate([np.asarray(state[self._key("open", n)])[slots],
                                   np.asarray(state[self._key("rows", n)])]) for n in self.floats}
        return idx, rows

    def _settle(self, state: dict[str, np.ndarray], idx: np.ndarray, rows: dict[str, np.ndarray], ok: np.ndarray,
                blocks: np.ndarray, reduced: dict[str, np.ndarray]) -> None:
        """Adds rows (`idx`, `rows`; `ok` False: an unreadable image, whose row is never read) and reduced blocks
        (`blocks`, `reduced`) to `state`: reduces every block whose images are all seen, merges blocks into the
        totals in order, keeps the rest waiting."""
        k, next_block = self.block, int(state[self._key("next_block")])
        if (idx >= self.total).any():
            raise ValueError(f"image index {int(idx.max())} is out of range: there are {self.total} images")
        old_slots = np.flatnonzero(state[self._key("open_seen")])
        if old_slots.size or np.size(state[self._key("rows_index")]):   # rows waiting in the state
            old_idx, old_rows = self._waiting_rows(state)
            idx = np.concatenate([old_idx, idx])
            rows = {n: np.concatenate([old_rows[n], rows[n]]) for n in self.floats}
            ok = np.concatenate([np.ones(old_idx.size, bool), ok])
        if idx.size and not (np.diff(idx) > 0).all():   # sort the rows by image (already sorted: no copy)
            order = np.argsort(idx, kind="stable")
            idx, ok, rows = idx[order], ok[order], {n: v[order] for n, v in rows.items()}
        if idx.size and (np.diff(idx) == 0).any():
            raise RuntimeError(f"image {int(idx[np.flatnonzero(np.diff(idx) == 0)[0]])} was added twice")
        row_block = idx // k
        blocks = np.concatenate([np.asarray(state[self._key("ahead_block")], np.int64), blocks])
        reduced = {n: np.concatenate([np.asarray(state[self._key("ahead", n)]), reduced[n]]) if n in reduced
                   else np.asarray(state[self._key("ahead", n)]) for n in self.floats}
        early = np.concatenate([row_block, blocks])
        if early.size and early.min() < next_block:
            raise RuntimeError(f"image block {int(early.min())} was already merged: an image was added twice")
        if np.intersect1d(row_block, blocks).size or np.unique(blocks).size != blocks.size:
            raise RuntimeError("a block of images was added twice")

        # reduced blocks by block id; merged into the totals in block order as soon as they are next in line
        pool = {int(b): {n: reduced[n][j] for n in self.floats} for j, b in enumerate(blocks)}
        next_block = self._fold_ready(state, pool, next_block)
        ids, starts, counts = np.unique(row_block, return_index=True, return_counts=True)
        complete = counts == np.minimum(k, self.total - ids * k)
        for chunk_ids, values in self._reduce(idx, rows, ok, ids[complete], starts[complete], counts[complete]):
            for j, b in enumerate(chunk_ids):
                pool[int(b)] = {n: values[n][j] for n in self.floats}
            next_block = self._fold_ready(state, pool, next_block)
            for b in chunk_ids:   # blocks that wait (an earlier block is missing): out of the scratch buffers
                if int(b) in pool:
                    pool[int(b)] = {n: np.array(v) for n, v in pool[int(b)].items()}
        waiting = sorted(pool)
        state[self._key("next_block")] = np.asarray(next_block, np.int64)
        state[self._key("ahead_block")] = np.asarray(waiting, np.int64)
        for n in self.floats:
            state[self._key("ahead", n)] = (np.stack([pool[b][n] for b in waiting]) if waiting
                                            else np.zeros((0, *self.shapes[n][0]), np.float64))
        # rows of blocks still incomplete: the open block's in its fixed buffer, the others as rows (zeros for
        # unreadable images)
        wait = ~complete[np.searchsorted(ids, row_block)] if idx.size else np.zeros(0, bool)
        opened = np.flatnonzero(wait & (row_block == next_block))
        later = np.flatnonzero(wait & (row_block != next_block))
        seen = np.zeros(k, bool)
        seen[idx[opened] % k] = True
        state[self._key("open_seen")] = seen
        state[self._key("rows_index")] = idx[later]
        for n in self.floats:
            buf = state[self._key("open", n)]
            if buf.flags.writeable and buf.shape == (k, *self.shapes[n][0]) and buf.dtype == self.shapes[n][1]:
                buf[old_slots] = 0   # the open block's old rows were copied out above: reuse its buffer
            else:
                buf = np.zeros((k, *self.shapes[n][0]), self.shapes[n][1])
            buf[idx[opened] % k] = rows[n][opened]
            buf[idx[opened[~ok[opened]]] % k] = 0
            later_rows = rows[n][later]
            later_rows[~ok[later]] = 0
            state[self._key("open", n)] = buf
            state[self._key("rows", n)] = later_rows

    def _reduce(self, idx: np.ndarray, rows: dict[str, np.ndarray], ok: np.ndarray, ids: np.ndarray,
                starts: np.ndarray, counts: np.ndarray) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Complete blocks (rows sorted by image; block `ids[j]` = rows starts[j] : starts[j] + counts[j]) ->
        (block ids, their reductions (C, ...) float64), a few blocks at a time; each reduction is a pairwise tree
        over the block's K slots. The reductions live in scratch buffers that the next chunk reuses."""
        k = self.block
        step = max(1, CHUNK_BYTES // max(k * self._row_bytes, 1))
        for lo in range(0, ids.size, step):    # a few blocks at a time: bounded temporaries for large maps
            sel = slice(lo, lo + step)
            c_ids, c_starts, c_counts = ids[sel], starts[sel], counts[sel]
            first, last = int(c_starts[0]), int(c_starts[-1] + c_counts[-1])
            dense = (last - first == c_ids.size * k and idx[first] == c_ids[0] * k
                     and idx[last - 1] == c_ids[-1] * k + k - 1 and ok[first:last].all())
            if dense:   # consecutive full blocks of readable images, in order: the rows are the blocks (a view)
                bufs = {n: rows[n][first:last].reshape(c_ids.size, k, *self.shapes[n][0]) for n in self.floats}
            else:       # zeros, then the rows of readable images in their slots
                take = np.concatenate([np.arange(s, s + c) for s, c in zip(c_starts, c_counts)])
                take = take[ok[take]]
                which = np.searchsorted(c_ids, idx[take] // k)
                bufs = {}
                for n in self.floats:
                    buf = np.zeros((c_ids.size, k, *self.shapes[n][0]), self.shapes[n][1])
                    buf[which, idx[take] % k] = rows[n][take]
                    bufs[n] = buf
            yield c_ids, self._tree(bufs)

    def _scratch_buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 buffer reused from batch to batch (a fresh large array costs its page faults each time)."""
        buf = self._scratch.get((name, shape))
        if buf is None:
            buf = self._scratch[(name, shape)] = np.empty(shape, np.float64)
        return buf

    def _tree(self, bufs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(C, K, ...) -> (C, ...) float64: slots 2i and 2i + 1 combined, level after level."""
        out = {}
        for n in self.plain:   # the first level into a float64 scratch buffer, the others in place
            x = bufs[n]
            if self.block == 1:
                out[n] = np.array(x[:, 0], np.float64)
                continue
            y = self._scratch_buffer(n, (x.shape[0], x.shape[1] // 2, *x.shape[2:]))
            np.add(x[:, 0::2], x[:, 1::2], out=y, dtype=np.float64)
            step = 1
            while 2 * step <= y.shape[1]:
                np.add(y[:, 0::2 * step], y[:, step::2 * step], out=y[:, 0::2 * step])
                step *= 2
            out[n] = y[:, 0]
        for g in self.groups:
            m = tuple(np.asarray(bufs[f"{g}_{p}"], np.float64) for p in MOMENT_PARTS)
            while m[0].shape[1] > 1:
                m = chan_merge(tuple(x[:, 0::2] for x in m), tuple(x[:, 1::2] for x in m))
            out.update({f"{g}_{p}": x[:, 0] for p, x in zip(MOMENT_PARTS, m)})
        return out

    def _fold_ready(self, state: dict[str, np.ndarray], pool: dict[int, dict[str, np.ndarray]], next_block: int
                    ) -> int:
        """Merges the reduced blocks of `pool` that are next in line into the totals (removing them); returns
        the next block to merge."""
        while next_block in pool:
            self._fold(state, pool.pop(next_block))
            next_block += 1
        return next_block

    def _fold(self, state: dict[str, np.ndarray], reduced: dict[str, np.ndarray]) -> None:
        """Merges one reduced block into the totals (the next one in block order)."""
        for n in self.plain:
            total = state[self._key("total", n)]
            if total.flags.writeable:
                np.add(total, reduced[n], out=total)
            else:
                state[self._key("total", n)] = total + reduced[n]
        for g in self.groups:
            keys = [self._key("total", f"{g}_{p}") for p in MOMENT_PARTS]
            merged = chan_merge(tuple(state[key] for key in keys), tuple(reduced[f"{g}_{p}"] for p in MOMENT_PARTS))
            for key, value in zip(keys, merged):
                state[key] = value
