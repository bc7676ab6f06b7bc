"""The evaluation suite on real data: PhysioNet/CinC Challenge 2012.

Set A is the real data (1,000 training patients, 600 holdout patients); 600 patients of set B
play the synthetic cohort. Set B comes from the same population, so it must score near the
real-vs-real ceiling, and every negative control of :mod:`synthmed.evaluation.controls` must
score clearly worse than set B on the metrics listed for it in :mod:`synthmed.evaluation`:

========================== =============================================================
control                    metrics that must catch it (worse than set B by the margin)
========================== =============================================================
shuffle_values             CorrelationSimilarity (strong pairs), StatisticMSAS,
                           InterRowMSAS, acf_error, discriminative scores,
                           next_value_mae_ratio
add_noise                  KSComplement, CorrelationSimilarity (strong pairs),
                           StatisticMSAS, InterRowMSAS, acf_error, discriminative scores,
                           next_value_mae_ratio
thin_observations          MissingValueSimilarity, observation_rate_error,
                           SequenceLengthSimilarity, mean_sequence_length_error,
                           time_gap_similarity, acf_error, discriminative scores
redraw_static              TVComplement
shuffle_outcome            tstr_auroc
copy of the training set   exact_copy_rate, membership_inference_auroc, dcr_ratio, nndr,
                           DCROverfittingProtection
========================== =============================================================
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sdmetrics.single_column import TVComplement

from synthmed import Cohort
from synthmed.datasets import load_physionet2012
from synthmed.evaluation import Report, controls, evaluate
from synthmed.evaluation.base import limit_threads
from synthmed.evaluation.fidelity import fidelity_scores
from synthmed.evaluation.privacy import privacy_scores
from synthmed.evaluation.utility import NextValueMAE, OutcomeAUROC

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

PANEL = ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose"]
OUTCOME = "In-hospital_death"

#: metric -> (controls that must be caught, margin by which the control is worse than set B).
CAUGHT_BY = {
    "KSComplement": (("noise",), 0.03),
    "MissingValueSimilarity": (("thin",), 0.03),
    "observation_rate_error": (("thin",), 0.03),
    "strong_correlations": (("shuffle", "noise"), 0.05),
    "SequenceLengthSimilarity": (("thin",), 0.1),
    "mean_sequence_length_error": (("thin",), 0.05),
    "StatisticMSAS": (("shuffle", "noise"), 0.02),
    "InterRowMSAS": (("shuffle", "noise"), 0.05),
    "time_gap_similarity": (("thin",), 0.1),
    "acf_error": (("shuffle", "noise", "thin"), 0.05),
    "discriminative_score": (("shuffle", "noise", "thin"), 0.3),
    "discriminative_score_gru": (("shuffle", "noise", "thin"), 0.3),
}
CONTROLS = {
    "shuffle": controls.shuffle_values,
    "noise": controls.add_noise,
    "thin": controls.thin_observations,
}


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def cohorts(physionet_dir: Path) -> dict[str, Cohort]:
    set_a = load_physionet2012(physionet_dir / "set-a.tar.gz", variables=PANEL)
    set_b = load_physionet2012(physionet_dir / "set-b.tar.gz", variables=PANEL)
    rng = np.random.default_rng(0)
    a_ids, b_ids = rng.permutation(set_a.ids), rng.permutation(set_b.ids)
    return {
        "train": set_a.subset(a_ids[:1000]),
        "holdout": set_a.subset(a_ids[1000:1600]),
        "synthetic": set_b.subset(b_ids[:600]),
    }


@pytest.fixture(scope="module")
def report(cohorts) -> Report:
    return evaluate(cohorts["holdout"], cohorts["synthetic"], cohorts["train"])


def _strong_pairs(cohort: Cohort) -> list[str]:
    corr = cohort.events[PANEL].corr()
    return [f"{a}|{b}" for a, b in itertools.combinations(PANEL, 2) if abs(corr.loc[a, b]) >= 0.5]


def _by_metric(scores: pd.DataFrame, column: str, strong: list[str]) -> pd.Series:
    means = scores.groupby("metric")[column].mean()
    pairs = scores[(scores["metric"] == "CorrelationSimilarity") & scores["variable"].isin(strong)]
    means["strong_correlations"] = pairs[column].mean()
    return means


def test_set_b_scores_near_the_real_vs_real_ceiling(report, cohorts):
    scores = report.scores
    fidelity = scores[scores["section"] == "fidelity"]
    value = _by_metric(fidelity, "value", _strong_pairs(cohorts["holdout"]))
    ceiling = _by_metric(fidelity, "ceiling", _strong_pairs(cohorts["holdout"]))
    for metric in CAUGHT_BY:
        worse = value[metric] - ceiling[metric]
        if fidelity.loc[fidelity["metric"] == metric, "goal"].eq("maximize").any() or (
            metric == "strong_correlations"
        ):
            worse = -worse
        assert worse < 0.03, (metric, value[metric], ceiling[metric])
    assert value["discriminative_score"] < 0.05
    assert value["discriminative_score_gru"] < 0.08
    summary = report.summary()
    assert summary["fidelity"] > 0.9 and summary["privacy"] > 0.9 and summary["utility"] > 0.8
    privacy = scores[scores["section"] == "privacy"].set_index("metric")["value"]
    assert privacy["exact_copy_rate"] == 0
    assert abs(privacy["membership_inference_auroc"] - 0.5) < 0.06
    assert 0.8 < privacy["dcr_ratio"] < 1.25


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_negative_control_is_caught(control, report, cohorts):
    holdout = cohorts["holdout"]
    damaged = CONTROLS[control](cohorts["synthetic"])
    scores = pd.DataFrame(fidelity_scores(holdout, damaged))
    strong = _strong_pairs(holdout)
    reference = _by_metric(report.scores, "value", strong)
    got = _by_metric(scores, "value", strong)
    goals = scores.groupby("metric")["goal"].first()
    for metric, (caught_by, margin) in CAUGHT_BY.items():
        if control not in caught_by:
            continue
        maximize = metric == "strong_correlations" or goals[metric] == "maximize"
        worse = reference[metric] - got[metric] if maximize else got[metric] - reference[metric]
        assert worse > margin, (metric, reference[metric], got[metric])


@pytest.mark.parametrize("control", ["shuffle", "noise"])
def test_forecasting_utility_catches_damaged_values(control, cohorts):
    train, holdout = cohorts["train"], cohorts["holdout"]
    damaged = CONTROLS[control](cohorts["synthetic"])
    for variable in ("HR", "Temp"):
        ratio = NextValueMAE.compute(damaged, holdout, variable) / NextValueMAE.compute(
            train, holdout, variable
        )
        assert ratio > 1.3, (variable, ratio)


def test_outcome_utility_catches_shuffled_labels(report, cohorts):
    trtr = report.scores.set_index("metric").loc["trtr_auroc", "value"]
    shuffled = controls.shuffle_outcome(cohorts["synthetic"], OUTCOME)
    assert OutcomeAUROC.compute(shuffled, cohorts["holdout"], OUTCOME) < trtr - 0.15


def test_redrawn_static_categories_are_caught(report, cohorts):
    redrawn = controls.redraw_static(cohorts["synthetic"])
    tv = report.scores[report.scores["metric"] == "TVComplement"].set_index("variable")["value"]
    for column in ("ICUType", OUTCOME):
        got = TVComplement.compute(cohorts["holdout"].static[column], redrawn.static[column])
        assert got < tv[column] - 0.05


def test_a_copy_of_the_training_patients_is_caught(cohorts):
    train, holdout = cohorts["train"], cohorts["holdout"]
    scores, _ = privacy_scores(holdout, train, train)
    values = {s.metric: s.value for s in scores}
    assert values["exact_copy_rate"] == 1
    assert values["membership_inference_auroc"] > 0.99
    assert values["dcr_ratio"] < 0.05 and values["nndr"] < 0.05
    assert values["DCROverfittingProtection"] < 0.8
