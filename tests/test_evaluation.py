"""Fast tests of the evaluation suite on simulated cohorts (synthmed.datasets.simulate_cohort).

The real-data checks (PhysioNet 2012: real vs real near the ceiling, every negative control
caught) are in test_evaluation_physionet.py; the HTML rendering in test_report_html.py.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sdmetrics.base import BaseMetric

import synthmed
from synthmed import Cohort, DataError, Schema, SchemaError
from synthmed.datasets import simulate_cohort
from synthmed.evaluation import Report, controls, evaluate
from synthmed.evaluation.base import Metric, limit_threads
from synthmed.evaluation.discrimination import DiscriminativeScore, GRUDiscriminativeScore
from synthmed.evaluation.features import compact_observations, patient_features
from synthmed.evaluation.fidelity import (
    AutocorrelationError,
    MeanSequenceLengthError,
    ObservationRateError,
    TimeGapSimilarity,
    autocorrelation,
    fidelity_scores,
)
from synthmed.evaluation.privacy import (
    NNDR,
    DCRRatio,
    ExactCopyRate,
    MembershipInferenceAUROC,
    privacy_scores,
)
from synthmed.evaluation.utility import NextValueMAE, OutcomeAUROC

REQUIRED_METRICS = {
    "KSComplement",
    "TVComplement",
    "MissingValueSimilarity",
    "CorrelationSimilarity",
    "SequenceLengthSimilarity",
    "StatisticMSAS",
    "InterRowMSAS",
    "time_gap_similarity",
    "acf_error",
    "observation_rate_error",
    "mean_sequence_length_error",
    "discriminative_score",
    "discriminative_auroc",
    "discriminative_score_gru",
    "discriminative_auroc_gru",
    "tstr_auroc",
    "trtr_auroc",
    "next_value_mae_ratio",
    "dcr_ratio",
    "nndr",
    "exact_copy_rate",
    "membership_inference_auroc",
    "DCROverfittingProtection",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Metrics called directly run single-threaded, as evaluate() runs them."""
    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def cohorts() -> dict[str, Cohort]:
    real = simulate_cohort(300, seed=0)
    train, holdout = real.split(test_size=0.5, seed=0)
    return {"train": train, "holdout": holdout, "synthetic": simulate_cohort(150, seed=1)}


@pytest.fixture(scope="module")
def report(cohorts) -> Report:
    return evaluate(cohorts["holdout"], cohorts["synthetic"], cohorts["train"])


def _values(scores: pd.DataFrame, metric: str) -> pd.Series:
    return scores.loc[scores["metric"] == metric, "value"]


# -- the report -----------------------------------------------------------------------------------


def test_report_has_every_stable_metric_name(report):
    assert set(report.scores["metric"]) >= REQUIRED_METRICS
    assert list(report.scores.columns) == [
        "section",
        "metric",
        "variable",
        "value",
        "ceiling",
        "goal",
    ]
    assert set(report.scores["section"]) == {"fidelity", "utility", "privacy"}
    assert set(report.scores["goal"]) <= {"maximize", "minimize"}


def test_public_entry_points():
    assert synthmed.evaluate is evaluate
    assert synthmed.Report is Report


def test_fidelity_rows_have_a_ceiling_and_values_within_bounds(report):
    fidelity = report.scores[report.scores["section"] == "fidelity"]
    assert fidelity["ceiling"].notna().all()
    similarities = fidelity[fidelity["goal"] == "maximize"]
    assert similarities["value"].between(0, 1).all()
    assert _values(report.scores, "discriminative_score").between(0, 0.5).all()
    assert report.scores.loc[report.scores["section"] == "utility", "ceiling"].isna().all()


def test_real_vs_real_scores_well(report):
    summary = report.summary()
    assert set(summary) == {"fidelity", "utility", "privacy"}
    assert all(0 <= value <= 1 for value in summary.values())
    assert summary["fidelity"] > 0.85
    assert summary["privacy"] > 0.8
    assert _values(report.scores, "discriminative_score").iloc[0] < 0.15
    assert _values(report.scores, "exact_copy_rate").iloc[0] == 0


def test_to_json_writes_scores_summary_and_notes(report, tmp_path):
    data = json.loads(report.to_json(tmp_path / "report.json").read_text())
    assert data["summary"].keys() == {"fidelity", "utility", "privacy"}
    assert len(data["scores"]) == len(report.scores)
    assert {row["metric"] for row in data["scores"]} == set(report.scores["metric"])
    utility = [row for row in data["scores"] if row["section"] == "utility"]
    assert all(row["ceiling"] is None for row in utility)
    assert data["synthetic_metadata"]["seed"] == 1


@pytest.fixture(scope="module")
def report_without_train(cohorts) -> Report:
    return evaluate(cohorts["holdout"], cohorts["synthetic"], gru=False)


def test_without_train_there_is_no_privacy_and_no_ceiling(report_without_train):
    report = report_without_train
    assert "privacy" not in set(report.scores["section"])
    assert report.scores["ceiling"].isna().all()
    assert math.isnan(report.summary()["privacy"])
    assert {"tstr_auroc", "trtr_auroc"} <= set(report.scores["metric"])
    assert any("TRTR" in note for note in report.notes)
    assert any("train=" in note for note in report.notes)


def test_evaluation_is_reproducible(cohorts, report_without_train):
    again = evaluate(cohorts["holdout"], cohorts["synthetic"], gru=False)
    pd.testing.assert_frame_equal(report_without_train.scores, again.scores)


def test_spent_privacy_budget_and_history_are_reported(cohorts, tmp_path):
    synthetic = cohorts["synthetic"].subset(cohorts["synthetic"].ids[:40])
    synthetic.metadata.update(epsilon=3.0, delta=1e-5)
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [2.0, 1.5, 1.2]})
    holdout = cohorts["holdout"].subset(cohorts["holdout"].ids[:40])
    report = evaluate(holdout, synthetic, gru=False, history=history)
    privacy = report.scores.set_index("metric")["value"]
    assert privacy["epsilon"] == 3.0
    assert privacy["delta"] == 1e-5
    assert 'id="fig-training-history"' in report.to_html(tmp_path / "r.html").read_text()


def test_a_variable_the_synthetic_cohort_never_measures_scores_worst(cohorts):
    synthetic = cohorts["synthetic"]
    events = synthetic.events.assign(Glucose=np.nan)
    without = Cohort(synthetic.static, events, synthetic.schema)
    report = evaluate(cohorts["holdout"], without, gru=False)
    glucose = report.scores[report.scores["variable"] == "Glucose"].set_index("metric")["value"]
    for metric in ("KSComplement", "StatisticMSAS", "InterRowMSAS", "time_gap_similarity"):
        assert glucose[metric] == 0
    assert glucose["observation_rate_error"] > 0.1
    assert any("Glucose" in note for note in report.notes)
    assert report.summary()["utility"] < 0.95


# -- errors -----------------------------------------------------------------------------------------


def test_empty_synthetic_cohort_is_a_clear_error(cohorts):
    synthetic = cohorts["synthetic"]
    empty = Cohort(synthetic.static, synthetic.events.iloc[:0], synthetic.schema)
    with pytest.raises(DataError, match="no event rows"):
        evaluate(cohorts["holdout"], empty)


def test_too_small_cohort_is_a_clear_error(cohorts):
    synthetic = cohorts["synthetic"]
    with pytest.raises(DataError, match="at least 10"):
        evaluate(cohorts["holdout"], synthetic.subset(synthetic.ids[:3]))


def test_wrong_argument_type_is_a_clear_error(cohorts):
    with pytest.raises(DataError, match="synthetic must be a synthmed.Cohort"):
        evaluate(cohorts["holdout"], cohorts["synthetic"].events)


def test_missing_variable_is_a_schema_error(cohorts):
    synthetic = cohorts["synthetic"]
    schema = synthetic.schema
    columns = [c for c in schema.columns.values() if c.name != "Glucose"]
    narrower = Cohort(
        synthetic.static,
        synthetic.events.drop(columns="Glucose"),
        Schema(columns, schema.id_column, schema.time_column, schema.time_unit),
    )
    with pytest.raises(SchemaError, match="lacks temporal column 'Glucose'"):
        evaluate(cohorts["holdout"], narrower)
    with pytest.raises(SchemaError, match="'Glucose'"):
        evaluate(cohorts["holdout"], cohorts["synthetic"], train=narrower)


def test_different_categories_are_a_schema_error(cohorts):
    synthetic = cohorts["synthetic"]
    schema = synthetic.schema.with_column("ICUType", categories=(1, 2, 3, 4, 5))
    other = Cohort(synthetic.static, synthetic.events, schema)
    with pytest.raises(SchemaError, match="'ICUType'"):
        evaluate(cohorts["holdout"], other)


# -- our metrics, one by one ------------------------------------------------------------------------


def _ar1_cohort(phi: float, n: int = 100, steps: int = 300, seed: int = 0) -> Cohort:
    rng = np.random.default_rng(seed)
    x = np.zeros((n, steps))
    x[:, 0] = rng.normal(size=n)
    for t in range(1, steps):
        x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi**2) * rng.normal(size=n)
    events = pd.DataFrame(
        {
            "patient_id": np.repeat(np.arange(n), steps),
            "time": np.tile(np.arange(steps, dtype=float), n),
            "x": x.ravel(),
        }
    )
    static = pd.DataFrame({"age": rng.normal(60, 10, n)}, index=pd.RangeIndex(n, name="patient_id"))
    return Cohort(static, events)


def test_metrics_have_the_sdmetrics_shape():
    for metric in (
        TimeGapSimilarity,
        AutocorrelationError,
        ObservationRateError,
        MeanSequenceLengthError,
        DiscriminativeScore,
        GRUDiscriminativeScore,
        OutcomeAUROC,
        NextValueMAE,
        DCRRatio,
        NNDR,
        ExactCopyRate,
        MembershipInferenceAUROC,
    ):
        assert issubclass(metric, Metric) and issubclass(metric, BaseMetric)
        assert metric.name and metric.goal is not None
        assert metric.min_value < metric.max_value
        assert callable(metric.compute)


def test_autocorrelation_recovers_an_ar1_process():
    acf = autocorrelation(_ar1_cohort(0.8).arrays, "x")
    np.testing.assert_allclose(acf, [0.8, 0.64, 0.512], atol=0.06)
    white = _ar1_cohort(0.0, seed=1)
    assert AutocorrelationError.compute(_ar1_cohort(0.8).arrays, white.arrays, "x") > 0.5
    assert (
        AutocorrelationError.compute(_ar1_cohort(0.8).arrays, _ar1_cohort(0.8, seed=2).arrays, "x")
        < 0.05
    )


def test_time_gap_similarity_catches_stretched_time():
    cohort = _ar1_cohort(0.5)
    events = cohort.events.assign(time=cohort.events["time"] * 2)
    stretched = Cohort(cohort.static, events, cohort.schema)
    assert TimeGapSimilarity.compute(cohort.arrays, cohort.arrays) == 1
    assert TimeGapSimilarity.compute(cohort.arrays, stretched.arrays) < 0.1
    assert TimeGapSimilarity.compute(cohort.arrays, stretched.arrays, "x") < 0.1


def test_observation_rate_and_mean_length_errors():
    assert ObservationRateError.compute(
        pd.Series([1, np.nan, 2, np.nan]), pd.Series([1, 2, 3, np.nan])
    ) == pytest.approx(0.25)
    assert MeanSequenceLengthError.compute(np.array([10, 10]), np.array([5, 5])) == 0.5


def test_discriminative_scores_tell_shifted_patients_apart(cohorts):
    holdout = cohorts["holdout"]
    events = holdout.events.assign(HR=holdout.events["HR"].clip(upper=150) + 40)
    shifted = Cohort(holdout.static, events, holdout.schema)
    boosted = DiscriminativeScore.compute_breakdown(
        patient_features(holdout), patient_features(shifted)
    )
    assert boosted["score"] > 0.45 and boosted["auroc"] > 0.95
    recurrent = GRUDiscriminativeScore.compute_breakdown(holdout, shifted)
    assert recurrent["score"] > 0.3 and recurrent["auroc"] > 0.9


def test_negative_controls_on_simulated_data(cohorts, report):
    holdout, synthetic = cohorts["holdout"], cohorts["synthetic"]
    reference = report.scores.groupby("metric")["value"].mean()

    def scores(control: Cohort) -> pd.Series:
        table = pd.DataFrame(fidelity_scores(holdout, control, gru=False))
        return table.groupby("metric")["value"].mean()

    shuffled = scores(controls.shuffle_values(synthetic))
    assert shuffled["StatisticMSAS"] < reference["StatisticMSAS"] - 0.1
    assert shuffled["acf_error"] > reference["acf_error"] + 0.1
    assert shuffled["discriminative_score"] > 0.3
    noisy = scores(controls.add_noise(synthetic))
    assert noisy["KSComplement"] < reference["KSComplement"] - 0.05
    assert noisy["InterRowMSAS"] < reference["InterRowMSAS"] - 0.05
    thinned = scores(controls.thin_observations(synthetic))
    assert thinned["MissingValueSimilarity"] < reference["MissingValueSimilarity"] - 0.05
    assert thinned["time_gap_similarity"] < reference["time_gap_similarity"] - 0.1
    redrawn = scores(controls.redraw_static(synthetic))
    assert redrawn["TVComplement"] < reference["TVComplement"] - 0.1


def test_tstr_fails_when_outcomes_are_shuffled(cohorts):
    holdout, synthetic = cohorts["holdout"], cohorts["synthetic"]
    outcome = "In-hospital_death"
    assert OutcomeAUROC.compute(synthetic, holdout, outcome) > 0.8
    assert (
        OutcomeAUROC.compute(controls.shuffle_outcome(synthetic, outcome), holdout, outcome) < 0.7
    )


def test_next_value_mae_grows_with_noise(cohorts):
    holdout, synthetic = cohorts["holdout"], cohorts["synthetic"]
    clean = NextValueMAE.compute(synthetic, holdout, "HR")
    assert NextValueMAE.compute(controls.add_noise(synthetic), holdout, "HR") > 1.3 * clean


def test_a_copy_of_the_training_patients_is_caught(cohorts):
    train, holdout = cohorts["train"], cohorts["holdout"]
    scores, _ = privacy_scores(holdout, train, train)
    values = {s.metric: s.value for s in scores}
    assert values["exact_copy_rate"] == 1
    assert values["membership_inference_auroc"] > 0.95
    assert values["dcr_ratio"] == 0 and values["nndr"] == 0
    assert values["DCROverfittingProtection"] < 0.5


def test_compact_observations_packs_each_patients_observations_to_the_left_in_time_order():
    long = pd.DataFrame(
        {
            "id": ["a", "a", "a", "a", "b", "b", "c"],
            "t": [0.0, 1.0, 2.0, 3.0, 0.5, 4.0, 1.0],
            "HR": [80.0, np.nan, 82.0, 85.0, np.nan, np.nan, 70.0],
            "Temp": [np.nan, 37.0, np.nan, np.nan, 36.5, 38.0, np.nan],
        }
    )
    cohort = Cohort.from_long(long, "id", "t")
    values, times = compact_observations(cohort.arrays, "HR")
    expected_values = [[80.0, 82.0, 85.0], [np.nan] * 3, [70.0, np.nan, np.nan]]
    expected_times = [[0.0, 2.0, 3.0], [np.nan] * 3, [1.0, np.nan, np.nan]]
    order = [list(cohort.ids).index(p) for p in "abc"]
    np.testing.assert_array_equal(values[order], expected_values)
    np.testing.assert_array_equal(times[order], expected_times)
    values, times = compact_observations(cohort.arrays, "Temp")
    np.testing.assert_array_equal(values[order], [[37.0, np.nan], [36.5, 38.0], [np.nan] * 2])
    np.testing.assert_array_equal(times[order], [[1.0, np.nan], [0.5, 4.0], [np.nan] * 2])


def test_patient_features_on_threads_are_the_same_and_leave_warning_filters_alone():
    long = pd.DataFrame(
        {
            "id": ["a", "a", "a", "b", "b", "c"],
            "t": [0.0, 1.0, 2.0, 0.5, 4.0, 1.0],
            "HR": [80.0, np.nan, 86.0, np.nan, np.nan, 70.0],
            "Temp": [np.nan, 37.0, np.nan, 36.5, 38.0, np.nan],
        }
    )
    small = Cohort.from_long(long, "id", "t")
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a patient without HR is NaN, not an empty-slice warning
        features = patient_features(small)
        threaded = patient_features(small, threads=4)
    pd.testing.assert_frame_equal(threaded, features, check_exact=True)
    assert warnings.filters == filters
    b, c = features.loc["b"], features.loc["c"]
    assert np.isnan(b["HR__mean"]) and np.isnan(b["HR__std"]) and b["HR__n_obs"] == 0
    assert c["HR__mean"] == 70.0 and np.isnan(c["HR__step"])
    assert features.loc["a", "HR__step"] == 6.0 and features.loc["b", "Temp__step"] == 1.5
    simulated = simulate_cohort(200, seed=3)
    pd.testing.assert_frame_equal(
        patient_features(simulated, threads=3), patient_features(simulated), check_exact=True
    )
