"""Loader for the raw files of the PhysioNet/CinC Challenge 2012 (ICU mortality prediction).

A stay is a ``<RecordID>.txt`` file of ``Time,Parameter,Value`` rows, ``Time`` being ``HH:MM``
since ICU admission. The rows named RecordID, Age, Gender, Height and ICUType, and the Weight row
at 00:00, are the stay's general descriptors; the other rows are 37 irregular time series. The
challenge writes ``-1`` for a missing value; some timestamps repeat and a few stays have no
time-series row at all. See :func:`load_physionet2012` for how each quirk is handled.

Reading is vectorised: every record is read into one byte buffer, parsed by a single
``pandas.read_csv`` call and pivoted with numpy, so the 4,000 stays of a set load in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import logging
import re
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort
from synthmed.errors import DataError
from synthmed.models.value_grid import grid_times
from synthmed.schema import ColumnSchema, Schema

logger = logging.getLogger(__name__)

ID_COLUMN = "RecordID"
TIME_COLUMN = "time"
#: Name of the static column that holds the Weight descriptor recorded at 00:00 (the name
#: ``Weight`` belongs to the Weight time series).
ADMISSION_WEIGHT = "AdmissionWeight"
SOURCE = "PhysioNet/CinC Challenge 2012"
LICENSE = "ODC-By-1.0"
MISSING_CODE = -1.0
#: Times are ``HH:MM`` with ``0 <= HH < MAX_HOURS`` (a stay of the challenge lasts 48 hours).
MAX_HOURS = 100_000
_HEADER = b"Time,Parameter,Value"
_RECORD_NAME = re.compile(r"^(\d+)\.txt$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclasses.dataclass(frozen=True)
class Variable:
    """What the challenge documents about one parameter, plus plausible physiological bounds.

    Bounds are wide on purpose: they reject values that cannot come from a living patient or
    that are unit errors (a pH of 735, a temperature of -17.8 °C), not merely abnormal ones.
    """

    name: str
    unit: str | None
    lower: float | None = None
    upper: float | None = None
    kind: str = "numeric"
    categories: tuple | None = None
    integer: bool = False

    def column(self, role: str) -> ColumnSchema:
        """This variable as a schema column with the given role."""
        return ColumnSchema(
            self.name,
            self.kind,
            role,
            unit=self.unit,
            lower=self.lower,
            upper=self.upper,
            categories=self.categories,
            integer=self.integer,
        )

    def outside(self, values: np.ndarray) -> np.ndarray:
        """True where a (non-missing) value is outside the bounds or the categories."""
        if self.categories is not None:
            return ~np.isnan(values) & ~np.isin(values, self.categories)
        lower = -np.inf if self.lower is None else self.lower
        upper = np.inf if self.upper is None else self.upper
        return (values < lower) | (values > upper)


def _variables(*specs: Variable) -> dict[str, Variable]:
    return {spec.name: spec for spec in specs}


_BP = dict(unit="mmHg", lower=0.0, upper=300.0)
_DIASTOLIC = dict(unit="mmHg", lower=0.0, upper=250.0)

#: The 37 time series, in the order the challenge documents them, with units and bounds.
TIME_SERIES: dict[str, Variable] = _variables(
    Variable("Albumin", "g/dL", 0.5, 7.0),
    Variable("ALP", "IU/L", 0.0, 5000.0),
    Variable("ALT", "IU/L", 0.0, 20000.0),
    Variable("AST", "IU/L", 0.0, 30000.0),
    Variable("Bilirubin", "mg/dL", 0.0, 80.0),
    Variable("BUN", "mg/dL", 0.0, 300.0),
    Variable("Cholesterol", "mg/dL", 20.0, 1000.0),
    Variable("Creatinine", "mg/dL", 0.0, 40.0),
    Variable("DiasABP", **_DIASTOLIC),
    Variable("FiO2", "fraction", 0.21, 1.0),
    Variable("GCS", "points", 3.0, 15.0, integer=True),
    Variable("Glucose", "mg/dL", 5.0, 2000.0),
    Variable("HCO3", "mmol/L", 0.0, 60.0),
    Variable("HCT", "%", 5.0, 75.0),
    Variable("HR", "bpm", 0.0, 300.0),
    Variable("K", "mEq/L", 1.0, 12.0),
    Variable("Lactate", "mmol/L", 0.0, 40.0),
    Variable("Mg", "mmol/L", 0.2, 10.0),
    Variable("MAP", **_BP),
    Variable("MechVent", None, kind="binary", categories=(0, 1)),
    Variable("Na", "mEq/L", 90.0, 200.0),
    Variable("NIDiasABP", **_DIASTOLIC),
    Variable("NIMAP", **_BP),
    Variable("NISysABP", **_BP),
    Variable("PaCO2", "mmHg", 5.0, 150.0),
    Variable("PaO2", "mmHg", 10.0, 800.0),
    Variable("pH", None, 6.5, 8.0),
    Variable("Platelets", "10^3/uL", 0.0, 2000.0),
    Variable("RespRate", "breaths/min", 0.0, 100.0),
    Variable("SaO2", "%", 0.0, 100.0),
    Variable("SysABP", **_BP),
    Variable("Temp", "°C", 20.0, 45.0),
    Variable("TroponinI", "ug/L", 0.0, 100.0),
    Variable("TroponinT", "ug/L", 0.0, 50.0),
    Variable("Urine", "mL", 0.0, 15000.0),
    Variable("WBC", "10^3/uL", 0.0, 500.0),
    Variable("Weight", "kg", 20.0, 350.0),
)

#: The general descriptors recorded at 00:00 (Weight at 00:00 becomes ``AdmissionWeight``).
DESCRIPTORS: dict[str, Variable] = _variables(
    Variable("Age", "years", 0.0, 120.0, integer=True),
    Variable("Gender", None, kind="binary", categories=(0, 1)),
    Variable("Height", "cm", 50.0, 250.0),
    Variable("ICUType", None, kind="categorical", categories=(1, 2, 3, 4)),
    dataclasses.replace(TIME_SERIES["Weight"], name=ADMISSION_WEIGHT),
)

#: The columns of the Outcomes file (besides RecordID).
OUTCOMES: dict[str, Variable] = _variables(
    Variable("SAPS-I", "points", 0.0, 56.0, integer=True),
    Variable("SOFA", "points", 0.0, 24.0, integer=True),
    Variable("Length_of_stay", "days", 0.0, 365.0, integer=True),
    Variable("Survival", "days", 0.0, 3650.0, integer=True),
    Variable("In-hospital_death", None, kind="binary", categories=(0, 1)),
)


def load_physionet2012(
    path: str | Path,
    outcomes: str | Path | None = None,
    variables: Sequence[str] | None = None,
    resample: str | datetime.timedelta | None = None,
) -> Cohort:
    """Load one set of the PhysioNet/CinC Challenge 2012 as a :class:`~synthmed.Cohort`.

    Args:
        path: The ``set-a`` folder of ``<RecordID>.txt`` files or the ``set-a.tar.gz`` archive
            (any set; ``.tar``, ``.tgz`` and ``.tar.gz`` archives are read without extracting).
        outcomes: The ``Outcomes-a.txt`` file. When None, ``Outcomes-<x>.txt`` beside
            ``set-<x>`` is used if it exists; otherwise the cohort has no outcome columns and
            ``metadata["outcomes"]`` is None.
        variables: Keep only these time series (a panel), in this order. Default: all 37.
        resample: Bin width such as ``"1h"`` or ``"30min"``: each variable's values are averaged
            per bin and the row's time is the start of its bin (bin k covers ``[k*w, (k+1)*w)``).
            Only bins with at least one measurement get a row, and a variable not measured in a
            bin is NaN. Default: the raw irregular times.

    Returns:
        A cohort with ``static`` indexed by ``RecordID``: Age, Gender (0/1), Height, ICUType
        (1-4), AdmissionWeight (the Weight descriptor at 00:00), then the outcomes SAPS-I, SOFA,
        Length_of_stay, Survival and In-hospital_death (role ``outcome``); and ``events`` with
        ``time`` in hours since admission (``HH:MM`` / 60) and one column per time series. The
        Weight time series keeps every Weight row except the 00:00 descriptor. Patients without
        any time-series row keep their static row and have an empty sequence.

    Cleaning rules, each counted in ``metadata["cleaning"]`` and logged on the ``synthmed``
    logger:

    - ``-1`` means missing (descriptors, time series and outcomes; for Survival it means "no
      recorded death"), and so do an empty value, ``nan`` and ``NaN``; rows with an empty
      parameter name are dropped.
    - A value outside the variable's physiological bounds (see ``TIME_SERIES``, ``DESCRIPTORS``
      and ``OUTCOMES`` in this module; they are also the schema's bounds) is set to NaN.
    - Several measurements of one variable at the same timestamp of one stay are replaced by
      their mean (``duplicates_merged`` counts the rows removed by this).
    - Parameters the challenge does not document are dropped.

    ``metadata`` holds ``source``, ``set``, ``license``, ``outcomes`` (the outcome file's name or
    None), ``resample`` and ``cleaning``; per-variable counts are in ``cleaning["by_variable"]``.

    Raises:
        FileNotFoundError: ``path`` or ``outcomes`` does not exist.
        DataError: an unreadable archive or record, an archive member whose name leaves the
            archive (absolute or containing ``..``) or that is a link, a record without the
            ``Time,Parameter,Value`` header (a UTF-8 byte-order mark and CRLF line ends are
            fine), a row whose time is not ``HH:MM`` (``0 <= HH < MAX_HOURS``, ``MM`` 00 to 59)
            or whose value is not a number, a row with more than three fields, an unknown name
            in ``variables``, an invalid ``resample``, or an outcomes file without the
            documented columns. Errors about a record name its file and, for a bad row, the
            line number and text.
    """
    path = Path(path)
    panel = _check_panel(variables)
    width = _bin_width_hours(resample)
    outcomes_path = _find_outcomes(path, outcomes)
    ids, table = _parse(_read_records(path))
    report = _Report()
    static_rows, event_rows = _split_rows(table, report)
    static = _static_table(ids, table, static_rows, report)
    events = _events_table(ids, table, event_rows, panel, width, report)
    if outcomes_path is not None:
        static = static.join(_read_outcomes(outcomes_path, ids, report))
    report.count("patients_without_events", len(ids) - events[ID_COLUMN].nunique())
    metadata = {
        "source": SOURCE,
        "set": _set_name(path),
        "license": LICENSE,
        "outcomes": None if outcomes_path is None else outcomes_path.name,
        "resample": None if resample is None else str(resample),
        "cleaning": report.as_dict(),
    }
    _log_summary(metadata, len(ids))
    schema = _schema(panel, with_outcomes=outcomes_path is not None)
    return Cohort(static, events, schema, metadata)


# -- arguments -------------------------------------------------------------------------------------


def _check_panel(variables: Sequence[str] | None) -> list[str]:
    if variables is None:
        return list(TIME_SERIES)
    if isinstance(variables, str):
        variables = [variables]
    panel = list(dict.fromkeys(variables))
    unknown = [name for name in panel if name not in TIME_SERIES]
    if unknown:
        raise DataError(
            f"unknown PhysioNet 2012 variable {unknown[0]!r}; the time series are "
            f"{', '.join(TIME_SERIES)}"
        )
    if not panel:
        raise DataError("variables must name at least one time series")
    return panel


def _bin_width_hours(resample: str | datetime.timedelta | None) -> float | None:
    if resample is None:
        return None
    if not isinstance(resample, str | pd.Timedelta | datetime.timedelta):
        raise DataError(f"resample={resample!r} must be a duration such as '1h' or '30min'")
    try:
        width = pd.Timedelta(resample)
    except (TypeError, ValueError):
        raise DataError(
            f"resample={resample!r} is not a duration such as '1h' or '30min'"
        ) from None
    if pd.isna(width) or width <= pd.Timedelta(0):
        raise DataError(f"resample={resample!r} must be a positive duration")
    return width / pd.Timedelta(hours=1)


def _find_outcomes(path: Path, outcomes: str | Path | None) -> Path | None:
    if not path.exists():
        raise FileNotFoundError(f"no PhysioNet 2012 set-folder or archive at {str(path)!r}")
    if outcomes is not None:
        outcomes = Path(outcomes)
        if not outcomes.is_file():
            raise FileNotFoundError(f"no PhysioNet 2012 outcomes file at {str(outcomes)!r}")
        return outcomes
    match = re.fullmatch(r"set-(\w+)", _set_name(path))
    candidate = path.parent / f"Outcomes-{match.group(1)}.txt" if match else None
    if candidate is not None and candidate.is_file():
        return candidate
    logger.warning(
        "no outcomes file found beside %s; loading without outcomes (pass outcomes=...)", path
    )
    return None


def _set_name(path: Path) -> str:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- reading ---------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[int, str, bytes]]:
    """``(record id, name, content)`` of every ``<RecordID>.txt`` record, sorted by id."""
    records = _read_folder(path) if path.is_dir() else _read_archive(path)
    if not records:
        raise DataError(f"{str(path)!r} holds no <RecordID>.txt record")
    records.sort(key=lambda record: record[0])
    ids = [record[0] for record in records]
    repeated = pd.Index(ids)[pd.Index(ids).duplicated()]
    if len(repeated):
        raise DataError(f"{str(path)!r} holds record {repeated[0]} more than once")
    return records


def _record_id(name: str) -> int | None:
    match = _RECORD_NAME.match(PurePosixPath(name).name)
    return int(match.group(1)) if match else None


def _read_folder(path: Path) -> list[tuple[int, str, bytes]]:
    return [
        (record_id, str(file), file.read_bytes())
        for file in path.iterdir()
        if file.is_file() and (record_id := _record_id(file.name)) is not None
    ]


def _read_archive(path: Path) -> list[tuple[int, str, bytes]]:
    if not path.name.endswith(_ARCHIVE_SUFFIXES):
        raise DataError(
            f"{str(path)!r} is neither a folder nor a {'/'.join(_ARCHIVE_SUFFIXES)} archive"
        )
    records = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                _check_member(member, path)
                record_id = _record_id(member.name)
                if member.isfile() and record_id is not None:
                    content = archive.extractfile(member).read()
                    records.append((record_id, member.name, content))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read the archive {str(path)!r}: {exc}") from None
    return records


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could point outside the archive; they are never read or written."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts:
        raise DataError(f"archive {str(archive)!r}: member {name!r} points outside the archive")
    if member.issym() or member.islnk():
        raise DataError(f"archive {str(archive)!r}: member {name!r} is a link; links are refused")


# -- parsing ---------------------------------------------------------------------------------------

_EMPTY = -1  # the code of an empty parameter name


@dataclasses.dataclass
class _Table:
    """Every row of every record, as arrays.

    ``code`` indexes ``vocabulary`` (the parameter names met, plus ``AdmissionWeight``);
    ``_EMPTY`` marks an empty parameter name.
    """

    patient: np.ndarray
    minutes: np.ndarray
    code: np.ndarray
    value: np.ndarray
    vocabulary: list[str]


def _parse(records: list[tuple[int, str, bytes]]) -> tuple[pd.Index, _Table]:
    """Parse every record with one ``read_csv`` call over their concatenated rows.

    ``HH:MM`` becomes two columns by turning ``:`` into ``,`` (no parameter name or value holds a
    colon); the record of each row is known from the number of lines each record contributed.
    Quotes are ordinary characters and only ``\\n`` ends a line, so one malformed row can never
    spill into the rows of another record.
    """
    bodies, counts = zip(*(_body(name, content) for _, name, content in records), strict=True)
    buffer = b"".join(bodies).replace(b":", b",")
    try:
        frame = _read_rows(buffer)
    except (ValueError, pd.errors.ParserError) as exc:
        _raise_first_bad_record(records)
        raise DataError(f"cannot parse the records: {exc}") from None
    if len(frame) != sum(counts):  # never expected; a guard against misattributed rows
        _raise_first_bad_record(records)
        raise DataError(f"cannot parse the records: {len(frame)} rows in {sum(counts)} lines")
    patient = np.repeat(np.arange(len(records)), counts)
    line = np.concatenate([np.arange(count) for count in counts]) + 2  # 1-based, after header
    code, names = pd.factorize(frame["parameter"], use_na_sentinel=True)
    hours, minutes, value = (frame[c].to_numpy() for c in ("hours", "minutes", "value"))
    blank = (code == _EMPTY) & np.isnan(hours) & np.isnan(minutes) & np.isnan(value)
    with np.errstate(invalid="ignore"):
        valid = (
            (hours >= 0)
            & (hours < MAX_HOURS)
            & (hours == np.floor(hours))
            & (minutes >= 0)
            & (minutes < 60)
            & (minutes == np.floor(minutes))
            & ~np.signbit(hours)  # "-00:30" parses as hours -0.0
            & ~np.signbit(minutes)
        )
    bad = ~blank & ~valid
    if bad.any():
        first = np.flatnonzero(bad)[0]
        _, name, content = records[patient[first]]
        text = _line(content, int(line[first]))
        raise DataError(
            f"record {name!r}, line {line[first]}: {text!r} has no valid HH:MM time "
            f"(hours 0 to {MAX_HOURS - 1}, minutes 00 to 59)"
        )
    keep = ~blank
    table = _Table(
        patient=patient[keep],
        minutes=(hours[keep] * 60 + minutes[keep]).astype(np.int64),
        code=code[keep],
        value=value[keep],
        vocabulary=[*names, ADMISSION_WEIGHT],
    )
    return pd.Index([record[0] for record in records], name=ID_COLUMN), table


def _normalise(content: bytes) -> bytes:
    """Without a UTF-8 byte-order mark, with ``\\n`` line ends (CRLF files are common)."""
    return content.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")


def _line(content: bytes, number: int) -> str:
    """Line ``number`` (1-based) of a record, as text, for error messages."""
    lines = _normalise(content).split(b"\n")
    text = lines[number - 1] if 0 < number <= len(lines) else b""
    return text[:80].decode("utf-8", errors="replace")


def _body(name: str, content: bytes) -> tuple[bytes, int]:
    header, _, body = _normalise(content).partition(b"\n")
    if header.strip().replace(b" ", b"") != _HEADER:
        raise DataError(
            f"record {name!r} does not start with the header 'Time,Parameter,Value' "
            f"(found {header[:40]!r})"
        )
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body, body.count(b"\n")


_COLUMNS = ["hours", "minutes", "parameter", "value"]
#: Field texts read as "not measured" (besides the challenge's -1 for values).
_NA_VALUES = ["", "nan", "NaN"]


def _read_rows(buffer: bytes) -> pd.DataFrame:
    """Rows as ``hours, minutes, parameter, value``; blank lines stay as all-missing rows."""
    if not buffer:  # only headers: no row at all (and float columns, as below)
        return pd.DataFrame(
            {c: pd.Series(dtype=object if c == "parameter" else np.float64) for c in _COLUMNS}
        )
    return pd.read_csv(
        io.BytesIO(buffer),
        header=None,
        names=_COLUMNS,
        dtype={"hours": np.float64, "minutes": np.float64, "parameter": str, "value": np.float64},
        keep_default_na=False,
        na_values={c: [""] if c == "parameter" else _NA_VALUES for c in _COLUMNS},
        skip_blank_lines=False,
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
        engine="c",
    )


def _raise_first_bad_record(records: list[tuple[int, str, bytes]]) -> None:
    """Re-parse record by record to name the one that broke the combined parse (and, when a
    field is not a number, its line and text)."""
    for _, name, content in records:
        body, count = _body(name, content)
        try:
            rows = _read_rows(body.replace(b":", b","))
        except (ValueError, pd.errors.ParserError) as exc:
            _raise_first_non_number(name, content, body)
            raise DataError(
                f"record {name!r} is not a valid Time,Parameter,Value table: {exc}"
            ) from None
        if len(rows) != count:
            raise DataError(
                f"record {name!r} is not a valid Time,Parameter,Value table: {len(rows)} rows "
                f"were read from {count} lines"
            )


def _raise_first_non_number(name: str, content: bytes, body: bytes) -> None:
    """Name the first line of a record whose time or value is not a number, if there is one."""
    try:
        text = pd.read_csv(
            io.BytesIO(body.replace(b":", b",")),
            header=None,
            names=_COLUMNS,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            quoting=csv.QUOTE_NONE,
            lineterminator="\n",
            engine="c",
        )
    except (ValueError, pd.errors.ParserError):
        return
    for column in ("hours", "minutes", "value"):
        cells = text[column].fillna("")
        numbers = pd.to_numeric(cells.where(~cells.isin(_NA_VALUES)), errors="coerce")
        broken = np.flatnonzero(numbers.isna().to_numpy() & ~cells.isin(_NA_VALUES).to_numpy())
        if len(broken):
            line = int(broken[0]) + 2
            what = "value" if column == "value" else "time"
            raise DataError(
                f"record {name!r}, line {line}: {_line(content, line)!r} has a {what} that is "
                f"not a number ({cells.iloc[broken[0]]!r})"
            )


# -- cleaning --------------------------------------------------------------------------------------


class _Report:
    """Totals and per-variable counts of everything the loader cleaned."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.by_variable: dict[str, dict[str, int]] = {}

    def count(self, what: str, n: int) -> None:
        self.totals[what] = self.totals.get(what, 0) + int(n)

    def count_by(
        self, what: str, code: np.ndarray, vocabulary: Sequence[str], counts: np.ndarray
    ) -> None:
        """Add ``counts`` (one per row, bool or int) to ``what``, per variable ``code``."""
        per_code = np.bincount(code, weights=counts, minlength=len(vocabulary)).astype(np.int64)
        self.count(what, per_code.sum())
        detail = {vocabulary[i]: int(per_code[i]) for i in np.flatnonzero(per_code)}
        if detail:
            self.by_variable[what] = {**self.by_variable.get(what, {}), **detail}

    def as_dict(self) -> dict:
        return {**self.totals, "by_variable": self.by_variable}


def _clean_values(
    value: np.ndarray,
    code: np.ndarray,
    vocabulary: Sequence[str],
    specs: dict[str, Variable],
    report: _Report,
    prefix: str = "",
) -> np.ndarray:
    """``-1`` and values outside their variable's bounds become NaN; both are counted."""
    value = value.astype(np.float64, copy=True)
    missing = value == MISSING_CODE
    report.count_by(f"{prefix}missing_-1", code, vocabulary, missing)
    value[missing] = np.nan
    outside = np.zeros(len(value), dtype=bool)
    for present in np.flatnonzero(np.bincount(code, minlength=len(vocabulary))):
        rows = code == present
        outside[rows] = specs[vocabulary[present]].outside(value[rows])
    report.count_by(f"{prefix}out_of_bounds", code, vocabulary, outside)
    value[outside] = np.nan
    return value


def _lookup(vocabulary: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Position in ``names`` of each vocabulary entry (-1 if absent), plus -1 for ``_EMPTY``."""
    positions = {name: i for i, name in enumerate(names)}
    return np.array([positions.get(name, -1) for name in vocabulary] + [-1])


def _split_rows(table: _Table, report: _Report) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the descriptor rows and of the time-series rows.

    The first Weight row at 00:00 of each record is recoded as ``AdmissionWeight``. Rows with an
    empty parameter name and undocumented parameters are dropped and counted; the RecordID row
    is dropped (the file name gives the id).
    """
    vocabulary = table.vocabulary
    if "Weight" in vocabulary:
        at_zero = np.flatnonzero((table.code == vocabulary.index("Weight")) & (table.minutes == 0))
        _, first = np.unique(table.patient[at_zero], return_index=True)
        table.code[at_zero[first]] = vocabulary.index(ADMISSION_WEIGHT)
    # Indexing with code -1 (_EMPTY) reads the extra last entry of each lookup.
    descriptor = _lookup(vocabulary, list(DESCRIPTORS))[table.code] >= 0
    series = _lookup(vocabulary, list(TIME_SERIES))[table.code] >= 0
    empty = table.code == _EMPTY
    report.count("empty_parameter_rows", empty.sum())
    unknown = ~(descriptor | series | empty) & (_lookup(vocabulary, [ID_COLUMN])[table.code] < 0)
    report.count_by("unknown_parameter_rows", table.code[unknown], vocabulary, unknown[unknown])
    return np.flatnonzero(descriptor), np.flatnonzero(series)


def _static_table(ids: pd.Index, table: _Table, rows: np.ndarray, report: _Report) -> pd.DataFrame:
    """One row per record with its descriptors; the first value wins if one repeats."""
    code = table.code[rows]
    value = _clean_values(table.value[rows], code, table.vocabulary, DESCRIPTORS, report)
    column = _lookup(table.vocabulary, list(DESCRIPTORS))[code]
    patient = table.patient[rows]
    _, first = np.unique(patient * len(DESCRIPTORS) + column, return_index=True)
    data = np.full((len(ids), len(DESCRIPTORS)), np.nan)
    data[patient[first], column[first]] = value[first]
    return pd.DataFrame(data, index=ids, columns=list(DESCRIPTORS))


def _events_table(
    ids: pd.Index,
    table: _Table,
    rows: np.ndarray,
    panel: list[str],
    width: float | None,
    report: _Report,
) -> pd.DataFrame:
    """The time-series rows as one row per (patient, time): cleaned, merged, pivoted."""
    rows = rows[_lookup(table.vocabulary, panel)[table.code[rows]] >= 0]
    code = table.code[rows]
    value = _clean_values(table.value[rows], code, table.vocabulary, TIME_SERIES, report)
    observed = ~np.isnan(value)
    rows, code, value = rows[observed], code[observed], value[observed]
    variable = _lookup(table.vocabulary, panel)[code]
    cells = _Cells(table.patient[rows], table.minutes[rows], variable, value)
    cells, merged = cells.mean_per_cell()
    report.count_by("duplicates_merged", cells.variable, panel, merged)
    if width is None:
        return cells.wide(ids, panel, slot_hours=1 / 60)
    cells.slot = np.floor(cells.slot / (width * 60)).astype(np.int64)
    cells, _ = cells.mean_per_cell()
    return cells.wide(ids, panel, slot_hours=width)


@dataclasses.dataclass
class _Cells:
    """Measurements as (patient, time slot, variable, value); a slot is a minute or a bin."""

    patient: np.ndarray
    slot: np.ndarray
    variable: np.ndarray
    value: np.ndarray

    def mean_per_cell(self) -> tuple[_Cells, np.ndarray]:
        """The mean of the values that share a (patient, slot, variable) cell, and how many
        values beyond the first each cell absorbed."""
        n_slots = int(self.slot.max(initial=0)) + 1
        n_variables = int(self.variable.max(initial=0)) + 1
        key = (self.patient * n_slots + self.slot) * n_variables + self.variable
        keys, inverse = np.unique(key, return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(keys))
        means = np.bincount(inverse, weights=self.value, minlength=len(keys)) / sizes
        row, variable = np.divmod(keys, n_variables)
        patient, slot = np.divmod(row, n_slots)
        return _Cells(patient, slot, variable, means), sizes - 1

    def wide(self, ids: pd.Index, panel: list[str], slot_hours: float) -> pd.DataFrame:
        """One row per (patient, slot), a column per variable, at the slot's time."""
        n_slots = int(self.slot.max(initial=0)) + 1
        keys, row = np.unique(self.patient * n_slots + self.slot, return_inverse=True)
        data = np.full((len(keys), len(panel)), np.nan)
        data[row, self.variable] = self.value
        patient, slot = np.divmod(keys, n_slots)
        events = pd.DataFrame(data, columns=panel)
        events.insert(0, TIME_COLUMN, grid_times(slot, slot_hours))
        events.insert(0, ID_COLUMN, ids.to_numpy()[patient])
        return events


def _read_outcomes(path: Path, ids: pd.Index, report: _Report) -> pd.DataFrame:
    """The outcome columns for ``ids`` (NaN for a record without an outcome row)."""
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read the outcomes file {str(path)!r}: {exc}") from None
    expected = [ID_COLUMN, *OUTCOMES]
    missing = [name for name in expected if name not in frame.columns]
    if missing:
        raise DataError(
            f"outcomes file {str(path)!r} lacks column {missing[0]!r}; expected {expected}"
        )
    repeated = frame[ID_COLUMN][frame[ID_COLUMN].duplicated()]
    if len(repeated):
        raise DataError(f"outcomes file {str(path)!r} lists record {repeated.iloc[0]} twice")
    try:
        frame = frame.set_index(ID_COLUMN)[list(OUTCOMES)].astype(np.float64).reindex(ids)
    except (ValueError, TypeError) as exc:
        raise DataError(f"outcomes file {str(path)!r} has a non-numeric value: {exc}") from None
    report.count("patients_without_outcomes", frame.isna().all(axis=1).sum())
    code = np.repeat(np.arange(len(OUTCOMES)), len(ids))
    value = frame.to_numpy().T.ravel()
    cleaned = _clean_values(value, code, list(OUTCOMES), OUTCOMES, report, prefix="outcomes_")
    return pd.DataFrame(
        cleaned.reshape(len(OUTCOMES), len(ids)).T, index=ids, columns=frame.columns
    )


# -- result ----------------------------------------------------------------------------------------


def _schema(panel: list[str], with_outcomes: bool) -> Schema:
    columns = [spec.column("static") for spec in DESCRIPTORS.values()]
    if with_outcomes:
        columns += [spec.column("outcome") for spec in OUTCOMES.values()]
    columns += [TIME_SERIES[name].column("temporal") for name in panel]
    return Schema(columns, id_column=ID_COLUMN, time_column=TIME_COLUMN, time_unit="hours")


def _log_summary(metadata: dict, n_records: int) -> None:
    totals = {k: v for k, v in metadata["cleaning"].items() if k != "by_variable"}
    logger.info(
        "loaded %d stays of %s %s; cleaning: %s",
        n_records,
        metadata["source"],
        metadata["set"],
        ", ".join(f"{k}={v}" for k, v in totals.items()),
    )
