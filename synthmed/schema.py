"""The declarative description of a cohort: what each column is and what values it may take."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthmed.errors import MissingDependencyError, SchemaError

KINDS = ("numeric", "categorical", "binary")
ROLES = ("static", "temporal", "outcome")
SCHEMA_FORMAT_VERSION = 1
DEFAULT_ID_COLUMN = "patient_id"
DEFAULT_TIME_COLUMN = "time"
FREE_TEXT_MIN_DISTINCT = 20


@dataclasses.dataclass(frozen=True)
class ColumnSchema:
    """One column of a cohort.

    Attributes:
        name: Column name.
        kind: ``"numeric"``, ``"categorical"`` or ``"binary"``.
        role: ``"static"`` (one value per patient), ``"temporal"`` (measured over time) or
            ``"outcome"`` (a static column that utility metrics predict).
        unit: Optional unit, for reports.
        lower, upper: Optional bounds for numeric columns; generators never emit values outside.
        categories: The allowed values of a categorical or binary column, in code order.
        integer: Numeric values are whole numbers (generators round them).
    """

    name: str
    kind: str
    role: str
    unit: str | None = None
    lower: float | None = None
    upper: float | None = None
    categories: tuple | None = None
    integer: bool = False

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lower, upper)``, infinite where the column declares no bound."""
        return (
            -np.inf if self.lower is None else self.lower,
            np.inf if self.upper is None else self.upper,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"column names must be non-empty strings, got {self.name!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.role not in ROLES:
            raise SchemaError(f"column {self.name!r}: role {self.role!r} is not one of {ROLES}")
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(_plain(c) for c in self.categories))
            if len(set(self.categories)) != len(self.categories):
                raise SchemaError(f"column {self.name!r}: categories repeat: {self.categories}")
        if self.kind == "numeric":
            if self.categories is not None:
                raise SchemaError(f"column {self.name!r}: a numeric column has no categories")
            if self.lower is not None and self.upper is not None and self.lower > self.upper:
                raise SchemaError(
                    f"column {self.name!r}: lower bound {self.lower} exceeds upper bound {self.upper}"
                )
        else:
            if not self.categories:
                raise SchemaError(f"column {self.name!r}: a {self.kind} column needs categories")
            if self.kind == "binary" and len(self.categories) != 2:
                raise SchemaError(
                    f"column {self.name!r}: a binary column has exactly 2 categories, "
                    f"got {list(self.categories)}"
                )

    @property
    def is_static(self) -> bool:
        return self.role in ("static", "outcome")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.categories is not None:
            out["categories"] = list(self.categories)
        return {k: v for k, v in out.items() if v is not None and v is not False}


def _plain(value: Any) -> Any:
    """A JSON-friendly Python scalar for a numpy or pandas scalar."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Schema:
    """The kinds, roles, units and bounds of every column of a cohort, plus its id, time and unit.

    Build one with :meth:`Schema.infer`, edit it with :meth:`with_column`, save it with
    :meth:`to_json` and read it back with :meth:`Schema.from_json`.
    """

    def __init__(
        self,
        columns: Iterable[ColumnSchema],
        id_column: str = DEFAULT_ID_COLUMN,
        time_column: str = DEFAULT_TIME_COLUMN,
        time_unit: str = "hours",
    ) -> None:
        self.columns: dict[str, ColumnSchema] = {}
        for column in columns:
            if column.name in self.columns:
                raise SchemaError(f"column {column.name!r} is declared twice")
            self.columns[column.name] = column
        for reserved in (id_column, time_column):
            if reserved in self.columns:
                raise SchemaError(
                    f"column {reserved!r} is the cohort's id or time column and cannot also be "
                    "declared as a variable"
                )
        if id_column == time_column:
            raise SchemaError(f"the id and time columns are both {id_column!r}")
        self.id_column = id_column
        self.time_column = time_column
        self.time_unit = time_unit

    def __getitem__(self, name: str) -> ColumnSchema:
        try:
            return self.columns[name]
        except KeyError:
            raise SchemaError(
                f"column {name!r} is not in the schema; known columns: {list(self.columns)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"Schema({len(self.static_columns)} static, {len(self.temporal_columns)} temporal, "
            f"id={self.id_column!r}, time={self.time_column!r}, unit={self.time_unit!r})"
        )

    @property
    def static_columns(self) -> list[str]:
        """Static columns, outcomes included, in declaration order."""
        return [c.name for c in self.columns.values() if c.is_static]

    @property
    def temporal_columns(self) -> list[str]:
        return [c.name for c in self.columns.values() if c.role == "temporal"]

    @property
    def outcome_columns(self) -> list[str]:
        return [c.name for c in self.columns.values() if c.role == "outcome"]

    def with_column(self, name: str, **changes: Any) -> Schema:
        """A copy of this schema in which column ``name`` has the given fields changed."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(ColumnSchema)}
        if unknown:
            raise SchemaError(f"ColumnSchema has no field(s) {sorted(unknown)}")
        column = dataclasses.replace(self[name], **changes)
        columns = [column if c.name == name else c for c in self.columns.values()]
        return Schema(columns, self.id_column, self.time_column, self.time_unit)

    # -- inference -----------------------------------------------------------------------------

    @classmethod
    def infer(
        cls,
        static: pd.DataFrame | None,
        events: pd.DataFrame | None,
        id_column: str = DEFAULT_ID_COLUMN,
        time_column: str = DEFAULT_TIME_COLUMN,
        time_unit: str = "hours",
        outcomes: Sequence[str] = (),
        max_categories: int = 10,
    ) -> Schema:
        """Infer a schema from the two tables of a cohort.

        Static columns named in ``outcomes`` get the role ``outcome``. A column of strings,
        booleans or pandas categories is categorical (binary with two values); a numeric static
        column with at most ``max_categories`` whole-number values, each seen four times on
        average, is categorical too (e.g. an ICU type code); 0/1 columns are binary. Bounds of numeric columns are the
        observed minimum and maximum; replace them with declared physiological bounds where the
        data must not reveal its extremes (see the privacy section of the README).
        """
        columns: list[ColumnSchema] = []
        static = static if static is not None else pd.DataFrame()
        events = events if events is not None else pd.DataFrame()
        missing = set(outcomes) - set(static.columns)
        if missing:
            raise SchemaError(f"outcome column(s) {sorted(missing)} are not static columns")
        for name in static.columns:
            role = "outcome" if name in outcomes else "static"
            columns.append(_infer_column(str(name), static[name], role, max_categories))
        for name in events.columns:
            if name in (id_column, time_column):
                continue
            columns.append(_infer_column(str(name), events[name], "temporal", max_categories=2))
        return cls(columns, id_column, time_column, time_unit)

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": SCHEMA_FORMAT_VERSION,
            "id_column": self.id_column,
            "time_column": self.time_column,
            "time_unit": self.time_unit,
            "columns": [c.to_dict() for c in self.columns.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schema:
        if not isinstance(data, dict) or "columns" not in data:
            raise SchemaError("a schema document is a JSON object with a 'columns' list")
        version = data.get("format_version", SCHEMA_FORMAT_VERSION)
        if version > SCHEMA_FORMAT_VERSION:
            raise SchemaError(
                f"schema format version {version} is newer than this synthmed understands "
                f"({SCHEMA_FORMAT_VERSION}); upgrade synthmed"
            )
        field_names = {f.name for f in dataclasses.fields(ColumnSchema)}
        columns = []
        for entry in data["columns"]:
            unknown = set(entry) - field_names
            if unknown:
                raise SchemaError(
                    f"column entry {entry.get('name')!r} has unknown keys {sorted(unknown)}"
                )
            columns.append(ColumnSchema(**entry))
        return cls(
            columns,
            id_column=data.get("id_column", DEFAULT_ID_COLUMN),
            time_column=data.get("time_column", DEFAULT_TIME_COLUMN),
            time_unit=data.get("time_unit", "hours"),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The schema as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> Schema:
        """Read a schema from JSON text or from the path of a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.exists():
                raise SchemaError(f"schema file {str(path)!r} does not exist")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"schema is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_sdv_metadata(self, table_name: str = "cohort"):
        """SDV ``Metadata`` for the long table of :meth:`Cohort.to_sdv` (needs ``synthmed[sdv]``)."""
        try:
            from sdv.metadata import Metadata
        except ImportError:
            raise MissingDependencyError(
                "converting to SDV metadata needs SDV: pip install synthmed[sdv]"
            ) from None
        sdtypes = {"numeric": "numerical", "categorical": "categorical", "binary": "categorical"}
        columns: dict[str, dict[str, Any]] = {
            self.id_column: {"sdtype": "id"},
            self.time_column: {"sdtype": "numerical"},
        }
        # Same order as Cohort.to_long: temporal variables, then static columns.
        for name in [*self.temporal_columns, *self.static_columns]:
            columns[name] = {"sdtype": sdtypes[self[name].kind]}
        return Metadata.load_from_dict(
            {
                "METADATA_SPEC_VERSION": "V1",
                "tables": {
                    table_name: {
                        "columns": columns,
                        "sequence_key": self.id_column,
                        "sequence_index": self.time_column,
                    }
                },
            }
        )


def _infer_column(name: str, values: pd.Series, role: str, max_categories: int) -> ColumnSchema:
    observed = values.dropna()
    textual = (
        isinstance(values.dtype, pd.CategoricalDtype)
        or pd.api.types.is_string_dtype(values)
        or pd.api.types.is_object_dtype(values)
        or pd.api.types.is_bool_dtype(values)
    )
    # A text column whose entries are mostly numbers is numeric with a few typos; validation then
    # names the first entry that is not a number.
    mostly_numbers = (
        textual
        and not pd.api.types.is_bool_dtype(values)
        and len(observed) > 0
        and pd.to_numeric(observed, errors="coerce").notna().mean() >= 0.5
    )
    if textual and not mostly_numbers:
        categories = _sorted_categories(observed.unique())
        if not categories:
            raise SchemaError(f"column {name!r} has no observed value to infer categories from")
        if len(categories) > FREE_TEXT_MIN_DISTINCT and len(categories) > 0.5 * len(observed):
            # A generator would copy such values verbatim from real patients into synthetic ones.
            raise SchemaError(
                f"column {name!r} looks like free text or an identifier ({len(categories)} "
                f"distinct values in {len(observed)} rows); drop it before synthesis, or declare "
                "it categorical in an explicit schema if its values are safe to publish"
            )
        kind = "binary" if len(categories) == 2 else "categorical"
        return ColumnSchema(name, kind, role, categories=tuple(categories))
    numeric = pd.to_numeric(observed, errors="coerce").astype(float)
    finite = numeric[np.isfinite(numeric)]
    integer = bool(len(finite)) and bool(np.all(finite == np.round(finite)))
    unique = np.unique(finite)
    if integer and len(unique) <= 2 and set(unique.tolist()) <= {0.0, 1.0}:
        return ColumnSchema(name, "binary", role, categories=(0, 1))
    few_values = 2 < len(unique) <= max_categories and len(finite) >= 4 * len(unique)
    if integer and role != "temporal" and few_values:
        return ColumnSchema(name, "categorical", role, categories=tuple(int(u) for u in unique))
    lower = float(finite.min()) if len(finite) else None
    upper = float(finite.max()) if len(finite) else None
    return ColumnSchema(name, "numeric", role, lower=lower, upper=upper, integer=integer)


def _sorted_categories(values: Iterable[Any]) -> list[Any]:
    plain = [_plain(v) for v in values]
    try:
        return sorted(plain)
    except TypeError:
        return sorted(plain, key=str)
