"""The receptive-field pass's host step (experiments/receptive_field/host.py): ordered sums of per-image maps."""
import numpy as np
import pytest

from vitsparse_jax.experiments.receptive_field.host import BLOCK, MapTotals

LAYERS, HW, IMAGES = 3, (5, 6), 11


def device_batches(rng, batch: int):
    """Batches as the device gives them: maps (L, B, H, W) float32 over a wide range of magnitudes, padded with
    junk rows (index -1); image 4 unreadable (its row: NaN)."""
    maps = (rng.random((LAYERS, IMAGES, *HW)) * 10.0 ** rng.integers(-6, 6, size=(1, IMAGES, 1, 1))).astype(np.float32)
    valid = np.arange(IMAGES) != 4
    maps[:, 4] = np.nan
    out = []
    for start in range(0, IMAGES, batch):
        rows = np.arange(start, start + batch)
        index = np.where(rows < IMAGES, rows, -1)
        rows = np.minimum(rows, IMAGES - 1)
        out.append((maps[:, rows], valid[rows] & (index >= 0), index))
    return out, maps, valid


def run(batches) -> tuple[MapTotals, dict]:
    totals = MapTotals(LAYERS, HW, IMAGES)
    acc = totals.init()
    for maps, valid, index in batches:
        acc = totals.add(maps, valid, index, acc)
    return totals, acc


@pytest.mark.parametrize("batch", [1, 3, BLOCK, 8])
def test_mean_maps_are_the_same_bits_for_any_batch_size(batch):
    ref_totals, ref = run(device_batches(np.random.default_rng(0), 16)[0])
    totals, acc = run(device_batches(np.random.default_rng(0), batch)[0])
    assert totals.mean(acc).tobytes() == ref_totals.mean(ref).tobytes()
    assert (totals.count(acc), totals.skipped(acc)) == (IMAGES - 1, 1)


def test_mean_maps_equal_the_image_by_image_sums(rng):
    """Within 1e-12 of the loop the pass used before (tests/host_reference.py), which added image by image."""
    from tests.host_reference import add_maps_per_image

    batches, maps, valid = device_batches(rng, 4)
    totals, acc = run(batches)
    old = {"maps": np.zeros((LAYERS, *HW)), "count": np.zeros(()), "skipped": np.zeros(())}
    for b_maps, b_valid, b_index in batches:
        add_maps_per_image(old, b_maps, b_valid, b_index)
    np.testing.assert_allclose(totals.mean(acc), old["maps"] / old["count"], rtol=1e-12)
    np.testing.assert_allclose(totals.mean(acc), maps[:, valid].astype(np.float64).mean(axis=1), rtol=1e-12)


def test_the_mean_needs_every_image():
    totals, acc = run(device_batches(np.random.default_rng(0), 4)[0][:2])
    assert totals.count(acc) == 7                      # readable images so far (image 4 is not)
    with pytest.raises(RuntimeError, match="incomplete"):
        totals.mean(acc)


def test_two_processes_shares_merge_to_the_same_bits():
    """Each process adds only its rows of every batch; the merged accumulators equal one fed everything."""
    batches, _, _ = device_batches(np.random.default_rng(0), 4)
    totals, one = run(batches)
    halves = [totals.init(), totals.init()]
    for maps, valid, index in batches:
        for h, rows in enumerate((slice(0, 2), slice(2, 4))):
            totals.add(maps[:, rows], valid[rows], index[rows], halves[h])
    merged = totals.merge(*halves)
    assert totals.mean(merged).tobytes() == totals.mean(one).tobytes()
    assert (totals.count(merged), totals.skipped(merged)) == (IMAGES - 1, 1)
