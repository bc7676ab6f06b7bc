"""The PhysioNet/CinC Challenge 2012 loader, on crafted records and on the real set A."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthmed.datasets import load_physionet2012
from synthmed.datasets.physionet2012 import TIME_SERIES
from synthmed.errors import DataError

HEADER = "Time,Parameter,Value"
OUTCOMES_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"


def descriptors(record_id: int, age=60, gender=1, height=170, icu=2, weight=80) -> list[str]:
    return [
        f"00:00,RecordID,{record_id}",
        f"00:00,Age,{age}",
        f"00:00,Gender,{gender}",
        f"00:00,Height,{height}",
        f"00:00,ICUType,{icu}",
        f"00:00,Weight,{weight}",
    ]


CRAFTED = {
    # Duplicate HR at 00:30, -1 HR and an out-of-bounds Temp at 01:15, Weight as a time series.
    1: descriptors(1, height=-1)
    + [
        "00:30,HR,80",
        "00:30,HR,90",
        "00:30,Temp,37.0",
        "01:15,HR,-1",
        "01:15,Temp,50",
        "02:00,Weight,81",
        "02:00,HR,100",
    ],
    # Descriptors only: no time-series row.
    2: descriptors(2, icu=3),
    # Missing gender, an empty and an unknown parameter name, two HR in the first hour.
    3: descriptors(3, gender=-1, weight=-1)
    + ["00:00,HR,60", "00:45,HR,80", "01:59,HR,70", "03:00,,5", "03:00,Foo,1"],
}
CRAFTED_OUTCOMES = ["1,10,3,5,-1,0", "2,-1,2,4,-1,0", "3,20,9,3,2,1"]


def write_set(root: Path, records=CRAFTED, outcomes=CRAFTED_OUTCOMES, name="set-x") -> Path:
    """Write ``records`` as ``<root>/<name>/<id>.txt`` and the outcomes file beside the folder."""
    folder = root / name
    folder.mkdir(parents=True)
    for record_id, rows in records.items():
        (folder / f"{record_id}.txt").write_text("\n".join([HEADER, *rows]) + "\n")
    if outcomes is not None:
        suffix = name.removeprefix("set-")
        (root / f"Outcomes-{suffix}.txt").write_text("\n".join([OUTCOMES_HEADER, *outcomes]) + "\n")
    return folder


def add_member(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))


@pytest.fixture
def crafted(tmp_path):
    return load_physionet2012(write_set(tmp_path))


def rows_of(cohort, record_id):
    events = cohort.events
    return events[events["RecordID"] == record_id].set_index("time")


# -- crafted records ---------------------------------------------------------------------------------


def test_static_descriptors_and_outcomes(crafted):
    static = crafted.static
    assert list(static.index) == [1, 2, 3]
    assert static.loc[1, "Age"] == 60 and static.loc[1, "Gender"] == 1
    assert static.loc[2, "ICUType"] == 3
    assert static.loc[3, "In-hospital_death"] == 1 and static.loc[3, "Survival"] == 2
    assert crafted.outcome_columns == [
        "SAPS-I",
        "SOFA",
        "Length_of_stay",
        "Survival",
        "In-hospital_death",
    ]
    assert crafted.metadata["outcomes"] == "Outcomes-x.txt"
    assert crafted.metadata["set"] == "set-x"
    assert crafted.schema.time_unit == "hours"
    assert crafted.schema["Gender"].kind == "binary"
    assert crafted.schema["ICUType"].categories == (1, 2, 3, 4)


def test_minus_one_is_missing_and_counted(crafted):
    static = crafted.static
    assert np.isnan(static.loc[1, "Height"])
    assert np.isnan(static.loc[3, "Gender"])
    assert np.isnan(static.loc[3, "AdmissionWeight"])
    assert np.isnan(static.loc[2, "SAPS-I"])
    assert np.isnan(static.loc[1, "Survival"])
    cleaning = crafted.metadata["cleaning"]
    # Height of 1, HR at 01:15 of 1, Gender and Weight descriptor of 3.
    assert cleaning["missing_-1"] == 4
    assert cleaning["by_variable"]["missing_-1"] == {
        "Height": 1,
        "HR": 1,
        "Gender": 1,
        "AdmissionWeight": 1,
    }
    assert cleaning["outcomes_missing_-1"] == 3


def test_out_of_bounds_value_becomes_nan_and_is_counted(crafted):
    cleaning = crafted.metadata["cleaning"]
    assert cleaning["out_of_bounds"] == 1
    assert cleaning["by_variable"]["out_of_bounds"] == {"Temp": 1}
    # 01:15 held only the -1 HR and the 50 °C Temp: nothing left to record at that time.
    assert 1.25 not in rows_of(crafted, 1).index


def test_duplicate_timestamps_are_averaged_and_counted(crafted):
    patient = rows_of(crafted, 1)
    assert patient.loc[0.5, "HR"] == 85.0
    assert patient.loc[0.5, "Temp"] == 37.0
    assert crafted.metadata["cleaning"]["duplicates_merged"] == 1
    assert crafted.metadata["cleaning"]["by_variable"]["duplicates_merged"] == {"HR": 1}


def test_times_are_hours_since_admission(crafted):
    assert list(rows_of(crafted, 1).index) == [0.5, 2.0]
    # Whole minutes over 60, the floats a generator writes for the same minutes.
    np.testing.assert_array_equal(rows_of(crafted, 3).index, np.array([0, 45, 119]) / 60)


def test_weight_descriptor_is_static_and_later_weights_are_a_time_series(crafted):
    assert crafted.static.loc[1, "AdmissionWeight"] == 80
    assert "Weight" in crafted.variables and "Weight" not in crafted.static_columns
    weights = crafted.events.dropna(subset=["Weight"])
    assert weights[["RecordID", "time", "Weight"]].values.tolist() == [[1, 2.0, 81.0]]


def test_patient_without_time_series_is_kept_and_counted(crafted):
    assert 2 in crafted.static.index
    assert 2 not in set(crafted.events["RecordID"])
    assert crafted.metadata["cleaning"]["patients_without_events"] == 1
    lengths = dict(zip(crafted.arrays.ids, crafted.arrays.lengths, strict=True))
    assert lengths == {1: 2, 2: 0, 3: 3}


def test_empty_and_unknown_parameter_rows_are_dropped_and_counted(crafted):
    cleaning = crafted.metadata["cleaning"]
    assert cleaning["empty_parameter_rows"] == 1
    assert cleaning["unknown_parameter_rows"] == 1
    assert cleaning["by_variable"]["unknown_parameter_rows"] == {"Foo": 1}
    assert 3.0 not in rows_of(crafted, 3).index


def test_cleaning_summary_is_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="synthmed"):
        load_physionet2012(write_set(tmp_path))
    summary = [r.getMessage() for r in caplog.records if "cleaning" in r.getMessage()]
    assert summary and "duplicates_merged=1" in summary[0]


def test_variables_keeps_a_panel(tmp_path):
    cohort = load_physionet2012(write_set(tmp_path), variables=["Temp", "HR"])
    assert cohort.variables == ["Temp", "HR"]
    assert list(cohort.events.columns) == ["RecordID", "time", "Temp", "HR"]
    assert list(rows_of(cohort, 1).index) == [0.5, 2.0]  # the Weight-only row would not be kept
    only_temp = load_physionet2012(write_set(tmp_path / "t"), variables=["Temp"])
    assert list(only_temp.events["time"]) == [0.5]
    assert only_temp.metadata["cleaning"]["patients_without_events"] == 2


def test_unknown_variable_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match="'Heartrate'.*HR"):
        load_physionet2012(write_set(tmp_path), variables=["HR", "Heartrate"])


def test_resample_averages_per_bin_at_bin_start(tmp_path):
    cohort = load_physionet2012(write_set(tmp_path), resample="1h")
    first = rows_of(cohort, 1)
    assert list(first.index) == [0.0, 2.0]
    assert first.loc[0.0, "HR"] == 85.0 and first.loc[2.0, "Weight"] == 81.0
    third = rows_of(cohort, 3)
    assert list(third.index) == [0.0, 1.0]
    assert third.loc[0.0, "HR"] == 70.0 and third.loc[1.0, "HR"] == 70.0
    assert np.isnan(third.loc[0.0, "Temp"])
    assert cohort.metadata["resample"] == "1h"
    half_hours = load_physionet2012(write_set(tmp_path / "h"), resample="30min")
    assert list(rows_of(half_hours, 3).index) == [0.0, 0.5, 1.5]


@pytest.mark.parametrize("resample", ["often", "-1h", "0min", 1])
def test_invalid_resample_is_refused(tmp_path, resample):
    with pytest.raises(DataError, match="resample"):
        load_physionet2012(write_set(tmp_path), resample=resample)


def test_missing_outcomes_file_loads_without_outcomes(tmp_path, caplog):
    folder = write_set(tmp_path, outcomes=None)
    with caplog.at_level(logging.WARNING, logger="synthmed"):
        cohort = load_physionet2012(folder)
    assert cohort.outcome_columns == []
    assert cohort.metadata["outcomes"] is None
    assert any("no outcomes file" in r.getMessage() for r in caplog.records)


def test_explicit_outcomes_file(tmp_path):
    folder = write_set(tmp_path, outcomes=None)
    outcomes = tmp_path / "elsewhere.csv"
    outcomes.write_text("\n".join([OUTCOMES_HEADER, "1,10,3,5,-1,1"]) + "\n")
    cohort = load_physionet2012(folder, outcomes=outcomes)
    assert cohort.static["In-hospital_death"].tolist()[:1] == [1]
    assert cohort.metadata["cleaning"]["patients_without_outcomes"] == 2


def test_outcomes_file_without_documented_columns(tmp_path):
    folder = write_set(tmp_path, outcomes=None)
    outcomes = tmp_path / "Outcomes-x.txt"
    outcomes.write_text("RecordID,In-hospital_death\n1,0\n")
    with pytest.raises(DataError, match="SAPS-I"):
        load_physionet2012(folder)


def test_archive_gives_the_same_cohort_as_the_folder(tmp_path):
    folder = write_set(tmp_path)
    archive = tmp_path / "set-x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="set-x")
    from_folder, from_archive = load_physionet2012(folder), load_physionet2012(archive)
    pd.testing.assert_frame_equal(from_folder.static, from_archive.static)
    pd.testing.assert_frame_equal(from_folder.events, from_archive.events)
    assert from_folder.metadata == from_archive.metadata


@pytest.mark.parametrize("name", ["../x.txt", "set-a/../../x.txt", "/tmp/x.txt"])
def test_archive_member_outside_the_archive_is_refused(tmp_path, name):
    archive = tmp_path / "set-a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "set-a/1.txt", "\n".join([HEADER, *CRAFTED[1]]).encode())
        add_member(tar, name, b"Time,Parameter,Value\n")
    with pytest.raises(DataError, match="outside the archive"):
        load_physionet2012(archive)


def test_archive_link_member_is_refused(tmp_path):
    archive = tmp_path / "set-a.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("set-a/2.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="link"):
        load_physionet2012(archive)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "set-z.tar.gz"
    with pytest.raises(FileNotFoundError, match="set-z.tar.gz"):
        load_physionet2012(missing)


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "set-a.zip"
    bogus.write_bytes(b"PK")
    with pytest.raises(DataError, match="neither a folder nor"):
        load_physionet2012(bogus)
    corrupted = tmp_path / "set-a.tar.gz"
    corrupted.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read the archive"):
        load_physionet2012(corrupted)


def test_record_without_header_is_named(tmp_path):
    folder = write_set(tmp_path)
    (folder / "4.txt").write_text("00:00,RecordID,4\n")
    with pytest.raises(DataError, match="4.txt.*header"):
        load_physionet2012(folder)


def test_malformed_row_names_its_record(tmp_path):
    folder = write_set(tmp_path)
    (folder / "4.txt").write_text("\n".join([HEADER, *descriptors(4), "00:30,HR,fast"]) + "\n")
    with pytest.raises(DataError, match="4.txt"):
        load_physionet2012(folder)


def test_malformed_value_names_its_record_line_and_text(tmp_path):
    folder = write_set(tmp_path)
    (folder / "4.txt").write_text("\n".join([HEADER, *descriptors(4), "00:30,HR,fast"]) + "\n")
    with pytest.raises(DataError, match=r"4\.txt', line 8: '00:30,HR,fast'.*not a number"):
        load_physionet2012(folder)


def test_quote_in_a_row_does_not_swallow_the_rows_of_other_records(tmp_path):
    """Found by tests/test_loader_hypothesis.py: an unmatched quote made the CSV parser read on
    across line and record boundaries, so rows were attributed to the wrong stays (or the load
    crashed with an IndexError)."""
    records = {
        4: [*descriptors(4), '00:10,"HR,80', "00:20,HR,81"],
        5: [*descriptors(5), "00:30,HR,90", 'H"R', "00:40,HR,91"],
        6: [*descriptors(6), "00:50,HR,100"],
    }
    folder = write_set(tmp_path, records, outcomes=None)
    with pytest.raises(DataError, match=r"5\.txt', line 9: 'H\"R' has a time that is not a number"):
        load_physionet2012(folder)
    (folder / "5.txt").write_text("\n".join([HEADER, *records[5][:-2], records[5][-1]]) + "\n")
    cohort = load_physionet2012(folder)
    hr = cohort.events.set_index(["RecordID", "time"])["HR"]
    assert hr.to_dict() == {
        (4, 20 / 60): 81.0,
        (5, 0.5): 90.0,
        (5, 40 / 60): 91.0,
        (6, 50 / 60): 100.0,
    }
    assert cohort.metadata["cleaning"]["by_variable"]["unknown_parameter_rows"] == {'"HR': 1}


@pytest.mark.parametrize("time", ["25:99", "-00:30", "-01:00", "1.5:00", "00:60", "inf:00", "7"])
def test_invalid_time_names_its_record_line_and_text(tmp_path, time):
    """Found by tests/test_loader_hypothesis.py: '-00:30' was read as 00:30, '25:99' as 26:39
    and '1.5:00' as 01:30, silently."""
    records = {4: [*descriptors(4), "00:10,HR,80", f"{time},HR,81"]}
    folder = write_set(tmp_path, records, outcomes=None)
    with pytest.raises(DataError, match=rf"4\.txt', line 9: '{re.escape(time)},HR,81'"):
        load_physionet2012(folder)


def test_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    plain = write_set(tmp_path / "plain", outcomes=None)
    windows = write_set(tmp_path / "windows", outcomes=None)
    for record in windows.iterdir():
        text = record.read_text().replace("\n", "\r\n")
        record.write_bytes("\ufeff".encode() + text.encode())
    expected, got = load_physionet2012(plain), load_physionet2012(windows)
    pd.testing.assert_frame_equal(got.static, expected.static)
    pd.testing.assert_frame_equal(got.events, expected.events)


def test_records_with_only_a_header_are_stays_without_rows(tmp_path):
    """A set in which no record has a single row (an empty parse) still loads."""
    folder = tmp_path / "set-e"
    folder.mkdir()
    for record_id in (1, 2):
        (folder / f"{record_id}.txt").write_text(HEADER + "\n")
    cohort = load_physionet2012(folder)
    assert list(cohort.static.index) == [1, 2] and cohort.static.isna().all().all()
    assert cohort.events.empty
    assert cohort.metadata["cleaning"]["patients_without_events"] == 2


def test_folder_without_records(tmp_path):
    (tmp_path / "set-a").mkdir()
    with pytest.raises(DataError, match="no <RecordID>.txt"):
        load_physionet2012(tmp_path / "set-a")


# -- the real set A ------------------------------------------------------------------------------


@pytest.mark.realdata
def test_set_a_matches_the_published_counts(physionet_a):
    cohort = physionet_a
    assert cohort.n_patients == 4000
    assert int(cohort.static["In-hospital_death"].sum()) == 554
    with_events = cohort.events["RecordID"].nunique()
    assert with_events >= 3996
    assert cohort.metadata["cleaning"]["patients_without_events"] == 4000 - with_events
    with_hr = cohort.events.dropna(subset=["HR"])["RecordID"].nunique()
    assert with_hr / cohort.n_patients > 0.95
    times = cohort.events["time"]
    assert times.min() >= 0 and times.max() <= 48
    assert sorted(cohort.variables) == sorted(TIME_SERIES) and len(cohort.variables) == 37
    assert cohort.static["Gender"].dropna().isin([0, 1]).all()
    assert cohort.static["ICUType"].isin([1, 2, 3, 4]).all()


@pytest.mark.realdata
def test_set_a_metadata_and_cleaning(physionet_a):
    metadata = physionet_a.metadata
    assert metadata["source"] == "PhysioNet/CinC Challenge 2012"
    assert (metadata["set"], metadata["license"]) == ("set-a", "ODC-By-1.0")
    cleaning = metadata["cleaning"]
    # The shipped quirks: -1 codes (mostly Height), repeated timestamps, implausible values.
    assert cleaning["by_variable"]["missing_-1"]["Height"] > 1000
    assert cleaning["duplicates_merged"] > 1000
    assert cleaning["by_variable"]["out_of_bounds"]["pH"] > 0
    assert physionet_a.events["pH"].max() <= 8.0
    assert physionet_a.schema["HR"].unit == "bpm"
    assert (physionet_a.schema["Temp"].lower, physionet_a.schema["Temp"].upper) == (20.0, 45.0)


@pytest.mark.realdata
def test_real_archive_and_extracted_folder_agree(physionet_dir, tmp_path):
    """The first 50 stays of set A, as an archive and as an extracted folder."""
    archive = tmp_path / "set-a.tar.gz"
    folder = tmp_path / "set-a"
    folder.mkdir()
    with (
        tarfile.open(physionet_dir / "set-a.tar.gz") as source,
        tarfile.open(archive, "w:gz") as tar,
    ):
        members = (m for m in source if m.isfile() and m.name.endswith(".txt"))
        for _, member in zip(range(50), members, strict=False):
            content = source.extractfile(member).read()
            add_member(tar, member.name, content)
            (folder / Path(member.name).name).write_bytes(content)
    outcomes = physionet_dir / "Outcomes-a.txt"
    from_archive = load_physionet2012(archive, outcomes=outcomes)
    from_folder = load_physionet2012(folder, outcomes=outcomes)
    assert from_archive.n_patients == 50
    assert from_archive.static["In-hospital_death"].notna().all()
    pd.testing.assert_frame_equal(from_archive.static, from_folder.static)
    pd.testing.assert_frame_equal(from_archive.events, from_folder.events)
    assert from_archive.metadata == from_folder.metadata
