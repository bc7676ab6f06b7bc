"""Property-based tests: hostile files given to the loaders give a valid cohort or our errors.

``load_physionet2012`` gets folders (and the same records as a ``.tar.gz``) of random
``<RecordID>.txt`` records: garbled, negative and duplicated times, missing and extra fields,
unicode and empty parameter names, NaN/inf/huge/negative values, empty files, records without a
RecordID row, non-UTF-8 bytes, byte-order marks, CR/CRLF line ends, quotes; and random outcomes
files. ``read_long_table`` gets random CSV files. Each outcome must be a cohort that keeps the
loader's promises, or one of the errors the loader documents, never another exception.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from synthmed import Cohort
from synthmed.datasets import load_physionet2012, read_long_table
from synthmed.datasets.physionet2012 import DESCRIPTORS, ID_COLUMN, OUTCOMES, TIME_SERIES
from synthmed.errors import DataError, SynthmedError

#: Modest by default (the file runs in seconds); raise it to hunt: SYNTHMED_FUZZ_EXAMPLES=5000.
SETTINGS = settings(
    max_examples=int(os.environ.get("SYNTHMED_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEADER = "Time,Parameter,Value"
OUTCOMES_HEADER = ",".join([ID_COLUMN, *OUTCOMES])

# -- records -----------------------------------------------------------------------------------

GOOD_TIMES = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 48), st.integers(0, 59))
BAD_TIMES = st.sampled_from(
    [
        "25:99", "-01:00", "-00:30", "00:-5", "1.5:00", "00:30.5", "99999999999999999999:00",
        "1e3:00", "", "ab:cd", "12", "00:00:00", ":", "00:", ":30", " 00:10", "inf:00",
        "nan:00", "０１:００", "00:60",
    ]
)  # fmt: skip
TIMES = st.one_of(GOOD_TIMES, GOOD_TIMES, GOOD_TIMES, BAD_TIMES)
KNOWN = [*DESCRIPTORS, *TIME_SERIES, "RecordID", "Weight"]
KNOWN = [name for name in KNOWN if name != "AdmissionWeight"]
PARAMETERS = st.one_of(
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN),
    st.sampled_from(["", "Foo", "HR ", "hr", "Température", "心率", 'H"R', '"HR"', "A,B"]),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r,:\x00"),
        max_size=6,
    ),
)
GOOD_VALUES = st.one_of(
    st.integers(-1, 400).map(str),
    st.floats(0, 300, allow_nan=False).map(lambda v: f"{v:.2f}"),
)
#: Values the loader must clean (missing, out of bounds), not refuse.
ODD_VALUES = st.one_of(
    st.sampled_from(
        [
            "-1",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e308",
            "1e400",
            "-1e400",
            "",
            "1e-400",
            "-0",
            "9" * 400,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
)
#: Values that are not numbers at all.
BROKEN_VALUES = st.sampled_from(
    ["abc", "1,5", "0x1F", "1_000", " 7", "7 ", "--3", "NA", "None", "1:5", '"7"', "7\t"]
)


@st.composite
def rows(draw, hostile: bool) -> bytes:
    shapes = ["ok"] * 8 + ["missing", "blank"] + (["extra", "raw"] if hostile else [])
    shape = draw(st.sampled_from(shapes))
    time = draw(st.one_of(GOOD_TIMES, GOOD_TIMES, BAD_TIMES) if hostile else GOOD_TIMES)
    values = [GOOD_VALUES, GOOD_VALUES, ODD_VALUES] + ([BROKEN_VALUES] if hostile else [])
    fields = [time, draw(PARAMETERS), draw(st.one_of(*values))]
    if shape == "missing":
        fields = fields[: draw(st.integers(1 if not hostile else 0, 2))]
    elif shape == "extra":
        fields += draw(st.lists(st.sampled_from(["", "1", "x"]), min_size=1, max_size=2))
    elif shape == "blank":
        fields = [draw(st.sampled_from(["", " ", ",,"] if hostile else [""]))]
    line = ",".join(fields).encode("utf-8")
    if shape == "raw":
        line = draw(st.binary(max_size=12)).replace(b"\n", b"")
    return line


@st.composite
def records(draw) -> bytes:
    """The bytes of one record file: mostly odd but loadable, a quarter of them hostile."""
    hostile = draw(st.integers(0, 3)) == 0
    if hostile and draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([b"", b"\n", b"\xef\xbb\xbf", b"garbage"]))
    headers = [HEADER] * 8 + ["\ufeff" + HEADER, "Time, Parameter, Value"]
    if hostile:
        headers += ["time,parameter,value", "", "Time;Parameter;Value"]
    header = draw(st.sampled_from(headers)).encode("utf-8")
    record_id = draw(st.integers(1, 999_999))
    lines = [header]
    if draw(st.integers(0, 3)):  # most records have their RecordID row
        lines.append(f"00:00,RecordID,{record_id}".encode())
    lines += draw(st.lists(rows(hostile), max_size=12))
    if draw(st.integers(0, 4)) == 0:  # a duplicated timestamp
        lines += [b"00:30,HR,80", b"00:30,HR,90"]
    end = draw(st.sampled_from([b"\n"] * 6 + [b"\r\n"] + ([b"\r"] if hostile else [])))
    content = end.join(lines) + draw(st.sampled_from([end, b""]))
    if hostile and draw(st.booleans()):  # non-UTF-8 or control bytes somewhere
        position = draw(st.integers(0, len(content)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80abc", b"\x00", b"\x1a", b'"']))
        content = content[:position] + junk + content[position:]
    return content


@st.composite
def record_sets(draw) -> dict[str, bytes]:
    """File name -> content: ``<id>.txt`` records (at least one) and sometimes other files."""
    ids = draw(
        st.lists(
            st.one_of(st.integers(0, 10**12), st.sampled_from([7, 2**63, 10**30])),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    # Zero-padded names too: "007.txt" and "7.txt" are the same record.
    padding = draw(st.sampled_from(["", "", "", "0", "00"]))
    files = {f"{padding}{record_id}.txt": draw(records()) for record_id in ids}
    if draw(st.integers(0, 9)) == 0:
        files["0007.txt"] = draw(records())
    if draw(st.integers(0, 4)) == 0:
        files[draw(st.sampled_from(["notes.txt", "1.csv", "x1.txt", "README"]))] = b"x"
    return files


OUTCOME_CELLS = st.one_of(
    st.integers(-1, 60).map(str), st.sampled_from(["", "nan", "inf", "-1", "x", "1e400", "0.5"])
)


@st.composite
def outcome_files(draw, ids: list[int]) -> bytes | None:
    if draw(st.booleans()):
        return None
    header = draw(st.sampled_from([OUTCOMES_HEADER] * 5 + ["RecordID,SOFA", ""]))
    lines = [header]
    for record_id in draw(st.lists(st.sampled_from(ids), max_size=len(ids) + 1)):
        cells = draw(st.lists(OUTCOME_CELLS, min_size=len(OUTCOMES), max_size=len(OUTCOMES)))
        lines.append(",".join([str(record_id), *cells]))
    return ("\n".join(lines) + "\n").encode()


def _record_ids(files: dict[str, bytes]) -> list[int]:
    return [int(name[:-4]) for name in files if name.endswith(".txt") and name[:-4].isdigit()]


def _write(root: Path, files: dict[str, bytes], outcomes: bytes | None) -> tuple[Path, Path]:
    """The set as a folder ``root/set-h`` and as ``root/archive/set-h.tar.gz``."""
    folder = root / "set-h"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    archive_dir = root / "archive"
    archive_dir.mkdir()
    archive = archive_dir / "set-h.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"set-h/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    if outcomes is not None:
        (root / "Outcomes-h.txt").write_bytes(outcomes)
        (archive_dir / "Outcomes-h.txt").write_bytes(outcomes)
    return folder, archive


def _check_cohort(cohort: Cohort, files: dict[str, bytes]) -> None:
    """The promises of a loaded cohort."""
    static, events, schema = cohort.static, cohort.events, cohort.schema
    assert static.index.is_unique
    assert sorted(static.index) == sorted(_record_ids(files))
    assert set(events[ID_COLUMN]).issubset(set(static.index))
    times = events["time"].to_numpy(dtype=np.float64)
    assert np.isfinite(times).all() and (times >= 0).all()
    for _, patient in events.groupby(ID_COLUMN, sort=False):
        assert (np.diff(patient["time"].to_numpy(dtype=np.float64)) > 0).all()
    for frame in (static, events.drop(columns=[ID_COLUMN])):
        numbers = frame.to_numpy(dtype=np.float64)
        assert not np.isinf(numbers).any()
    for name in schema.columns:
        column = schema[name]
        values = (static if column.is_static else events)[name].to_numpy(dtype=np.float64)
        values = values[~np.isnan(values)]
        if column.lower is not None:
            assert (values >= column.lower).all(), name
        if column.upper is not None:
            assert (values <= column.upper).all(), name
        if column.categories is not None:
            assert np.isin(values, column.categories).all(), name
    cleaning = cohort.metadata["cleaning"]
    for key, count in cleaning.items():
        if key == "by_variable":
            for per_variable in count.values():
                assert all(type(n) is int and n >= 0 for n in per_variable.values())
        else:
            assert type(count) is int and count >= 0, key


def _load(path: Path) -> Cohort | DataError:
    try:
        return load_physionet2012(path)
    except DataError as error:
        assert str(error)
        return error


@SETTINGS
@given(data=st.data())
def test_physionet_loader_gives_a_cohort_or_a_data_error(data):
    files = data.draw(record_sets())
    outcomes = data.draw(outcome_files(_record_ids(files)))
    with tempfile.TemporaryDirectory() as root:
        folder, archive = _write(Path(root), files, outcomes)
        from_folder, from_archive = _load(folder), _load(archive)
    event(type(from_folder).__name__)
    # The folder and the archive hold the same records: same result.
    assert type(from_folder) is type(from_archive)
    if isinstance(from_folder, DataError):
        return
    _check_cohort(from_folder, files)
    pd.testing.assert_frame_equal(from_folder.static, from_archive.static)
    pd.testing.assert_frame_equal(from_folder.events, from_archive.events)


@SETTINGS
@given(content=records(), resample=st.sampled_from([None, "1h", "7min"]))
def test_one_hostile_record_among_good_ones(content, resample):
    """A hostile record beside clean ones: every loader path, including resampling."""
    files = {
        "1.txt": f"{HEADER}\n00:00,RecordID,1\n00:00,Age,50\n00:10,HR,80\n".encode(),
        "2.txt": content,
        "3.txt": f"{HEADER}\n00:00,RecordID,3\n01:00,Temp,37.5\n".encode(),
    }
    with tempfile.TemporaryDirectory() as root:
        folder, _ = _write(Path(root), files, None)
        try:
            cohort = load_physionet2012(folder, resample=resample)
        except DataError as error:
            event("DataError")
            assert "2.txt" in str(error), str(error)  # the message names the bad record
            return
    event("cohort")
    _check_cohort(cohort, files)
    assert cohort.static.loc[1, "Age"] == 50
    assert 1 in set(cohort.events[ID_COLUMN]) and 3 in set(cohort.events[ID_COLUMN])


SERIES = [name for name in TIME_SERIES if name != "Weight"]  # Weight at 00:00 is static
MEASUREMENTS = st.tuples(
    st.integers(0, 3),  # patient
    st.integers(0, 48 * 60),  # minute
    st.sampled_from(SERIES),
    st.one_of(
        st.integers(-1, 3).map(float),
        st.floats(-50, 2500, allow_nan=False).map(lambda v: round(v, 2)),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    ),
)


@SETTINGS
@given(
    measurements=st.lists(MEASUREMENTS, max_size=40),
    end=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
def test_loaded_events_are_exactly_the_valid_measurements(measurements, end, bom):
    """Against a reference computed here: each in-bounds, non-missing measurement lands at its
    patient, time and variable (duplicates averaged), and nothing else does."""
    lines: dict[int, list[str]] = {patient: [] for patient in range(4)}
    expected: dict[tuple[int, int, str], list[float]] = {}
    for patient, minute, name, value in measurements:
        lines[patient].append(f"{minute // 60:02d}:{minute % 60:02d},{name},{value}")
        if (
            value != -1
            and not math.isnan(value)
            and not TIME_SERIES[name].outside(np.array([value]))[0]
        ):
            expected.setdefault((patient + 100, minute, name), []).append(value)
    files = {
        f"{patient + 100}.txt": (
            ("\ufeff" if bom else "") + end.join([HEADER, *rows]) + end
        ).encode()
        for patient, rows in lines.items()
    }
    with tempfile.TemporaryDirectory() as root:
        folder, archive = _write(Path(root), files, None)
        cohort = load_physionet2012(archive if bom else folder)
    _check_cohort(cohort, files)
    long = cohort.events.melt(id_vars=[ID_COLUMN, "time"]).dropna(subset=["value"])
    loaded = {
        (int(row[ID_COLUMN]), round(row["time"] * 60), row["variable"]): row["value"]
        for _, row in long.iterrows()
    }
    assert loaded.keys() == expected.keys()
    for key, values in expected.items():
        assert math.isclose(loaded[key], float(np.mean(values)), rel_tol=1e-9), key


# -- long tables -------------------------------------------------------------------------------

PLAIN_CELLS = st.one_of(
    st.integers(0, 100).map(str), st.floats(0, 100, allow_nan=False).map(lambda v: f"{v:.1f}")
)
ODD_CELLS = st.one_of(
    st.integers(-5, 100).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "inf", "-1", "abc", "1e400", '"', "é", '"1,5"', "None", "TRUE"]),
)


@st.composite
def csv_files(draw) -> tuple[bytes, list[str]]:
    others = draw(
        st.lists(st.sampled_from(["Age", "HR", "Temp", "séx", "列", "id ", "", "time"]), max_size=4)
    )
    names = ["id", "time", *others]  # duplicated names are part of the fuzz
    hostile = draw(st.booleans())
    cells = st.one_of(PLAIN_CELLS, PLAIN_CELLS, ODD_CELLS) if hostile else PLAIN_CELLS
    lines = [",".join(names)]
    for _ in range(draw(st.integers(0, 12))):
        width = len(names) + (draw(st.sampled_from([0] * 8 + [-1, 1])) if hostile else 0)
        patient = draw(st.sampled_from(["1", "2", "3", "p4", "é"]))
        lines.append(",".join([patient, *(draw(cells) for _ in range(max(width - 1, 0)))]))
    content = "\n".join(lines).encode("utf-8")
    if draw(st.booleans()):
        content = b"\xef\xbb\xbf" + content
    if hostile and draw(st.integers(0, 4)) == 0:
        content += b"\n\xff\xfe,1\n"
    return content, names


@SETTINGS
@given(table=csv_files(), id_name=st.sampled_from(["id", "id", "Age", "nope"]), data=st.data())
def test_long_csv_loader_gives_a_cohort_or_one_of_our_errors(table, id_name, data):
    content, names = table
    time_name = data.draw(st.sampled_from(["time", "time", "HR", "nope"]))
    static = data.draw(st.lists(st.sampled_from(names[2:] or ["Age"]), max_size=2, unique=True))
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "cohort.csv"
        path.write_bytes(content)
        try:
            cohort = read_long_table(path, id=id_name, time=time_name, static=static)
        except SynthmedError as error:
            event(type(error).__name__)
            assert str(error)
            return
    event("cohort")
    assert cohort.static.index.is_unique
    times = cohort.events[cohort.time_column].to_numpy(dtype=np.float64)
    assert np.isfinite(times).all()
    for _, patient in cohort.events.groupby(cohort.id_column, sort=False):
        assert (np.diff(patient[cohort.time_column].to_numpy(dtype=np.float64)) >= 0).all()
    assert cohort.metadata["source"] == "cohort.csv"


@SETTINGS
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".csv", ".parquet", ".tsv"]))
def test_garbage_bytes_are_a_data_error_or_a_cohort(content, suffix):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"cohort{suffix}"
        path.write_bytes(content)
        try:
            read_long_table(path, id="id", time="time")
        except SynthmedError:
            return


def test_strategies_reach_valid_cohorts():
    """Guard the strategies: a clean record set loads (else every property would be vacuous)."""
    files = {"7.txt": f"{HEADER}\n00:00,RecordID,7\n00:05,HR,70\n".encode()}
    with tempfile.TemporaryDirectory() as root:
        folder, archive = _write(Path(root), files, None)
        cohort = load_physionet2012(archive)
    _check_cohort(cohort, files)
    assert math.isclose(cohort.events["time"].iloc[0], 5 / 60)
