"""Padded array views of a cohort, built once and shared by every model and metric.

A cohort of N patients whose longest sequence has T steps and V temporal variables becomes
``values[N, T, V]`` (NaN where not observed), ``mask[N, T, V]``, ``times[N, T]``, ``gaps[N, T]`` and
``lengths[N]``. Categorical temporal variables hold their category code (index into the schema's
categories). Static columns become a float matrix for numeric columns and an integer code matrix
(-1 for missing) for categorical and binary ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from synthmed.schema import Schema


@dataclasses.dataclass(frozen=True)
class SequenceArrays:
    """Padded sequences of a cohort (see the module docstring for the layout)."""

    ids: np.ndarray
    lengths: np.ndarray
    times: np.ndarray
    gaps: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    variables: tuple[str, ...]

    @property
    def n_patients(self) -> int:
        return len(self.ids)

    @property
    def max_length(self) -> int:
        return self.values.shape[1]

    @property
    def step_mask(self) -> np.ndarray:
        """``[N, T]`` bool: True where the step exists (inside the patient's sequence)."""
        return np.arange(self.max_length)[None, :] < self.lengths[:, None]


@dataclasses.dataclass(frozen=True)
class StaticArrays:
    """Static attributes of a cohort, split into numeric values and categorical codes."""

    ids: np.ndarray
    numeric: np.ndarray
    codes: np.ndarray
    numeric_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]


def category_codes(values: pd.Series, categories: tuple) -> np.ndarray:
    """Codes of ``values`` in ``categories`` (-1 for missing). Values must already be validated."""
    lookup = {c: i for i, c in enumerate(categories)}
    # Floats that hold whole numbers (0.0/1.0 after a NaN forced a float column) match int categories.
    lookup.update({float(c): i for i, c in enumerate(categories) if isinstance(c, int | float)})
    return values.map(lookup).fillna(-1).to_numpy(dtype=np.int64)


def encode_sequences(events: pd.DataFrame, ids: pd.Index, schema: Schema) -> SequenceArrays:
    """Pad the (sorted, validated) events of the patients ``ids`` into arrays, vectorised."""
    variables = tuple(schema.temporal_columns)
    n = len(ids)
    patient = ids.get_indexer(events[schema.id_column])
    lengths = np.bincount(patient, minlength=n).astype(np.int64)
    max_length = int(lengths.max()) if n and len(events) else 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step = np.arange(len(events)) - starts[patient]

    times = np.zeros((n, max_length), dtype=np.float64)
    times[patient, step] = events[schema.time_column].to_numpy(dtype=np.float64)
    gaps = np.diff(times, axis=1, prepend=0.0)
    gaps[np.arange(max_length)[None, :] >= lengths[:, None]] = 0.0

    values = np.full((n, max_length, len(variables)), np.nan, dtype=np.float32)
    for j, name in enumerate(variables):
        column = schema[name]
        if column.kind == "numeric":
            column_values = events[name].to_numpy(dtype=np.float32)
        else:
            codes = category_codes(events[name], column.categories).astype(np.float32)
            column_values = np.where(codes < 0, np.nan, codes)
        values[patient, step, j] = column_values
    mask = ~np.isnan(values)
    return SequenceArrays(ids.to_numpy(), lengths, times, gaps, values, mask, variables)


def encode_static(static: pd.DataFrame, schema: Schema) -> StaticArrays:
    """Split the static table into a numeric matrix and a categorical code matrix."""
    names = schema.static_columns
    numeric_columns = tuple(c for c in names if schema[c].kind == "numeric")
    categorical_columns = tuple(c for c in names if schema[c].kind != "numeric")
    numeric = static[list(numeric_columns)].to_numpy(dtype=np.float32).reshape(len(static), -1)
    codes = (
        np.stack(
            [category_codes(static[c], schema[c].categories) for c in categorical_columns], axis=1
        )
        if categorical_columns
        else np.zeros((len(static), 0), dtype=np.int64)
    )
    return StaticArrays(
        static.index.to_numpy(), numeric, codes, numeric_columns, categorical_columns
    )


def decode_codes(codes: np.ndarray, categories: tuple) -> np.ndarray:
    """Category values for integer codes (-1 → None), as an object array."""
    lookup = np.array(list(categories) + [None], dtype=object)
    codes = np.asarray(codes, dtype=np.int64)
    return lookup[np.where(codes < 0, len(categories), codes)]
