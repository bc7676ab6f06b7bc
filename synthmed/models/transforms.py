"""Reversible numeric encodings shared by the generators.

``StaticEncoder`` turns static attributes into one float vector per patient (standardised numbers
with a missing indicator, one-hot categories) and back. ``ValueScaler`` standardises temporal
variables, in log space for right-skewed positive ones (glucose, lactate...), and maps generated
values back inside the schema's bounds.

Both are fitted either from the data (``from_bounds=False``) or from the schema's declared bounds
alone (``from_bounds=True``), which reveals nothing about the training patients: that is what
differentially private training uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthmed.encoding import category_codes, decode_codes
from synthmed.errors import SchemaError
from synthmed.schema import ColumnSchema, Schema

SKEW_FOR_LOG = 1.0
#: A static number is generated no further out than the RANGE_RANK-th most extreme training
#: value on each side (as frequent values, value_grid._MIN_COUNT, need that many patients).
RANGE_RANK = 5


@dataclasses.dataclass
class Block:
    """One static column's slice of the encoded vector."""

    name: str
    kind: str
    start: int
    width: int
    has_missing: bool


def _bounds_center_scale(column: ColumnSchema) -> tuple[float, float]:
    if column.lower is None or column.upper is None:
        raise SchemaError(
            f"column {column.name!r} needs declared lower and upper bounds for private training; "
            "set them with schema.with_column(name, lower=..., upper=...)"
        )
    return (column.lower + column.upper) / 2, max((column.upper - column.lower) / 4, 1e-6)


class StaticEncoder:
    """Static table ↔ float matrix ``[n, width]``."""

    def fit(
        self,
        static: pd.DataFrame,
        schema: Schema,
        from_bounds: bool = False,
        log_skewed: bool = False,
    ) -> StaticEncoder:
        """Learn each numeric column's centre and scale (from the data, or from its declared
        bounds with ``from_bounds``). With ``log_skewed`` (and not ``from_bounds``), a
        non-negative column skewed like ValueScaler's log variables (length of stay, survival
        days) is encoded as ``log1p(value)``, which a generator reaches more easily than a long
        tail. Fitted from the data, each numeric column also keeps the range its values span
        (see :meth:`bounds`)."""
        self.columns_: dict[str, dict[str, Any]] = {}
        for name in schema.static_columns:
            column = schema[name]
            values = static[name]
            # Under DP the presence of missing values is not looked up: every column gets a slot.
            has_missing = True if from_bounds else bool(values.isna().any())
            if column.kind == "numeric":
                observed: dict[str, float] = {}
                if from_bounds:
                    center, scale = _bounds_center_scale(column)
                    log = False
                else:
                    numbers = values.to_numpy(dtype=np.float64)
                    numbers = numbers[np.isfinite(numbers)]
                    observed = _observed_range(numbers)
                    log = (
                        log_skewed
                        and len(numbers) > 1
                        and numbers.min() >= 0
                        and _skewness(numbers) > SKEW_FOR_LOG
                    )
                    if log:
                        numbers = np.log1p(numbers)
                    center = float(numbers.mean()) if len(numbers) else 0.0
                    scale = float(numbers.std()) if len(numbers) > 1 else 1.0
                self.columns_[name] = {
                    "center": center,
                    "scale": max(scale, 1e-6),
                    "log": bool(log),
                    "has_missing": has_missing,
                    **observed,
                }
            else:
                self.columns_[name] = {"has_missing": has_missing}
        self.schema_ = schema
        self._build_blocks()
        return self

    def _build_blocks(self) -> None:
        self.blocks_: list[Block] = []
        start = 0
        for name, info in self.columns_.items():
            column = self.schema_[name]
            base = 1 if column.kind == "numeric" else len(column.categories)
            width = base + int(info["has_missing"])
            self.blocks_.append(Block(name, column.kind, start, width, info["has_missing"]))
            start += width
        self.width_ = start

    def encode_number(self, name: str, values: np.ndarray | float) -> np.ndarray:
        """Numbers of the numeric column ``name`` on its encoded scale."""
        info = self.columns_[name]
        values = np.asarray(values, dtype=np.float64)
        if info.get("log", False):
            values = _to_log(values)
        return (values - info["center"]) / info["scale"]

    def decode_number(self, name: str, encoded: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode_number`, without bounds or rounding."""
        info = self.columns_[name]
        values = np.asarray(encoded, dtype=np.float64) * info["scale"] + info["center"]
        return _from_log(values) if info.get("log", False) else values

    def bounds(self, name: str) -> tuple[float, float]:
        """Where generated numbers of the numeric column ``name`` are put: inside its declared
        bounds and, when fitted from the data, inside the range its training values span,
        from the ``RANGE_RANK``-th smallest to the ``RANGE_RANK``-th largest (so no single
        patient's extreme value is reproduced). PhysioNet 2012 records ages above 89 as 90, and
        a generator that reads ages as a smooth density otherwise draws ages of 91 to 95."""
        info = self.columns_[name]
        lower, upper = self.schema_[name].bounds
        return max(lower, info.get("low", -np.inf)), min(upper, info.get("high", np.inf))

    def transform(self, static: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(static), self.width_), dtype=np.float32)
        for block in self.blocks_:
            values = static[block.name]
            missing = values.isna().to_numpy()
            if block.kind == "numeric":
                numbers = self.encode_number(block.name, values.to_numpy(dtype=np.float64))
                out[:, block.start] = np.where(missing, 0.0, numbers)
            else:
                codes = category_codes(values, self.schema_[block.name].categories)
                rows = np.flatnonzero(codes >= 0)
                out[rows, block.start + codes[rows]] = 1.0
            if block.has_missing:
                out[:, block.start + block.width - 1] = missing
        return out

    def inverse(self, encoded: np.ndarray) -> pd.DataFrame:
        """Decode generated vectors: one-hot blocks by argmax, numbers unscaled into bounds."""
        columns = {}
        for block in self.blocks_:
            part = encoded[:, block.start : block.start + block.width]
            column = self.schema_[block.name]
            if block.kind == "numeric":
                numbers = _into_bounds(
                    self.decode_number(block.name, part[:, 0]), column, self.bounds(block.name)
                )
                if block.has_missing:
                    numbers = np.where(part[:, -1] > 0.5, np.nan, numbers)
                columns[block.name] = numbers
            else:
                codes = part.argmax(axis=1)
                if block.has_missing:
                    codes = np.where(codes == len(column.categories), -1, codes)
                columns[block.name] = decode_codes(codes, column.categories)
        return pd.DataFrame(columns)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns_}

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: Schema) -> StaticEncoder:
        encoder = cls()
        # Saved JSON sorts its keys: rebuild the blocks in the schema's column order.
        encoder.columns_ = {name: dict(data["columns"][name]) for name in schema.static_columns}
        encoder.schema_ = schema
        encoder._build_blocks()
        return encoder


class ValueScaler:
    """Per-variable standardisation of temporal values ``[..., V]``; categorical codes pass."""

    def fit(self, values: np.ndarray, schema: Schema, from_bounds: bool = False) -> ValueScaler:
        variables = schema.temporal_columns
        self.schema_ = schema
        self.log_ = np.zeros(len(variables), dtype=bool)
        self.center_ = np.zeros(len(variables))
        self.scale_ = np.ones(len(variables))
        flat = values.reshape(-1, len(variables)) if len(variables) else values
        for j, name in enumerate(variables):
            column = schema[name]
            if column.kind != "numeric":
                continue
            if from_bounds:
                self.center_[j], self.scale_[j] = _bounds_center_scale(column)
                continue
            observed = flat[:, j][np.isfinite(flat[:, j])].astype(np.float64)
            if len(observed) < 2:
                continue
            self.log_[j] = observed.min() >= 0 and _skewness(observed) > SKEW_FOR_LOG
            if self.log_[j]:
                observed = np.log1p(observed)
            self.center_[j] = observed.mean()
            self.scale_[j] = max(observed.std(), 1e-6)
        return self

    def fit_histograms(
        self, histograms: Mapping[str, tuple[np.ndarray, np.ndarray]], schema: Schema
    ) -> ValueScaler:
        """The same statistics as :meth:`fit`, from (bin edges, weights) histograms of the
        numeric variables (e.g. noisy private ones; negative weights count as 0). Each bin counts
        as spread evenly over its width (in the scaled space), so one full bin still has a
        spread. A variable whose histogram holds almost nothing gets the centre and scale of its
        declared bounds.
        """
        variables = schema.temporal_columns
        self.schema_ = schema
        self.log_ = np.zeros(len(variables), dtype=bool)
        self.center_ = np.zeros(len(variables))
        self.scale_ = np.ones(len(variables))
        for j, name in enumerate(variables):
            column = schema[name]
            if column.kind != "numeric":
                continue
            edges, weights = histograms[name]
            weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
            if weights.sum() < 1.0:
                self.center_[j], self.scale_[j] = _bounds_center_scale(column)
                continue
            edges = np.asarray(edges, dtype=np.float64)
            middles = (edges[:-1] + edges[1:]) / 2
            self.log_[j] = edges[0] >= 0 and _skewness(middles, weights) > SKEW_FOR_LOG
            if self.log_[j]:
                edges = np.log1p(edges)
            middles, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
            mean = np.average(middles, weights=weights)
            variance = np.average((middles - mean) ** 2 + widths**2 / 12, weights=weights)
            self.center_[j] = mean
            self.scale_[j] = max(np.sqrt(variance), 1e-6)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        out = np.array(values, dtype=np.float32, copy=True)
        out[..., self.log_] = _to_log(out[..., self.log_])
        numeric = self._numeric_mask()
        out[..., numeric] = (out[..., numeric] - self.center_[numeric]) / self.scale_[numeric]
        return out

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        out = np.array(scaled, dtype=np.float64, copy=True)
        numeric = self._numeric_mask()
        out[..., numeric] = out[..., numeric] * self.scale_[numeric] + self.center_[numeric]
        out[..., self.log_] = _from_log(out[..., self.log_])
        for j, name in enumerate(self.schema_.temporal_columns):
            column = self.schema_[name]
            if column.kind == "numeric":
                out[..., j] = _into_bounds(out[..., j], column)
        return out

    def _numeric_mask(self) -> np.ndarray:
        return np.array(
            [self.schema_[n].kind == "numeric" for n in self.schema_.temporal_columns], dtype=bool
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "log": self.log_.tolist(),
            "center": self.center_.tolist(),
            "scale": self.scale_.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: Schema) -> ValueScaler:
        scaler = cls()
        scaler.schema_ = schema
        scaler.log_ = np.array(data["log"], dtype=bool)
        scaler.center_ = np.array(data["center"], dtype=np.float64)
        scaler.scale_ = np.array(data["scale"], dtype=np.float64)
        return scaler


def _into_bounds(
    values: np.ndarray, column: ColumnSchema, bounds: tuple[float, float] | None = None
) -> np.ndarray:
    """``values`` clipped into ``bounds`` (default: the column's declared ones) and rounded
    for ``integer`` columns."""
    values = np.clip(values, *(bounds or column.bounds))
    return np.round(values) if column.integer else values


def _observed_range(numbers: np.ndarray) -> dict[str, float]:
    """``{"low": ..., "high": ...}``: the ``RANGE_RANK``-th smallest and largest of the finite
    ``numbers`` (empty when there are fewer than ``2 * RANGE_RANK``)."""
    if len(numbers) < 2 * RANGE_RANK:
        return {}
    ordered = np.partition(numbers, (RANGE_RANK - 1, len(numbers) - RANGE_RANK))
    return {"low": float(ordered[RANGE_RANK - 1]), "high": float(ordered[-RANGE_RANK])}


def _to_log(values: np.ndarray) -> np.ndarray:
    """The log scale of skewed non-negative columns: ``log1p``, negatives taken as 0."""
    return np.log1p(np.clip(values, 0.0, None))


def _from_log(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_log`, capped at ``expm1(50)`` so that an extreme generated number
    cannot overflow."""
    return np.expm1(np.clip(values, None, 50.0))


def _skewness(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    centred = values - np.average(values, weights=weights)
    spread = np.sqrt(np.average(centred**2, weights=weights))
    return float(np.average(centred**3, weights=weights) / spread**3) if spread > 0 else 0.0


def histogram_edges(column: ColumnSchema, bins: int) -> np.ndarray:
    """``2 * bins`` edges over a numeric column's declared range: the union of ``bins`` even
    steps and ``bins`` even steps of ``log1p(value - lower)``, so fine both where clinical values
    crowd near the lower bound (lactate, urine output) and across the range (temperature)."""
    _bounds_center_scale(column)  # both bounds declared, or a clear error
    lower, upper = float(column.lower), float(column.upper)
    fractions = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    linear = lower + fractions * (upper - lower)
    logarithmic = lower + np.expm1(fractions * np.log1p(upper - lower))
    return np.concatenate([[lower], np.sort(np.concatenate([linear, logarithmic])), [upper]])


def patient_histograms(
    values: np.ndarray, mask: np.ndarray, edges: Sequence[np.ndarray]
) -> np.ndarray:
    """``[N, V, bins]``: for each patient and variable, the share of its observations in each
    bin (a row of zeros for a variable it never had). Each patient's histogram of one variable
    sums to 1, so one patient moves a sum over patients by at most 1 per variable."""
    n, _, n_vars = values.shape
    bins = len(edges[0]) - 1
    out = np.zeros((n, n_vars, bins))
    for j in range(n_vars):
        seen = mask[:, :, j]
        patients = np.nonzero(seen)[0]
        index = np.clip(
            np.searchsorted(edges[j], values[:, :, j][seen], side="right") - 1, 0, bins - 1
        )
        np.add.at(out[:, j], (patients, index), 1.0)
    totals = out.sum(axis=2, keepdims=True)
    return out / np.maximum(totals, 1.0)
