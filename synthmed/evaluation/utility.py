"""Utility: does a model trained on synthetic data work on real patients?

Train-on-synthetic-test-on-real (TSTR) is compared with train-on-real-test-on-real (TRTR) for two
tasks, each with a fixed model so that only the training data differ:

- Outcome prediction (:class:`OutcomeAUROC`): the first binary outcome column of the schema
  from the per-patient summary features and the other static columns, by
  ``HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
  l2_regularization=1.0)``, scored by AUROC on the real holdout.
- Next-measurement forecasting (:class:`NextValueMAE`): each numeric variable's next observed
  value from the history before it (the variable's last value and the time since, the last
  value and time since of every other variable, the number of earlier observations, the time
  since admission and the non-outcome static columns) by
  ``HistGradientBoostingRegressor(max_iter=50, learning_rate=0.15, max_leaf_nodes=15)``
  (squared error: cheap to fit, and the same model on both sides keeps the ratio fair), scored
  by the mean absolute error on the real holdout. At most :data:`FORECAST_MAX_ROWS`
  observations (seeded) are used for training and for testing.

TRTR trains on ``train``. Without ``train``, the real cohort is split by patient into halves
(seeded, stratified by the outcome): TRTR trains on one, and both TSTR and TRTR are scored on the
other (noted in the report). Each side trains on all of its cohort, so sample a synthetic cohort
as large as the training cohort to compare like with like.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sdmetrics.goal import Goal
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import roc_auc_score

from synthmed.cohort import Cohort
from synthmed.evaluation.base import Metric, Score, goal_of
from synthmed.evaluation.features import (
    numeric_variables,
    patient_features,
    previous_observation,
    static_matrix,
    without_empty_columns,
)

#: Most target observations per variable used to train, and to test, a forecaster.
FORECAST_MAX_ROWS = 20_000


def outcome_column(cohort: Cohort) -> str | None:
    """The first binary outcome column of the cohort's schema, or None."""
    binary = [c for c in cohort.outcome_columns if cohort.schema[c].kind == "binary"]
    return binary[0] if binary else None


def _outcome_table(cohort: Cohort, outcome: str) -> tuple[pd.DataFrame, np.ndarray]:
    features = patient_features(cohort, exclude=cohort.outcome_columns)
    labels = static_matrix(cohort)[outcome].to_numpy()
    known = ~np.isnan(labels)
    return features.loc[known], labels[known].astype(np.int64)


class OutcomeAUROC(Metric):
    """AUROC on ``test_data`` of the fixed outcome model fitted on ``train_data``.

    A training cohort with a single outcome class yields a constant prediction (AUROC 0.5);
    a test cohort with a single class yields NaN.
    """

    name = "outcome_auroc"
    goal = Goal.MAXIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def compute(cls, train_data: Cohort, test_data: Cohort, outcome: str, seed: int = 0) -> float:
        """Fit on ``train_data``, score on ``test_data`` (cohorts with the same schema)."""
        x_fit, y_fit = _outcome_table(train_data, outcome)
        x_test, y_test = _outcome_table(test_data, outcome)
        if len(np.unique(y_test)) < 2:
            return np.nan
        if len(np.unique(y_fit)) < 2:
            return 0.5
        model = HistGradientBoostingClassifier(
            max_iter=200,
            learning_rate=0.05,
            max_leaf_nodes=15,
            l2_regularization=1.0,
            early_stopping=False,
            random_state=seed,
        )
        model.fit(without_empty_columns(x_fit.to_numpy()), y_fit)
        probabilities = model.predict_proba(x_test[x_fit.columns].to_numpy())[:, 1]
        return float(roc_auc_score(y_test, probabilities))


def next_value_table(
    cohort: Cohort, variable: str, max_rows: int = FORECAST_MAX_ROWS, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """Features and targets of the next-measurement task for one variable.

    One row per observation of ``variable`` that has an earlier observation of it in the same
    patient (at most ``max_rows``, drawn with ``seed``); features only use steps before it.
    """
    arrays = cohort.arrays
    j = arrays.variables.index(variable)
    previous = previous_observation(arrays)
    patients, steps = np.nonzero(arrays.mask[:, :, j] & (previous[:, :, j] >= 0))
    if len(patients) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(patients), max_rows, replace=False))
        patients, steps = patients[keep], steps[keep]
    now = arrays.times[patients, steps]
    earlier = np.cumsum(arrays.mask[:, :, j], axis=1)[patients, steps] - 1
    columns: dict[str, np.ndarray] = {"time": now, "n_earlier": earlier.astype(np.float64)}
    for k, name in enumerate(arrays.variables):
        before = previous[patients, steps, k]
        seen = before >= 0
        last = arrays.values[patients, np.maximum(before, 0), k].astype(np.float64)
        since = now - arrays.times[patients, np.maximum(before, 0)]
        columns[f"{name}__last"] = np.where(seen, last, np.nan)
        columns[f"{name}__since"] = np.where(seen, since, np.nan)
    static = static_matrix(cohort, exclude=cohort.outcome_columns)
    for name in static.columns:
        columns[name] = static[name].to_numpy()[patients]
    return pd.DataFrame(columns), arrays.values[patients, steps, j].astype(np.float64)


class NextValueMAE(Metric):
    """Mean absolute error on ``test_data`` of the fixed next-measurement forecaster of one
    variable fitted on ``train_data`` (NaN when either side has no target observation)."""

    name = "next_value_mae"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = np.inf

    @classmethod
    def compute(cls, train_data: Cohort, test_data: Cohort, variable: str, seed: int = 0) -> float:
        """Fit on ``train_data``, score on ``test_data`` (cohorts with the same schema)."""
        x_fit, y_fit = next_value_table(train_data, variable, seed=seed)
        x_test, y_test = next_value_table(test_data, variable, seed=seed)
        if len(y_fit) == 0 or len(y_test) == 0:
            return np.nan
        model = HistGradientBoostingRegressor(
            max_iter=50,
            learning_rate=0.15,
            max_leaf_nodes=15,
            early_stopping=False,
            random_state=seed,
        )
        model.fit(without_empty_columns(x_fit.to_numpy()), y_fit)
        predictions = model.predict(x_test[x_fit.columns].to_numpy())
        return float(np.mean(np.abs(predictions - y_test)))


def utility_scores(
    real: Cohort, synthetic: Cohort, train: Cohort | None = None, seed: int = 0
) -> tuple[list[Score], list[str]]:
    """TSTR and TRTR scores of both tasks, and notes on what was skipped or replaced.

    Rows: ``tstr_auroc``, ``trtr_auroc`` (variable: the outcome column); per numeric variable
    ``next_value_mae_tstr``, ``next_value_mae_trtr`` and ``next_value_mae_ratio`` (TSTR / TRTR);
    and ``next_value_mae_ratio`` over all variables (their mean, variable None).
    """
    notes = []
    if train is None:
        train, real = real.split(test_size=0.5, seed=seed)
        notes.append(
            "No training cohort: TRTR trained on a random half of the real patients; TSTR and "
            "TRTR were both scored on the other half."
        )
    scores = []
    outcome = outcome_column(real)
    if outcome is None:
        notes.append("Outcome prediction skipped: the schema has no binary outcome column.")
    else:
        maximize = goal_of(OutcomeAUROC)
        scores += [
            Score(
                "utility",
                "tstr_auroc",
                outcome,
                OutcomeAUROC.compute(synthetic, real, outcome, seed=seed),
                maximize,
            ),
            Score(
                "utility",
                "trtr_auroc",
                outcome,
                OutcomeAUROC.compute(train, real, outcome, seed=seed),
                maximize,
            ),
        ]
    ratios = []
    for variable in numeric_variables(real):
        tstr = NextValueMAE.compute(synthetic, real, variable, seed=seed)
        reference = NextValueMAE.compute(train, real, variable, seed=seed)
        ratio = tstr / reference if reference > 0 else np.nan
        if np.isnan(tstr) and not np.isnan(reference):
            notes.append(
                f"No TSTR forecaster for {variable}: no synthetic patient has two observations "
                "of it (counted as 0 in the utility summary)."
            )
        ratios.append(ratio)
        scores += [
            Score("utility", "next_value_mae_tstr", variable, tstr, "minimize"),
            Score("utility", "next_value_mae_trtr", variable, reference, "minimize"),
            Score("utility", "next_value_mae_ratio", variable, ratio, "minimize"),
        ]
    if ratios and not np.all(np.isnan(ratios)):
        scores.append(
            Score("utility", "next_value_mae_ratio", None, float(np.nanmean(ratios)), "minimize")
        )
    return scores, notes
