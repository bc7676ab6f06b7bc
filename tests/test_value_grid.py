"""Tests for synthmed.models.value_grid's linear-time cell lookup."""

from __future__ import annotations

import numpy as np

from synthmed.models.value_grid import cell_boundaries, cell_index


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
