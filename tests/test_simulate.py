"""The physiological simulator, and the long-table reader on simulated cohorts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from synthmed import Cohort
from synthmed.datasets import read_long_table, simulate_cohort
from synthmed.errors import DataError

VARIABLES = ["HR", "SysABP", "DiasABP", "MAP", "RespRate", "Temp", "SaO2", "Glucose"]


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return simulate_cohort(1000, seed=0)


def per_patient_means(cohort: Cohort) -> pd.DataFrame:
    means = cohort.events.groupby(cohort.id_column)[cohort.variables].mean()
    return means.reindex(cohort.ids)


def test_same_seed_same_cohort():
    first, second = simulate_cohort(200, seed=7), simulate_cohort(200, seed=7)
    pd.testing.assert_frame_equal(first.static, second.static)
    pd.testing.assert_frame_equal(first.events, second.events)


def test_different_seeds_differ():
    first, second = simulate_cohort(200, seed=1), simulate_cohort(200, seed=2)
    assert not first.static.equals(second.static)
    assert len(first.events) != len(second.events) or not first.events.equals(second.events)


def test_layout_ids_and_metadata(cohort):
    assert cohort.n_patients == 1000
    assert list(cohort.ids) == list(range(1000))
    assert cohort.variables == VARIABLES
    assert cohort.static_columns == ["Age", "Gender", "ICUType", "In-hospital_death"]
    assert cohort.outcome_columns == ["In-hospital_death"]
    assert cohort.metadata == {"source": "synthmed.simulate_cohort", "seed": 0}
    assert cohort.schema["HR"].unit == "bpm" and cohort.schema["HR"].upper == 300
    assert cohort.schema.time_unit == "hours"


def test_values_are_physiologically_plausible(cohort):
    events = cohort.events
    ranges = {
        "HR": (30, 200),
        "SysABP": (60, 220),
        "DiasABP": (30, 130),
        "RespRate": (6, 45),
        "Temp": (34, 41.5),
        "SaO2": (70, 100),
        "Glucose": (40, 600),
    }
    for name, (low, high) in ranges.items():
        values = events[name].dropna()
        assert values.between(low, high).all(), name
    assert 70 < events["HR"].mean() < 100
    assert 36.5 < events["Temp"].mean() < 37.8
    pressures = events.dropna(subset=["SysABP"])
    assert (pressures["SysABP"] >= pressures["DiasABP"] + 15).all()
    expected_map = (pressures["SysABP"] + 2 * pressures["DiasABP"]) / 3
    np.testing.assert_allclose(pressures["MAP"], expected_map, atol=0.01)
    assert events["MAP"].isna().equals(events["SysABP"].isna())
    static = cohort.static
    assert static["Age"].between(18, 90).all()
    assert set(static["ICUType"]) == {1, 2, 3, 4}
    assert set(static["Gender"]) == {0, 1}


def test_vital_signs_are_correlated_as_expected(cohort):
    correlation = cohort.events[VARIABLES].corr()
    assert correlation.loc["SysABP", "DiasABP"] > 0.3
    assert correlation.loc["HR", "MAP"] < -0.2
    assert correlation.loc["HR", "RespRate"] > 0.2


def test_irregular_times_and_variable_lengths(cohort):
    times = cohort.events["time"]
    assert times.min() >= 0 and times.max() <= 48
    assert not np.allclose(times % 1, 0)  # jittered, not on the hour
    lengths = pd.Series(cohort.arrays.lengths, index=cohort.ids)
    assert lengths.min() >= 5 and lengths.max() <= 48 and lengths.std() > 5
    died = cohort.static["In-hospital_death"] == 1
    assert lengths[died].mean() < lengths[~died].mean()
    assert (cohort.events.groupby("patient_id")["time"].diff().dropna() > 0).all()


def test_missingness_is_present_and_informative(cohort):
    missing = cohort.events[VARIABLES].isna().mean()
    assert (missing > 0).all()
    assert missing["HR"] < 0.2 and missing["Glucose"] > 0.5 and missing["SaO2"] > 0.5
    observed = cohort.events[VARIABLES].notna().any(axis=1)
    assert observed.all()  # every event row carries at least one measurement
    died = cohort.static["In-hospital_death"].to_numpy() == 1
    glucose_rate = cohort.events["Glucose"].notna().groupby(cohort.events["patient_id"]).mean()
    assert glucose_rate[died].mean() > glucose_rate[~died].mean()


def test_outcome_rate_is_sane(cohort):
    assert 0.08 < cohort.static["In-hospital_death"].mean() < 0.25


def test_outcome_is_predictable_from_per_patient_means(cohort):
    means = per_patient_means(cohort)
    features = means.fillna(means.mean()).to_numpy()
    outcome = cohort.static["In-hospital_death"].to_numpy().astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression())
    auroc = cross_val_score(model, features, outcome, cv=5, scoring="roc_auc").mean()
    assert auroc > 0.7


def test_output_passes_cohort_validation(cohort):
    rebuilt = Cohort(cohort.static, cohort.events, cohort.schema, cohort.metadata)
    pd.testing.assert_frame_equal(rebuilt.events, cohort.events)
    assert "empty_event_rows" not in rebuilt.metadata.get("cleaning", {})


@pytest.mark.parametrize("n_patients", [0, -3, 2.5, True])
def test_invalid_size_is_refused(n_patients):
    with pytest.raises(DataError, match="n_patients"):
        simulate_cohort(n_patients)


# -- read_long_table, on a simulated cohort -----------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Cohort:
    return simulate_cohort(30, seed=3)


@pytest.mark.parametrize("name", ["cohort.csv", "cohort.csv.gz", "cohort.parquet"])
def test_long_table_round_trip(small, tmp_path, name):
    path = tmp_path / name
    long = small.to_long()
    long.to_parquet(path) if name.endswith(".parquet") else long.to_csv(path, index=False)
    read = read_long_table(
        path,
        id="patient_id",
        time="time",
        static=["Age", "Gender", "ICUType"],
        outcomes=["In-hospital_death"],
        schema=small.schema,
    )
    pd.testing.assert_frame_equal(read.events, small.events, check_dtype=False)
    pd.testing.assert_frame_equal(read.static, small.static, check_dtype=False)
    assert read.metadata["source"] == name


def test_long_table_uses_the_schema_static_columns(small, tmp_path):
    path = tmp_path / "cohort.tsv"
    small.to_long().to_csv(path, sep="\t", index=False)
    schema_file = tmp_path / "schema.json"
    small.schema.to_json(schema_file)
    read = read_long_table(path, id="patient_id", time="time", schema=schema_file)
    assert read.static_columns == small.static_columns
    assert read.outcome_columns == ["In-hospital_death"]


def test_long_table_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_long_table(tmp_path / "nowhere.csv", id="patient_id", time="time")
    odd = tmp_path / "cohort.xlsx"
    odd.write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported file extension.*\.csv"):
        read_long_table(odd, id="patient_id", time="time")
    broken = tmp_path / "cohort.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read the table"):
        read_long_table(broken, id="patient_id", time="time")
