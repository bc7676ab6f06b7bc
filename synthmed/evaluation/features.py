"""Vectorised per-patient and per-observation views of a cohort, shared by the metrics.

Everything here is computed from the cohort's cached padded arrays (:attr:`Cohort.arrays`,
:attr:`Cohort.static_arrays`) with numpy, never with a Python loop over patients.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort
from synthmed.encoding import SequenceArrays


def numeric_variables(cohort: Cohort) -> list[str]:
    """The cohort's temporal variables of kind ``numeric``."""
    return [v for v in cohort.variables if cohort.schema[v].kind == "numeric"]


def compact_observations(arrays: SequenceArrays, variable: str) -> tuple[np.ndarray, np.ndarray]:
    """The observations of one variable, packed to the left of each row.

    Returns:
        ``(values, times)``, both ``[N, K]`` float64 where K is the largest number of observations
        of ``variable`` in one patient; entries past a patient's own count are NaN.
    """
    j = arrays.variables.index(variable)
    packing = _Packing(arrays.mask[:, :, j])
    return packing.pack(arrays.values[:, :, j]), packing.pack(arrays.times)


class _Packing:
    """Where each observation of one variable goes when packed to the left of its row
    (``observed``, ``[N, T]`` bool): its place is the number of observations before it."""

    def __init__(self, observed: np.ndarray) -> None:
        running = np.cumsum(observed, axis=1)
        self.counts = (
            running[:, -1] if running.shape[1] else np.zeros(len(running), dtype=running.dtype)
        )
        self.width = int(self.counts.max()) if self.counts.size else 0
        self.rows, self.steps = np.nonzero(observed)
        self.slots = running[self.rows, self.steps] - 1

    def pack(self, source: np.ndarray) -> np.ndarray:
        """``[N, K]`` float64 of ``source`` (``[N, T]``) at the observations, NaN after them."""
        packed = np.full((len(self.counts), self.width), np.nan)
        packed[self.rows, self.slots] = source[self.rows, self.steps]
        return packed


def observation_gaps(arrays: SequenceArrays, variable: str | None = None) -> np.ndarray:
    """Time between consecutive steps (``variable=None``) or consecutive observations of one
    variable, pooled over patients, as a flat array (the first step's time since 0 excluded)."""
    if variable is None:
        times = np.where(arrays.step_mask, arrays.times, np.nan)
    else:
        _, times = compact_observations(arrays, variable)
    gaps = np.diff(times, axis=1)
    return gaps[~np.isnan(gaps)]


def previous_observation(arrays: SequenceArrays) -> np.ndarray:
    """``[N, T, V]`` int: the step of each variable's last observation strictly before step t
    (-1 when there is none), a vectorised last-observation-carried-forward index."""
    steps = np.arange(arrays.max_length)[None, :, None]
    latest = np.maximum.accumulate(np.where(arrays.mask, steps, -1), axis=1)
    previous = np.full_like(latest, -1)
    previous[:, 1:] = latest[:, :-1]
    return previous


def _nan_reduce(function, x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``function(x, axis=1)`` for a NaN-ignoring reduction, NaN for rows without a value.

    ``present`` marks the rows of ``x`` holding at least one value; only those are reduced, so
    numpy has no empty slice to warn about and no warning filter is touched
    (``warnings.catch_warnings`` is not thread-safe). Each row's result is the one ``function``
    gives it on the whole array."""
    if present.all():
        return function(x, axis=1)
    reduced = np.full(len(x), np.nan)
    if present.any():
        reduced[present] = function(x[present], axis=1)
    return reduced


def _ends(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(values))
    first = values[:, 0] if values.shape[1] else np.full(len(values), np.nan)
    last = values[rows, np.maximum(counts - 1, 0)] if values.shape[1] else first
    return first, np.where(counts > 0, last, np.nan)


def static_matrix(cohort: Cohort, exclude: Iterable[str] = ()) -> pd.DataFrame:
    """Static columns as floats: numeric values, and category codes for categorical and binary
    columns (NaN where missing), indexed by patient id."""
    exclude = set(exclude)
    arrays = cohort.static_arrays
    columns: dict[str, np.ndarray] = {}
    for k, name in enumerate(arrays.numeric_columns):
        if name not in exclude:
            columns[name] = arrays.numeric[:, k].astype(np.float64)
    for k, name in enumerate(arrays.categorical_columns):
        if name not in exclude:
            codes = arrays.codes[:, k]
            columns[name] = np.where(codes < 0, np.nan, codes).astype(np.float64)
    return pd.DataFrame(columns, index=cohort.ids)


def patient_features(cohort: Cohort, exclude: Iterable[str] = (), threads: int = 1) -> pd.DataFrame:
    """One row of summary features per patient.

    Columns: ``n_steps``, ``duration`` (time of the last step), ``first_time``, ``mean_gap``; for
    each numeric temporal variable ``<var>__<stat>`` for the stats ``n_obs``, ``obs_rate``,
    ``mean``, ``std``, ``min``, ``max``, ``first``, ``last`` and ``step`` (the mean absolute
    change between consecutive observations); for each categorical temporal variable its
    ``n_obs``, ``obs_rate`` and ``last`` code; then the static columns (:func:`static_matrix`)
    not named in ``exclude``. Statistics of a variable a patient never had measured are NaN.
    With ``threads`` above 1 the variables are summarised on that many threads (numpy releases
    the GIL in the reductions); the table is the same.
    """
    arrays = cohort.arrays
    lengths = arrays.lengths
    times = np.where(arrays.step_mask, arrays.times, np.nan)
    first_time, last_time = _ends(times, lengths)
    columns: dict[str, np.ndarray] = {
        "n_steps": lengths.astype(np.float64),
        "duration": last_time,
        "first_time": first_time,
        "mean_gap": _nan_reduce(np.nanmean, np.diff(times, axis=1), lengths > 1),
    }
    numeric = set(numeric_variables(cohort))

    def summarise(variable: str) -> dict[str, np.ndarray]:
        return _variable_features(arrays, variable, variable in numeric)

    if threads > 1 and len(arrays.variables) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(arrays.variables))) as pool:
            per_variable = list(pool.map(summarise, arrays.variables))
    else:
        per_variable = [summarise(variable) for variable in arrays.variables]
    for variable_columns in per_variable:
        columns.update(variable_columns)
    features = pd.DataFrame(columns, index=cohort.ids)
    return features.join(static_matrix(cohort, exclude))


def _variable_features(
    arrays: SequenceArrays, variable: str, numeric: bool
) -> dict[str, np.ndarray]:
    """The columns of one temporal variable in :func:`patient_features`, in their order."""
    j = arrays.variables.index(variable)
    packing = _Packing(arrays.mask[:, :, j])
    values, counts = packing.pack(arrays.values[:, :, j]), packing.counts
    first, last = _ends(values, counts)
    columns = {
        f"{variable}__n_obs": counts.astype(np.float64),
        f"{variable}__obs_rate": counts / np.maximum(arrays.lengths, 1),
    }
    if not numeric:
        columns[f"{variable}__last"] = last
        return columns
    present = counts > 0
    stats = {
        "mean": _nan_reduce(np.nanmean, values, present),
        "std": _nan_reduce(np.nanstd, values, present),
        "min": _nan_reduce(np.nanmin, values, present),
        "max": _nan_reduce(np.nanmax, values, present),
        "first": first,
        "last": last,
        "step": _nan_reduce(np.nanmean, np.abs(np.diff(values, axis=1)), counts > 1),
    }
    columns.update({f"{variable}__{stat}": column for stat, column in stats.items()})
    return columns


def standardise(reference: pd.DataFrame, *others: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """Scale every table by the reference's column means and standard deviations.

    Missing values become 0 (the reference mean) after scaling; columns that are constant in the
    reference are only centred. Returns float64 matrices in the order given.
    """
    mean = reference.mean()
    scale = reference.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
    return tuple(
        ((table[reference.columns] - mean) / scale).fillna(0.0).to_numpy(dtype=np.float64)
        for table in (reference, *others)
    )


def without_empty_columns(x: np.ndarray) -> np.ndarray:
    """``x`` with its all-NaN columns set to 0: scikit-learn's gradient boosting cannot bin a
    feature that has no value (e.g. a variable the synthetic cohort never measures)."""
    empty = np.isnan(x).all(axis=0)
    if not empty.any():
        return x
    x = x.copy()
    x[:, empty] = 0.0
    return x
