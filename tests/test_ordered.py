"""runtime/ordered.py: exact, ordered totals of per-image values, independent of how images arrive."""
import numpy as np
import pytest

from vitsparse_jax.runtime.ordered import OrderedSums
from vitsparse_jax.runtime.workdir import Workdir

IMAGES = 203   # not a multiple of the block size


def per_image_values(rng, n: int = IMAGES) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Values of every kind (plain float64 and float32, counts, bin indices, a moment group with a group axis)
    and the readable flags; unreadable rows hold NaN garbage, which must never reach a total."""
    x = rng.normal(size=(n, 2, 3, 4))
    values = {"plain": rng.normal(size=(n, 3)) * 10.0 ** rng.integers(-8, 8, size=(n, 1)),
              "maps": rng.random((n, 2, 5), dtype=np.float32), "count": rng.integers(0, 5, size=(n, 4)),
              "hist": rng.integers(0, 6, size=(n, 2, 7)),
              "g_n": np.full((n, 2), 4.0), "g_mean": x.mean(-1),
              "g_cm": np.einsum("bgku,bglu->bgkl", x - x.mean(-1, keepdims=True), x - x.mean(-1, keepdims=True))}
    valid = rng.random(n) > 0.1
    for key in ("plain", "maps", "g_mean", "g_cm"):
        values[key][~valid] = np.nan
    return values, valid


def sums_for(values, block: int = 8) -> OrderedSums:
    return OrderedSums.like(values, IMAGES, block=block, bins={"hist": 6})


def feed(sums, state, values, valid, rows) -> None:
    sums.add(state, {k: v[rows] for k, v in values.items()}, valid[rows], rows)


def in_batches(sums, values, valid, batch: int) -> dict:
    """The experiment's way: batches of `batch` rows in dataset order, the last padded with junk rows (index -1)."""
    state = sums.init()
    for start in range(0, IMAGES, batch):
        rows = np.arange(start, start + batch)
        index = np.where(rows < IMAGES, rows, -1)
        rows = np.minimum(rows, IMAGES - 1)   # padding rows repeat the last image, flagged by index -1 only
        sums.add(state, {k: v[rows] for k, v in values.items()}, valid[rows] | (index < 0), index)
    return sums.result(state)


def same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("batch", [3, 8, 13, 64, 256])
def test_totals_are_the_same_bits_for_any_batch_size(rng, batch):
    values, valid = per_image_values(rng)
    sums = sums_for(values)
    same_bits(in_batches(sums, values, valid, batch), in_batches(sums, values, valid, 1))


def test_totals_are_the_same_bits_in_any_arrival_order(rng):
    values, valid = per_image_values(rng)
    sums = sums_for(values)
    state = sums.init()
    order = rng.permutation(IMAGES)
    for start in range(0, IMAGES, 17):
        feed(sums, state, values, valid, order[start:start + 17])
    same_bits(sums.result(state), in_batches(sums, values, valid, 16))


@pytest.mark.parametrize("batch", [10, 40, 7])
def test_two_hosts_with_part_of_every_batch_merge_to_the_same_bits(rng, batch):
    """Two accumulators (hosts), each holding half the rows of every batch; their states merged in either order
    equal one accumulator fed everything, bit for bit."""
    values, valid = per_image_values(rng)
    sums = sums_for(values)
    hosts = [sums.init(), sums.init()]
    for start in range(0, IMAGES, batch):
        rows = np.arange(start, min(IMAGES, start + batch))
        half = len(rows) // 2
        feed(sums, hosts[0], values, valid, rows[:half])
        feed(sums, hosts[1], values, valid, rows[half:])
    assert sums.pending(hosts[1]) > 0                     # host 1 could merge nothing without host 0's blocks
    one = in_batches(sums, values, valid, batch)
    same_bits(sums.result(sums.merge(*hosts)), one)
    same_bits(sums.result(sums.merge(hosts[1], hosts[0])), one)


def test_totals_are_within_1e12_of_image_by_image_sums(rng):
    """Against the per-image path that the pass used before (sequential sums, Chan merges image by image)."""
    from tests.host_reference import accumulate

    values, valid = per_image_values(rng)
    got = in_batches(sums_for(values), values, valid, 32)
    ints = {k: v for k, v in values.items() if k != "hist"}
    old = accumulate({k: np.zeros(v.shape[1:], np.int64 if k == "count" else np.float64) for k, v in ints.items()},
                     ints, valid)
    for key, want in old.items():
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-12 * scale, err_msg=key)
    np.testing.assert_array_equal(got["hist"], np.stack([np.bincount(values["hist"][valid][:, g].ravel(), minlength=6)
                                                         for g in range(2)]))


def test_pooled_moments_equal_the_moments_of_all_units(rng):
    """A moment group (n, mean, centred co-moment per image, a group axis) pools into the moments of every
    (image, unit) pair of the readable images."""
    x = rng.normal(size=(IMAGES, 2, 3, 4)) + rng.normal(size=(IMAGES, 1, 1, 1))   # means differ between images
    centred = x - x.mean(-1, keepdims=True)
    values = {"g_n": np.full((IMAGES, 2), 4.0), "g_mean": x.mean(-1),
              "g_cm": np.einsum("bgku,bglu->bgkl", centred, centred)}
    valid = rng.random(IMAGES) > 0.1
    got = in_batches(OrderedSums.like(values, IMAGES, block=8), values, valid, 32)
    pooled = x[valid].transpose(1, 2, 0, 3).reshape(2, 3, -1)
    pooled_centred = pooled - pooled.mean(-1, keepdims=True)
    np.testing.assert_array_equal(got["g_n"], [4.0 * valid.sum()] * 2)
    np.testing.assert_allclose(got["g_mean"], pooled.mean(-1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got["g_cm"], np.einsum("gku,glu->gkl", pooled_centred, pooled_centred), rtol=1e-11)


def test_after_any_prefix_the_state_has_the_shapes_of_init_and_resumes_from_a_file(rng, tmp_path):
    """After images [0, n) the waiting rows live in the open block's fixed buffer (a resume state of fixed
    shapes, the same on every process), at most K - 1 images wait, and the state saved to an .npz and read back
    continues to the same bits."""
    values, valid = per_image_values(rng)
    sums = sums_for(values)
    shapes = {k: v.shape for k, v in sums.init().items()}
    state = sums.init()
    for start in range(0, 101, 25):
        feed(sums, state, values, valid, np.arange(start, min(101, start + 25)))
        assert {k: v.shape for k, v in state.items()} == shapes
        assert sums.pending(state) < sums.block
    Workdir(tmp_path).save_state(state, {"next_index": 101})
    state = Workdir(tmp_path).load_state()[0]
    feed(sums, state, values, valid, np.arange(101, IMAGES))
    same_bits(sums.result(state), in_batches(sums, values, valid, 25))


def test_an_image_added_twice_or_out_of_range_or_missing_is_an_error(rng):
    values, valid = per_image_values(rng)
    sums = sums_for(values)
    state = sums.init()
    feed(sums, state, values, valid, np.arange(0, 20))
    with pytest.raises(RuntimeError, match="added twice|already merged"):
        feed(sums, state, values, valid, np.arange(5, 6))        # in a merged block
    with pytest.raises(RuntimeError, match="added twice"):
        feed(sums, state, values, valid, np.array([17]))         # in the open block
    state = sums.init()
    with pytest.raises(ValueError, match="out of range"):
        sums.add(state, {k: v[:1] for k, v in values.items()}, valid[:1], np.array([IMAGES]))
    feed(sums, state, values, valid, np.arange(0, IMAGES - 1))
    with pytest.raises(RuntimeError, match="incomplete"):
        sums.result(state)
    with pytest.raises(ValueError, match="bin indices"):
        sums.add(sums.init(), {**{k: v[:1] for k, v in values.items()}, "hist": np.full((1, 2, 7), 6)},
                 np.ones(1, bool), np.zeros(1, int))


def test_the_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        OrderedSums({"x": ((), np.float64)}, 10, block=6)
