"""The receptive-field distances of vitsparse_jax.measures.locality that the attention distance is compared with:
the mass-weighted distance and the uniform-map references, against loops over pixels and known values.
(Central regions, E_r, S and the ring-mean radius: tests/test_receptive_field_locality.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

from vitsparse_jax.measures import locality


def brute_force_mass_distance(m: np.ndarray, centre: tuple[float, float]) -> float:
    h, w = m.shape
    num = sum(m[i, j] * math.hypot(i + 0.5 - centre[0], j + 0.5 - centre[1]) for i in range(h) for j in range(w))
    return num / m.sum()


@pytest.mark.parametrize("shape,centre", [((32, 32), (16.0, 16.0)), ((32, 32), (14.0, 14.0)), ((21, 17), (10.5, 3.5))])
def test_mass_weighted_distance_matches_a_loop_over_pixels(shape, centre, rng):
    m = rng.random(shape) ** 3
    assert locality.mass_weighted_distance(m, centre) == pytest.approx(brute_force_mass_distance(m, centre), rel=1e-12)
    assert locality.locality(m, centre).mass_distance == pytest.approx(brute_force_mass_distance(m, centre), rel=1e-12)
    assert locality.mass_weighted_distance(5.0 * m, centre) == pytest.approx(locality.mass_weighted_distance(m, centre))


def test_mass_weighted_distance_weighs_pixels_where_the_ring_mean_weighs_rings():
    """One pixel 10.5 px right of the centre plus the 4 pixels around it: the mass-weighted distance is the
    mass's mean distance, the ring-mean radius averages the two rings (its rings are equal-weighted)."""
    centre = (16.0, 16.0)
    m = np.zeros((32, 32))
    m[15:17, 15:17] = 1.0                             # 4 pixels at distance sqrt(0.5) (ring 0)
    m[15, 26] = 1.0                                   # one pixel at (15.5, 26.5): distance hypot(0.5, 10.5)
    far = math.hypot(0.5, 10.5)
    assert locality.mass_weighted_distance(m, centre) == pytest.approx((4 * math.sqrt(0.5) + far) / 5)
    loc = locality.locality(m, centre)
    e0, e10 = loc.profile[0], loc.profile[10]         # ring means: 4 of 4 pixels, 1 of the ring's pixels
    assert loc.mean_radius == pytest.approx(10 * e10 / (e0 + e10))
    assert math.isnan(locality.mass_weighted_distance(np.zeros((4, 4)), (2.0, 2.0)))
    with pytest.raises(ValueError, match=r"must be \(H, W\)"):
        locality.mass_weighted_distance(np.ones((1, 4, 4)), (2.0, 2.0))


def test_uniform_references_at_224_px():
    """A uniform map around the image centre: ring-mean radius floor(R)/2 = 78.5 px (R = 157.7 px, the corner
    pixel), mass-weighted distance = the mean distance from the centre of a square, s (sqrt 2 + ln(1 + sqrt 2)) / 6."""
    ref = locality.uniform_reference((224, 224), (112.0, 112.0))
    assert ref.ring_mean_radius == 78.5
    assert ref.mass_weighted_distance == pytest.approx(224 * (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 6, rel=1e-4)
    ones = locality.locality(np.ones((224, 224)), (112.0, 112.0))
    assert ones.mean_radius == pytest.approx(ref.ring_mean_radius) and ones.mass_distance == pytest.approx(
        ref.mass_weighted_distance)


def test_uniform_references_off_centre_match_loops():
    centre = (14.0, 14.0)                             # the 8x8 grid's central cell at 32 px
    ref = locality.uniform_reference((32, 32), centre)
    d = [math.hypot(i + 0.5 - 14, j + 0.5 - 14) for i in range(32) for j in range(32)]
    assert ref.mass_weighted_distance == pytest.approx(sum(d) / len(d), rel=1e-12)
    assert ref.ring_mean_radius == math.floor(max(d)) / 2
