"""Tests for synthmed.models.value_grid's linear-time cell lookup."""

from __future__ import annotations

import numpy as np

from synthmed.models.value_grid import cell_boundaries, cell_index, exact_step, grid_times


def test_cell_index_is_a_binary_search_in_linear_time() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        support = np.unique(np.round(rng.uniform(0, 200, rng.integers(2, 400)), trial % 3))
        if len(support) < 2:
            continue
        weights = rng.random(len(support)) ** 3 + 1e-4 if trial % 2 else None
        bounds = cell_boundaries(support, weights)
        values = np.r_[
            rng.uniform(-10, 210, 2000),
            bounds,
            np.nextafter(bounds, -np.inf),
            np.nextafter(bounds, np.inf),
            support,
            np.nan,
            np.inf,
            -np.inf,
        ]
        np.testing.assert_array_equal(cell_index(values, bounds), np.searchsorted(bounds, values))


def test_cell_index_falls_back_when_bounds_are_too_close() -> None:
    bounds = np.array([0.0, 1e-9, 1.0, 1e6])
    values = np.array([-1.0, 5e-10, 0.5, 2.0, 1e7])
    np.testing.assert_array_equal(cell_index(values, bounds), [0, 1, 2, 3, 4])


def test_a_measured_step_becomes_the_fraction_it_stands_for() -> None:
    measured = (47 + 37 / 60) - (47 + 36 / 60)  # a minute, as a difference of times
    assert measured != 1 / 60 and exact_step(measured) == 1 / 60
    assert exact_step(0.25) == 0.25 and exact_step(5.0) == 5.0
    assert exact_step(0.3) == 0.3  # not a whole fraction of the unit: kept


def test_grid_times_are_the_nearest_floats_to_whole_multiples() -> None:
    minutes = np.arange(48 * 60 + 1)
    assert (grid_times(minutes, 1 / 60) == minutes / 60).all()
    assert (minutes * (1 / 60) != minutes / 60).any()  # the product is not always the nearest
    np.testing.assert_array_equal(grid_times([0, 1, 3], 5.0), [0.0, 5.0, 15.0])
    np.testing.assert_array_equal(grid_times([0, 1, 3], 0.5), [0.0, 0.5, 1.5])
    # 1 / (1 / 49) is 49.00000000000001 in floats; the step is still a 49th.
    np.testing.assert_array_equal(grid_times(np.arange(99), 1 / 49), np.arange(99) / 49)
