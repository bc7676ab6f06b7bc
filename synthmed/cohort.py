"""The cohort: static attributes, long-format events and a schema, validated once."""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthmed.encoding import (
    SequenceArrays,
    StaticArrays,
    decode_codes,
    encode_sequences,
    encode_static,
)
from synthmed.errors import DataError, SchemaError
from synthmed.schema import DEFAULT_ID_COLUMN, DEFAULT_TIME_COLUMN, ColumnSchema, Schema

logger = logging.getLogger("synthmed")

PARQUET_METADATA_KEY = b"synthmed"


class Cohort:
    """Patients with static attributes and irregular time series.

    Args:
        static: One row per patient, indexed by patient id (the index name is the id column).
        events: Long table, one row per (patient, time): the id column, a float time column and
            one column per temporal variable; NaN means "not measured at that time".
        schema: The columns' kinds, roles and bounds; inferred from the data when omitted.
        metadata: Provenance that travels with the cohort (source, generator, seed, epsilon...).

    Events are sorted by patient (in the order of ``static``) and time. Rows of ``events`` in which
    no variable was observed carry no information; they are dropped and counted in
    ``metadata["cleaning"]["empty_event_rows"]``. Several rows may share a (patient, time).

    Raises:
        SchemaError: a missing id or time column, a column declared twice, data columns that do
            not match the schema.
        DataError: an empty cohort, non-numeric or infinite values in numeric columns, values
            outside the schema's bounds, unknown categories, negative or non-finite times,
            duplicate patient ids, or a patient in ``events`` that is not in ``static``.
    """

    def __init__(
        self,
        static: pd.DataFrame,
        events: pd.DataFrame,
        schema: Schema | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(static, pd.DataFrame) or not isinstance(events, pd.DataFrame):
            raise DataError("static and events must be pandas DataFrames")
        id_column = schema.id_column if schema else (static.index.name or DEFAULT_ID_COLUMN)
        time_column = schema.time_column if schema else DEFAULT_TIME_COLUMN
        _check_unique_columns(static, "static")
        _check_unique_columns(events, "events")
        for name, label in ((id_column, "patient id"), (time_column, "time")):
            if name not in events.columns:
                raise SchemaError(
                    f"events has no {label} column {_show(name)}; its columns are {list(events.columns)}"
                )
        static = static.rename_axis(id_column)
        if schema is None:
            schema = Schema.infer(static, events, id_column=id_column, time_column=time_column)
        _check_columns_match(static, events, schema)
        metadata = copy.deepcopy(dict(metadata or {}))
        static = _validate_static(static, schema)
        events, n_empty = _validate_events(events, static.index, schema)
        if n_empty:
            _count_empty_rows(metadata, n_empty)
            logger.info("dropped %d event rows in which no variable was observed", n_empty)
        self._init_validated(static, events, schema, metadata)

    def _init_validated(
        self, static: pd.DataFrame, events: pd.DataFrame, schema: Schema, metadata: dict
    ) -> None:
        self.static = static
        self.events = events
        self.schema = schema
        self.metadata = metadata

    @classmethod
    def _trusted(
        cls, static: pd.DataFrame, events: pd.DataFrame, schema: Schema, metadata: dict
    ) -> Cohort:
        """A cohort from tables already known to be valid and sorted (subsets of a cohort)."""
        cohort = cls.__new__(cls)
        cohort._init_validated(static, events, schema, metadata)
        return cohort

    # -- basic facts ---------------------------------------------------------------------------

    @property
    def id_column(self) -> str:
        return self.schema.id_column

    @property
    def time_column(self) -> str:
        return self.schema.time_column

    @property
    def ids(self) -> pd.Index:
        return self.static.index

    @property
    def n_patients(self) -> int:
        return len(self.static)

    def __len__(self) -> int:
        return self.n_patients

    @property
    def variables(self) -> list[str]:
        """Names of the temporal variables."""
        return self.schema.temporal_columns

    @property
    def static_columns(self) -> list[str]:
        return self.schema.static_columns

    @property
    def outcome_columns(self) -> list[str]:
        return self.schema.outcome_columns

    @property
    def cleaning(self) -> dict[str, int]:
        """Counts of what loading and validation cleaned (empty rows, -1 codes, ...)."""
        return dict(self.metadata.get("cleaning", {}))

    def __repr__(self) -> str:
        return (
            f"Cohort({self.n_patients} patients, {len(self.events)} event rows, "
            f"{len(self.variables)} temporal variables, {len(self.static_columns)} static columns)"
        )

    # -- array views -----------------------------------------------------------------------------

    @functools.cached_property
    def arrays(self) -> SequenceArrays:
        """Padded sequence arrays (built on first use, then cached)."""
        return encode_sequences(self.events, self.ids, self.schema)

    @functools.cached_property
    def static_arrays(self) -> StaticArrays:
        """Static attributes as a numeric matrix and categorical codes (cached)."""
        return encode_static(self.static, self.schema)

    @classmethod
    def from_arrays(
        cls,
        static: pd.DataFrame,
        times: np.ndarray,
        values: np.ndarray,
        lengths: np.ndarray,
        schema: Schema,
        metadata: dict[str, Any] | None = None,
        mask: np.ndarray | None = None,
    ) -> Cohort:
        """Build a cohort from padded arrays laid out as :class:`SequenceArrays`.

        ``values`` holds category codes for categorical temporal variables; entries where
        ``mask`` is False (or, without a mask, NaN entries) are unobserved. The arrays are
        validated as arrays, vectorised, against the same rules as any cohort (a generator that
        breaks the schema is caught here), and, as everywhere, steps with no observed variable
        are dropped and counted in ``metadata["cleaning"]["empty_event_rows"]``. Times must not
        decrease within a patient.
        """
        times = np.asarray(times, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        lengths = np.asarray(lengths, dtype=np.int64)
        n, max_length = times.shape[:2]
        variables = schema.temporal_columns
        if (
            len(static) != n
            or len(lengths) != n
            or values.shape != (n, max_length, len(variables))
            or (mask is not None and np.shape(mask) != values.shape)
        ):
            raise DataError(
                f"array shapes disagree: static {len(static)}, times {times.shape}, "
                f"values {values.shape} for {len(variables)} temporal variables, "
                f"lengths {lengths.shape}, mask {None if mask is None else np.shape(mask)}"
            )
        outside = (lengths < 0) | (lengths > max_length)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DataError(
                f"patient {_show(static.index[i])} has length {lengths[i]} "
                f"outside [0, {max_length}]"
            )
        _check_unique_columns(static, "static")
        event_columns = pd.DataFrame(columns=[schema.id_column, schema.time_column, *variables])
        _check_columns_match(static, event_columns, schema)
        static = _validate_static(static.rename_axis(schema.id_column), schema)
        ids = static.index.to_numpy()
        if mask is not None:
            values = np.where(mask, values, np.nan)
        inside = np.arange(max_length)[None, :] < lengths[:, None]
        _check_array_times(times, inside, ids, schema.time_column)
        observed = inside & ~np.isnan(values).all(axis=2) if variables else inside
        n_empty = int(inside.sum() - observed.sum())
        patient, step = np.nonzero(observed)
        rows = values[patient, step]
        columns = [
            _array_column(rows[:, j], schema[name], ids, patient)
            for j, name in enumerate(variables)
        ]
        if all(schema[name].kind == "numeric" for name in variables):
            # One float block, no per-column copies: the common case of a generator's output.
            # (the numeric columns are views of ``rows``, clipped in place).
            events = pd.DataFrame(rows, columns=variables)
        else:
            events = pd.DataFrame(dict(zip(variables, columns, strict=True)))
        events.insert(0, schema.time_column, times[patient, step])
        events.insert(0, schema.id_column, ids[patient])
        metadata = copy.deepcopy(dict(metadata or {}))
        if n_empty:
            _count_empty_rows(metadata, n_empty)
        return cls._trusted(static, events, schema, metadata)

    # -- conversions -----------------------------------------------------------------------------

    @classmethod
    def from_long(
        cls,
        df: pd.DataFrame,
        id: str,
        time: str,
        static: Sequence[str] = (),
        outcomes: Sequence[str] = (),
        schema: Schema | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Cohort:
        """Build a cohort from one long table in which static columns repeat on every row.

        Columns in ``static`` (and ``outcomes``, which are static too) must hold one value per
        patient (missing entries are ignored); every other column is temporal. Rows whose time is
        missing carry only static values (a patient without events).
        """
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"from_long expects a pandas DataFrame, got {type(df).__name__}")
        _check_unique_columns(df, "the long table")
        static_names = list(dict.fromkeys([*static, *outcomes]))
        for name in (id, time, *static_names):
            if name not in df.columns:
                raise SchemaError(
                    f"column {_show(name)} is not in the table; its columns are {list(df.columns)}"
                )
        if id in static_names or time in static_names:
            raise SchemaError("the id and time columns cannot also be static columns")
        if df[id].isna().any():
            row = int(np.flatnonzero(df[id].isna().to_numpy())[0])
            raise DataError(f"column {_show(id)} has a missing patient id at row {row}")
        temporal = [c for c in df.columns if c not in (id, time, *static_names)]
        ids = pd.Index(pd.unique(df[id]), name=id)
        static_table = _collapse_static(df, id, static_names).reindex(ids)
        has_time = df[time].notna().to_numpy()
        timeless = df.loc[~has_time, temporal]
        if temporal and timeless.notna().any(axis=None):
            row = timeless.index[timeless.notna().any(axis=1).to_numpy()][0]
            raise DataError(
                f"column {_show(time)}: row {row} (patient {_show(df.at[row, id])}) has measurements "
                "but no time"
            )
        events = df.loc[has_time, [id, time, *temporal]].reset_index(drop=True)
        if schema is None:
            schema = Schema.infer(
                static_table, events, id_column=id, time_column=time, outcomes=outcomes
            )
        elif (schema.id_column, schema.time_column) != (id, time):
            raise SchemaError(
                f"the schema's id/time columns are {_show(schema.id_column)}/{_show(schema.time_column)}, "
                f"not {_show(id)}/{_show(time)}"
            )
        return cls(static_table, events, schema, metadata)

    def to_long(self) -> pd.DataFrame:
        """One long table: events with the static columns repeated; patients without events get
        one row with a missing time. ``Cohort.from_long`` reverses it without loss."""
        long = self.events.join(self.static, on=self.id_column)
        without = self.ids.difference(pd.Index(self.events[self.id_column].unique()), sort=False)
        if len(without):
            empty = self.static.loc[without].rename_axis(self.id_column).reset_index()
            empty[self.time_column] = np.nan
            long = pd.concat([long, empty], ignore_index=True)
            order = self.ids.get_indexer(long[self.id_column])
            long = long.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)
        return long[[self.id_column, self.time_column, *self.variables, *self.static_columns]]

    def to_sdv(self, table_name: str = "cohort"):
        """``(DataFrame, sdv Metadata)`` for SDV's sequential synthesizers (needs ``synthmed[sdv]``).

        The table is :meth:`to_long` without the time-less rows of patients who have no events
        (SDV sequences need a sequence index); the static columns are PAR's context columns.
        """
        metadata = self.schema.to_sdv_metadata(table_name)
        long = self.to_long()
        return long[long[self.time_column].notna()].reset_index(drop=True), metadata

    def subset(self, ids: Iterable[Any]) -> Cohort:
        """The cohort restricted to ``ids``, in that order."""
        index = pd.Index(list(ids), name=self.id_column)
        unknown = index.difference(self.ids)
        if len(unknown):
            raise DataError(f"patient {_show(unknown[0])} is not in the cohort")
        static = self.static.loc[index]
        positions = index.get_indexer(self.events[self.id_column])
        keep = positions >= 0
        order = np.argsort(positions[keep], kind="stable")
        events = self.events.loc[keep].iloc[order].reset_index(drop=True)
        return Cohort._trusted(static, events, self.schema, copy.deepcopy(self.metadata))

    def split(
        self, test_size: float = 0.3, seed: int = 0, stratify: str | None = "auto"
    ) -> tuple[Cohort, Cohort]:
        """Split by patient into ``(train, holdout)``; no patient is in both.

        ``stratify="auto"`` keeps the rate of the first binary outcome alike in both parts; pass a
        static column name to stratify on it, or None for a plain random split.
        """
        if not 0 < test_size < 1:
            raise DataError(f"test_size must be in (0, 1), got {_show(test_size)}")
        if self.n_patients < 2:
            raise DataError("a cohort of fewer than 2 patients cannot be split")
        rng = np.random.default_rng(seed)
        strata = self._strata(stratify)
        holdout_positions = []
        for stratum in pd.unique(strata):
            members = np.flatnonzero(strata == stratum)
            rng.shuffle(members)
            holdout_positions.append(members[: int(round(len(members) * test_size))])
        holdout = np.zeros(self.n_patients, dtype=bool)
        holdout[np.concatenate(holdout_positions)] = True
        if holdout.all() or not holdout.any():
            raise DataError(f"test_size={test_size} leaves one part of the split empty")
        return self.subset(self.ids[~holdout]), self.subset(self.ids[holdout])

    def _strata(self, stratify: str | None) -> np.ndarray:
        if stratify == "auto":
            binary = [c for c in self.outcome_columns if self.schema[c].kind == "binary"]
            stratify = binary[0] if binary else None
        if stratify is None:
            return np.zeros(self.n_patients, dtype=np.int64)
        if stratify not in self.static_columns:
            raise SchemaError(f"cannot stratify on {_show(stratify)}: not a static column")
        return self.static[stratify].astype(str).to_numpy()

    # -- files -----------------------------------------------------------------------------------

    def to_parquet(self, path: str | Path) -> Path:
        """Write the long table to one Parquet file with the schema and metadata inside it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.to_long(), preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), PARQUET_METADATA_KEY: self._file_metadata()}
        )
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, temporary)
        temporary.replace(path)
        return path

    def _file_metadata(self) -> bytes:
        return json.dumps(
            {"schema": self.schema.to_dict(), "metadata": self.metadata}, default=_json_default
        ).encode()

    @classmethod
    def read_parquet(cls, path: str | Path) -> Cohort:
        """Read a cohort written by :meth:`to_parquet` or a Parquet dataset folder of such files."""
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise DataError(f"no Parquet file or folder at {str(path)!r}")
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"the folder {str(path)!r} holds no .parquet file")
        raw = pq.read_schema(files[0]).metadata or {}
        if PARQUET_METADATA_KEY not in raw:
            raise DataError(
                f"{str(files[0])!r} was not written by synthmed (no schema inside); read it with "
                "pandas and use Cohort.from_long"
            )
        stored = json.loads(raw[PARQUET_METADATA_KEY])
        schema = Schema.from_dict(stored["schema"])
        long = ds.dataset([str(f) for f in files], format="parquet").to_table().to_pandas()
        return cls.from_long(
            long,
            id=schema.id_column,
            time=schema.time_column,
            static=schema.static_columns,
            schema=schema,
            metadata=stored.get("metadata", {}),
        )


# -- validation helpers ----------------------------------------------------------------------------


def _show(value: Any) -> str:
    """repr of a value as a user wrote it (numpy scalars shown as plain Python numbers)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in cohort metadata")


def _check_unique_columns(frame: pd.DataFrame, label: str) -> None:
    duplicated = frame.columns[frame.columns.duplicated()]
    if len(duplicated):
        raise SchemaError(f"column {_show(duplicated[0])} is declared twice in {label}")


def _check_columns_match(static: pd.DataFrame, events: pd.DataFrame, schema: Schema) -> None:
    both = set(static.columns) & set(events.columns)
    if both:
        raise SchemaError(f"column {sorted(both)[0]!r} is declared twice: in static and in events")
    event_variables = [c for c in events.columns if c not in (schema.id_column, schema.time_column)]
    for label, present, expected in (
        ("static", list(static.columns), schema.static_columns),
        ("events", event_variables, schema.temporal_columns),
    ):
        missing = [c for c in expected if c not in present]
        if missing:
            raise SchemaError(f"column {_show(missing[0])} of the schema is missing from {label}")
        extra = [c for c in present if c not in expected]
        if extra:
            role = schema.columns[extra[0]].role if extra[0] in schema else None
            where = f" (the schema says its role is {_show(role)})" if role else ""
            raise SchemaError(
                f"column {_show(extra[0])} in {label} is not a {label} column of the schema{where}"
            )


def _validate_static(static: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    if len(static) == 0:
        raise DataError("the cohort is empty: static has no patient")
    ids = static.index
    if ids.hasnans:
        raise DataError(f"column {_show(schema.id_column)}: a patient id is missing in static")
    if ids.has_duplicates:
        raise DataError(
            f"column {_show(schema.id_column)}: patient {_show(ids[ids.duplicated()][0])} appears twice in static"
        )
    static = static[schema.static_columns].copy()
    for name in schema.static_columns:
        static[name] = _validate_column(static[name], schema, name, ids.to_numpy())
    return static


def _validate_events(
    events: pd.DataFrame, ids: pd.Index, schema: Schema
) -> tuple[pd.DataFrame, int]:
    id_column, time_column = schema.id_column, schema.time_column
    patients = events[id_column].to_numpy()
    positions = ids.get_indexer(events[id_column])
    if (positions < 0).any():
        first = patients[np.flatnonzero(positions < 0)[0]]
        raise DataError(
            f"column {_show(id_column)}: patient {_show(first)} is in events but not in static"
        )
    times = _coerce_numeric(events[time_column], time_column, patients)
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise _bad_time(time_column, patients[i], times[i])
    columns = {id_column: events[id_column].to_numpy(), time_column: times}
    for name in schema.temporal_columns:
        columns[name] = _validate_column(events[name], schema, name, patients)
    validated = pd.DataFrame(columns)
    variables = schema.temporal_columns
    observed = (
        validated[variables].notna().any(axis=1).to_numpy()
        if variables
        else np.ones(len(validated), bool)
    )
    order = np.lexsort((times[observed], positions[observed]))
    validated = validated.loc[observed].iloc[order].reset_index(drop=True)
    return validated, int((~observed).sum())


def _validate_column(
    values: pd.Series, schema: Schema, name: str, patients: np.ndarray
) -> pd.Series | np.ndarray:
    column = schema[name]
    if column.kind == "numeric":
        numbers = _coerce_numeric(values, name, patients)
        infinite = np.isinf(numbers)
        if infinite.any():
            i = np.flatnonzero(infinite)[0]
            raise _infinite_value(name, patients[i], numbers[i])
        for bound, outside in (
            (column.lower, numbers < (column.lower if column.lower is not None else -np.inf)),
            (column.upper, numbers > (column.upper if column.upper is not None else np.inf)),
        ):
            if outside.any():
                i = np.flatnonzero(outside)[0]
                raise DataError(
                    f"column {_show(name)}: patient {_show(patients[i])} has value {_show(numbers[i])} outside "
                    f"the schema's bounds [{column.lower}, {column.upper}] (bound {bound} crossed)"
                )
        return numbers
    allowed = set(column.categories) | {
        float(c) for c in column.categories if isinstance(c, int | float)
    }
    present = values.notna().to_numpy()
    try:
        known = values.isin(allowed).to_numpy()
    except TypeError:
        known = np.array([v in allowed for v in values], dtype=bool)
    unknown = present & ~known
    if unknown.any():
        i = np.flatnonzero(unknown)[0]
        raise DataError(
            f"column {_show(name)}: patient {_show(patients[i])} has unknown category {_show(values.iloc[i])}; "
            f"the schema allows {list(column.categories)}"
        )
    return values.to_numpy(dtype=object) if values.dtype == object else values.to_numpy()


def _count_empty_rows(metadata: dict[str, Any], n_empty: int) -> None:
    """Count dropped event rows without any observed variable in ``metadata["cleaning"]``."""
    cleaning = metadata.setdefault("cleaning", {})
    cleaning["empty_event_rows"] = cleaning.get("empty_event_rows", 0) + n_empty


def _bad_time(time_column: str, patient: Any, time: float) -> DataError:
    return DataError(
        f"column {_show(time_column)}: patient {_show(patient)} has time {_show(time)}; times must "
        "be finite and non-negative"
    )


def _infinite_value(name: str, patient: Any, value: float) -> DataError:
    return DataError(
        f"column {_show(name)}: patient {_show(patient)} has infinite value {_show(value)}"
    )


def _check_array_times(
    times: np.ndarray, inside: np.ndarray, ids: np.ndarray, time_column: str
) -> None:
    """Padded times must be finite, non-negative and non-decreasing inside each sequence."""
    bad = inside & (~np.isfinite(times) | (times < 0))
    if bad.any():
        i, t = np.argwhere(bad)[0]
        raise _bad_time(time_column, ids[i], times[i, t])
    decreasing = inside[:, 1:] & (np.diff(times, axis=1) < 0)
    if decreasing.any():
        i, t = np.argwhere(decreasing)[0]
        raise DataError(
            f"column {_show(time_column)}: patient {_show(ids[i])} has time {_show(times[i, t + 1])} "
            f"after {_show(times[i, t])}; times must not decrease within a patient"
        )


def _array_column(
    values: np.ndarray, column: ColumnSchema, ids: np.ndarray, patient: np.ndarray
) -> np.ndarray:
    """One temporal column from float array values (category codes for categorical columns)."""
    if column.kind == "numeric":
        infinite = np.isinf(values)
        if infinite.any():
            i = np.flatnonzero(infinite)[0]
            raise _infinite_value(column.name, ids[patient[i]], values[i])
        # float32 model outputs can land a rounding error past a float64 bound.
        return np.clip(values, *column.bounds, out=values)
    present = ~np.isnan(values)
    invalid = present & (
        (values < 0) | (values >= len(column.categories)) | (values != np.round(values))
    )
    if invalid.any():
        i = np.flatnonzero(invalid)[0]
        raise DataError(
            f"column {_show(column.name)}: patient {_show(ids[patient[i]])} has category code "
            f"{_show(values[i])}; the schema has {len(column.categories)} categories"
        )
    return decode_codes(np.where(present, values, -1), column.categories)


def _coerce_numeric(values: pd.Series, name: str, patients: np.ndarray) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise DataError(
            f"column {_show(name)}: patient {_show(patients[i])} has non-numeric value {_show(values.iloc[i])}"
        )
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


def _collapse_static(df: pd.DataFrame, id: str, names: list[str]) -> pd.DataFrame:
    """One row per patient: the first non-missing value of each static column, checked constant."""
    if not names:
        return pd.DataFrame(index=pd.Index(pd.unique(df[id]), name=id))
    grouped = df.groupby(id, sort=False)[names]
    counts = grouped.nunique(dropna=True)
    varying = counts > 1
    if varying.any(axis=None):
        name = varying.any()[lambda s: s].index[0]
        patient = counts.index[varying[name].to_numpy()][0]
        seen = pd.unique(df.loc[df[id] == patient, name].dropna())[:2]
        raise DataError(
            f"static column {_show(name)}: patient {_show(patient)} has more than one value "
            f"({_show(seen[0])}, {_show(seen[1])})"
        )
    return grouped.first()
