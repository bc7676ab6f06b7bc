"""Read a cohort from one long table (CSV or Parquet) in which static columns repeat."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from synthmed.cohort import Cohort
from synthmed.errors import DataError
from synthmed.schema import Schema

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")
_TSV_SUFFIXES = (".tsv", ".tsv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_long_table(
    path: str | Path,
    id: str,
    time: str,
    static: Sequence[str] = (),
    outcomes: Sequence[str] = (),
    schema: Schema | str | Path | None = None,
) -> Cohort:
    """Read a long table into a :class:`~synthmed.Cohort` with :meth:`Cohort.from_long`.

    Args:
        path: A ``.csv`` (optionally compressed: ``.csv.gz``, ``.csv.bz2``, ``.csv.zip``,
            ``.csv.xz``), ``.tsv``, ``.parquet``/``.pq`` file, or a folder of Parquet files.
        id: The patient id column.
        time: The time column (rows with a missing time carry only static values).
        static: Columns holding one value per patient, repeated on each of its rows.
        outcomes: Static columns that are outcomes (role ``outcome``).
        schema: A :class:`~synthmed.Schema`, or the path or JSON text of one; inferred from the
            data when omitted. With a schema and no ``static``/``outcomes``, the schema's static
            columns are used.

    Returns:
        The cohort; ``metadata["source"]`` is the file name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: an unsupported file extension or a file that cannot be parsed; see
            :class:`~synthmed.Cohort` for the validation errors of the table itself.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no table at {str(path)!r}")
    frame = _read(path)
    if isinstance(schema, str | Path):
        schema = Schema.from_json(schema)
    if schema is not None and not static and not outcomes:
        static = [c for c in schema.static_columns if c not in schema.outcome_columns]
        outcomes = schema.outcome_columns
    return Cohort.from_long(
        frame,
        id=id,
        time=time,
        static=static,
        outcomes=outcomes,
        schema=schema,
        metadata={"source": path.name},
    )


def _read(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(_PARQUET_SUFFIXES):
            return pd.read_parquet(path)
        if name.endswith(_CSV_SUFFIXES):
            return pd.read_csv(path)
        if name.endswith(_TSV_SUFFIXES):
            return pd.read_csv(path, sep="\t")
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read the table {str(path)!r}: {exc}") from None
    supported = ", ".join((*_CSV_SUFFIXES, *_TSV_SUFFIXES, *_PARQUET_SUFFIXES))
    raise DataError(
        f"cannot read {str(path)!r}: unsupported file extension; use one of {supported} "
        "or a folder of Parquet files"
    )
