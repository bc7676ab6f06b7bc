"""Negative controls: damaged copies of a real cohort that a sound metric must score worse.

Each function returns a new cohort with the schema of its input; none touches the input. They
back the table in :mod:`synthmed.evaluation` of which metric catches which damage, and let users
check that the evaluation can fail on their own data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort


def _with_events(cohort: Cohort, events: pd.DataFrame) -> Cohort:
    return Cohort(cohort.static, events, cohort.schema, cohort.metadata)


def shuffle_values(cohort: Cohort, seed: int = 0) -> Cohort:
    """Permute each temporal variable's observed values across all patients and times.

    Marginals and missingness are unchanged; within-patient dynamics and cross-variable
    relations are destroyed.
    """
    rng = np.random.default_rng(seed)
    events = cohort.events.copy()
    for variable in cohort.variables:
        rows = events[variable].notna().to_numpy()
        events.loc[rows, variable] = rng.permutation(events.loc[rows, variable].to_numpy())
    return _with_events(cohort, events)


def add_noise(cohort: Cohort, scale: float = 1.0, seed: int = 0) -> Cohort:
    """Add Gaussian noise of ``scale`` standard deviations to every observed numeric temporal
    value (clipped to the schema's bounds)."""
    rng = np.random.default_rng(seed)
    events = cohort.events.copy()
    for variable in cohort.variables:
        column = cohort.schema[variable]
        if column.kind != "numeric":
            continue
        values = events[variable].to_numpy(dtype=np.float64)
        noisy = values + rng.normal(0.0, scale * np.nanstd(values), len(values))
        events[variable] = np.clip(noisy, *column.bounds)
    return _with_events(cohort, events)


def thin_observations(cohort: Cohort, fraction: float = 0.5, seed: int = 0) -> Cohort:
    """Drop each observed value with probability ``fraction`` (rows left empty disappear).

    Values are unchanged; observation rates, sequence lengths and time gaps are not.
    """
    rng = np.random.default_rng(seed)
    events = cohort.events.copy()
    for variable in cohort.variables:
        events.loc[rng.random(len(events)) < fraction, variable] = np.nan
    return _with_events(cohort, events)


def redraw_static(cohort: Cohort, seed: int = 0) -> Cohort:
    """Replace every categorical or binary static column (outcomes included) by categories
    drawn uniformly at random."""
    rng = np.random.default_rng(seed)
    static = cohort.static.copy()
    for name in cohort.static_columns:
        column = cohort.schema[name]
        if column.kind != "numeric":
            codes = rng.integers(len(column.categories), size=len(static))
            static[name] = np.asarray(column.categories, dtype=object)[codes]
    return Cohort(static, cohort.events, cohort.schema, cohort.metadata)


def shuffle_outcome(cohort: Cohort, column: str, seed: int = 0) -> Cohort:
    """Permute one static column (an outcome) across patients, cutting it from the rest."""
    static = cohort.static.copy()
    static[column] = np.random.default_rng(seed).permutation(static[column].to_numpy())
    return Cohort(static, cohort.events, cohort.schema, cohort.metadata)
