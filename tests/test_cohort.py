"""The cohort data model: validation, conversions, splitting and array views."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synthmed import Cohort, Schema
from synthmed.errors import DataError, SchemaError


def make_tables():
    static = pd.DataFrame(
        {"Age": [50.0, 61.0, 72.0, 45.0], "Gender": [0, 1, 1, 0], "death": [0, 1, 0, 0]},
        index=pd.Index([1, 2, 3, 4], name="pid"),
    )
    events = pd.DataFrame(
        {
            "pid": [1, 1, 2, 2, 2, 4],
            "time": [0.0, 1.5, 3.0, 0.2, 1.0, 7.25],
            "HR": [80, np.nan, 100, 90, 95, 70],
            "Temp": [37.0, 37.5, np.nan, np.nan, 38.0, 36.6],
        }
    )
    return static, events


def make_cohort(**kwargs) -> Cohort:
    static, events = make_tables()
    return Cohort(static, events, **kwargs)


def test_events_are_sorted_by_patient_then_time():
    cohort = make_cohort()
    assert cohort.events["pid"].tolist() == [1, 1, 2, 2, 2, 4]
    assert cohort.events["time"].tolist() == [0.0, 1.5, 0.2, 1.0, 3.0, 7.25]
    assert cohort.n_patients == len(cohort) == 4
    assert cohort.variables == ["HR", "Temp"]


def test_schema_is_inferred_with_kinds_and_bounds():
    schema = make_cohort().schema
    assert schema["Gender"].kind == "binary"
    assert schema["HR"].kind == "numeric" and schema["HR"].role == "temporal"
    assert (schema["HR"].lower, schema["HR"].upper) == (70.0, 100.0)
    assert schema.id_column == "pid" and schema.time_column == "time"


def test_arrays_pad_sequences_with_masks_and_gaps():
    arrays = make_cohort().arrays
    assert arrays.lengths.tolist() == [2, 3, 0, 1]
    assert arrays.values.shape == (4, 3, 2)
    np.testing.assert_allclose(arrays.gaps[1], [0.2, 0.8, 2.0])
    np.testing.assert_allclose(arrays.gaps[3], [7.25, 0.0, 0.0])
    assert arrays.mask[0].tolist() == [[True, True], [False, True], [False, False]]
    assert not arrays.mask[2].any()


def test_from_arrays_inverts_arrays():
    cohort = make_cohort()
    a = cohort.arrays
    rebuilt = Cohort.from_arrays(cohort.static, a.times, a.values, a.lengths, cohort.schema)
    pd.testing.assert_frame_equal(rebuilt.events, cohort.events)


def test_long_round_trip_is_lossless_including_patients_without_events():
    cohort = make_cohort()
    long = cohort.to_long()
    assert long["pid"].tolist().count(3) == 1 and np.isnan(long.loc[long.pid == 3, "time"]).all()
    back = Cohort.from_long(
        long, id="pid", time="time", static=["Age", "Gender"], outcomes=["death"]
    )
    pd.testing.assert_frame_equal(back.events, cohort.events)
    pd.testing.assert_frame_equal(back.static, cohort.static)
    assert back.schema["death"].role == "outcome"


def test_from_long_refuses_static_values_that_change():
    long = make_cohort().to_long()
    long.loc[1, "Age"] = 99.0
    with pytest.raises(DataError, match=r"'Age'.*patient 1"):
        Cohort.from_long(long, id="pid", time="time", static=["Age", "Gender", "death"])


def test_from_long_names_a_missing_column():
    with pytest.raises(SchemaError, match="'visit'"):
        Cohort.from_long(make_cohort().to_long(), id="pid", time="visit")


def test_split_is_by_patient_and_reproducible():
    rng = np.random.default_rng(0)
    static = pd.DataFrame(
        {"death": rng.integers(0, 2, 200)}, index=pd.Index(range(200), name="pid")
    )
    events = pd.DataFrame(
        {
            "pid": np.repeat(np.arange(200), 3),
            "time": np.tile([0.0, 1, 2], 200),
            "HR": rng.normal(80, 5, 600),
        }
    )
    schema = Schema.infer(static, events, id_column="pid", outcomes=["death"])
    cohort = Cohort(static, events, schema)
    train, holdout = cohort.split(test_size=0.3, seed=1)
    assert not set(train.ids) & set(holdout.ids)
    assert set(train.ids) | set(holdout.ids) == set(cohort.ids)
    assert holdout.n_patients == 60
    assert set(holdout.events["pid"]) <= set(holdout.ids)
    rates = train.static["death"].mean(), holdout.static["death"].mean()
    assert abs(rates[0] - rates[1]) < 0.02
    again, _ = cohort.split(test_size=0.3, seed=1)
    assert list(again.ids) == list(train.ids)
    other, _ = cohort.split(test_size=0.3, seed=2)
    assert list(other.ids) != list(train.ids)


def test_schema_json_round_trip_and_edit(tmp_path):
    schema = make_cohort().schema.with_column("HR", lower=0.0, upper=300.0, unit="bpm")
    path = tmp_path / "schema.json"
    schema.to_json(path)
    back = Schema.from_json(path)
    assert back == schema
    assert back["HR"].unit == "bpm" and back["HR"].upper == 300.0
    assert Schema.from_json(schema.to_json()) == schema
    with pytest.raises(SchemaError, match="newer"):
        Schema.from_dict({**schema.to_dict(), "format_version": 99})


def test_parquet_round_trip_keeps_schema_and_metadata(tmp_path):
    cohort = make_cohort(metadata={"source": "unit test"})
    back = Cohort.read_parquet(cohort.to_parquet(tmp_path / "c.parquet"))
    assert back.schema == cohort.schema
    assert back.metadata["source"] == "unit test"
    pd.testing.assert_frame_equal(back.events, cohort.events)


def test_empty_event_rows_are_dropped_and_counted():
    static, events = make_tables()
    events.loc[len(events)] = [1, 9.0, np.nan, np.nan]
    cohort = Cohort(static, events)
    assert len(cohort.events) == 6
    assert cohort.cleaning == {"empty_event_rows": 1}


# -- every validation error, triggered by a crafted bad input --------------------------------------


def test_missing_id_column():
    static, events = make_tables()
    with pytest.raises(SchemaError, match="patient id column 'pid'"):
        Cohort(static, events.drop(columns="pid"))


def test_missing_time_column():
    static, events = make_tables()
    with pytest.raises(SchemaError, match="time column 'time'"):
        Cohort(static, events.drop(columns="time"))


def test_non_numeric_value_names_column_patient_and_value():
    static, events = make_tables()
    events["HR"] = events["HR"].astype(object)
    events.loc[4, "HR"] = "ninety"
    with pytest.raises(DataError, match=r"column 'HR': patient 2 has non-numeric value 'ninety'"):
        Cohort(static, events)


def test_infinite_value():
    static, events = make_tables()
    events.loc[5, "Temp"] = np.inf
    with pytest.raises(DataError, match=r"'Temp': patient 4 has infinite value"):
        Cohort(static, events)


@pytest.mark.parametrize("bad_time", [-1.0, np.nan, np.inf])
def test_negative_or_non_finite_time(bad_time):
    static, events = make_tables()
    events.loc[2, "time"] = bad_time
    with pytest.raises(DataError, match=r"column 'time': patient 2 has time"):
        Cohort(static, events)


def test_patient_in_events_not_in_static():
    static, events = make_tables()
    extra = pd.DataFrame({"pid": [77], "time": [1.0], "HR": [80.0], "Temp": [37.0]})
    events = pd.concat([events, extra], ignore_index=True)
    with pytest.raises(DataError, match="patient 77 is in events but not in static"):
        Cohort(static, events)


def test_empty_cohort():
    static, events = make_tables()
    with pytest.raises(DataError, match="empty"):
        Cohort(static.iloc[:0], events.iloc[:0])


def test_column_declared_twice():
    static, events = make_tables()
    events["Age"] = 50.0
    with pytest.raises(SchemaError, match="'Age' is declared twice"):
        Cohort(static, events)
    doubled = pd.concat([static, static[["Age"]]], axis=1)
    with pytest.raises(SchemaError, match="'Age' is declared twice"):
        Cohort(doubled, make_tables()[1])


def test_unknown_category():
    cohort = make_cohort()
    static, events = make_tables()
    static.loc[2, "Gender"] = 5
    with pytest.raises(DataError, match=r"'Gender': patient 2 has unknown category 5"):
        Cohort(static, events, cohort.schema)


def test_value_outside_declared_bounds():
    schema = make_cohort().schema.with_column("HR", lower=0.0, upper=95.0)
    with pytest.raises(DataError, match=r"'HR': patient 2 has value 100.0 outside"):
        Cohort(*make_tables(), schema)


def test_duplicate_patient_ids():
    static, events = make_tables()
    static.index = pd.Index([1, 2, 2, 4], name="pid")
    with pytest.raises(DataError, match="patient 2 appears twice"):
        Cohort(static, events)


def test_schema_mismatch_names_the_column():
    schema = make_cohort().schema
    static, events = make_tables()
    with pytest.raises(SchemaError, match="'Temp' of the schema is missing from events"):
        Cohort(static, events.drop(columns="Temp"), schema)


def test_to_sdv_is_accepted_by_sdv_metadata():
    pytest.importorskip("sdv", reason="SDV is an optional extra (pip install synthmed[sdv])")
    df, metadata = make_cohort().to_sdv()
    metadata.validate()
    metadata.validate_data({"cohort": df})
    assert metadata.tables["cohort"].sequence_key == "pid"


def test_free_text_columns_are_refused_so_they_cannot_be_copied():
    static = pd.DataFrame(
        {"note": [f"patient complains of pain #{i}" for i in range(40)]},
        index=pd.Index(range(40), name="pid"),
    )
    events = pd.DataFrame({"pid": range(40), "time": 0.0, "HR": 80.0})
    with pytest.raises(SchemaError, match="'note' looks like free text"):
        Cohort(static, events)


def test_from_arrays_matches_the_validating_constructor_and_counts_empty_steps():
    cohort = make_cohort()
    a = cohort.arrays
    values = a.values.copy()
    values[1, 1] = np.nan  # a step with nothing observed is dropped and counted, as in __init__
    rebuilt = Cohort.from_arrays(cohort.static, a.times, values, a.lengths, cohort.schema)
    kept = cohort.events.drop(index=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(rebuilt.events, kept)
    pd.testing.assert_frame_equal(rebuilt.events, Cohort(cohort.static, kept, cohort.schema).events)
    assert rebuilt.cleaning == {"empty_event_rows": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, v: t.__setitem__((1, 2), 0.1), "patient 2 has time 0.1 after 1.0"),
        (lambda t, v: t.__setitem__((0, 0), np.inf), "patient 1 has time inf"),
        (lambda t, v: t.__setitem__((0, 0), -1.0), "patient 1 has time -1.0"),
        (lambda t, v: v.__setitem__((3, 0, 0), np.inf), "column 'HR': patient 4 has infinite"),
    ],
)
def test_from_arrays_refuses_broken_generator_output(change, message):
    cohort = make_cohort()
    a = cohort.arrays
    times, values = a.times.copy(), a.values.astype(np.float64)
    change(times, values)
    with pytest.raises(DataError, match=message):
        Cohort.from_arrays(cohort.static, times, values, a.lengths, cohort.schema)


def test_from_arrays_refuses_bad_category_codes_and_shapes():
    static, events = make_tables()
    events["Unit"] = ["icu", "ward", "icu", "icu", "ward", "icu"]
    cohort = Cohort(static, events)
    a = cohort.arrays
    j = a.variables.index("Unit")
    values = a.values.astype(np.float64)
    values[0, 0, j] = 5.0
    with pytest.raises(DataError, match="column 'Unit': patient 1 has category code 5.0"):
        Cohort.from_arrays(cohort.static, a.times, values, a.lengths, cohort.schema)
    with pytest.raises(DataError, match="array shapes disagree"):
        Cohort.from_arrays(cohort.static, a.times, a.values[:, :, :1], a.lengths, cohort.schema)
    with pytest.raises(DataError, match=r"patient 1 has length 8 outside \[0, 3\]"):
        Cohort.from_arrays(cohort.static, a.times, a.values, a.lengths + 6, cohort.schema)
    rebuilt = Cohort.from_arrays(cohort.static, a.times, a.values, a.lengths, cohort.schema)
    pd.testing.assert_frame_equal(rebuilt.events, cohort.events)
