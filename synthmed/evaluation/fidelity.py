"""Fidelity: how closely the synthetic cohort resembles the real one.

SDMetrics supplies the per-column and per-pair scores (``KSComplement``, ``TVComplement``,
``MissingValueSimilarity``, ``CorrelationSimilarity``, ``SequenceLengthSimilarity``,
``StatisticMSAS``, ``InterRowMSAS``); this module adds what it lacks for irregular longitudinal
data (time gaps, autocorrelation, observation rates, mean length) and the discriminative scores
of :mod:`synthmed.evaluation.discrimination`.

How the SDMetrics metrics are applied:

- ``KSComplement``/``TVComplement``: every observed value of a numeric/categorical temporal
  variable (all event rows pooled), and every static column.
- ``MissingValueSimilarity``: missingness of each temporal variable over event rows and of each
  static column over patients.
- ``CorrelationSimilarity`` (Pearson): pairs of numeric temporal variables over the event rows in
  which both are observed, and pairs of numeric static columns over patients. Pairs with fewer
  than :data:`MIN_PAIR_ROWS` such rows in the real cohort are skipped; a synthetic cohort with
  fewer than 3 scores 0.
- Where the real cohort has values of a column and the synthetic cohort has none, the
  similarities of that column (marginal, MSAS, time gaps) are 0 instead of undefined.
- ``SequenceLengthSimilarity``: number of event rows per patient.
- ``StatisticMSAS`` (statistic ``mean``) and ``InterRowMSAS`` (lag 1): over each patient's
  observations of each numeric temporal variable.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from sdmetrics.column_pairs import CorrelationSimilarity, InterRowMSAS, StatisticMSAS
from sdmetrics.errors import ConstantInputError, IncomputableMetricError
from sdmetrics.goal import Goal
from sdmetrics.single_column import (
    KSComplement,
    MissingValueSimilarity,
    SequenceLengthSimilarity,
    TVComplement,
)

from synthmed.cohort import Cohort
from synthmed.encoding import SequenceArrays
from synthmed.evaluation.base import Metric, Score, goal_of
from synthmed.evaluation.discrimination import DiscriminativeScore, GRUDiscriminativeScore
from synthmed.evaluation.features import (
    compact_observations,
    numeric_variables,
    observation_gaps,
    patient_features,
)

#: Pairs of temporal variables observed together in fewer event rows are not correlated.
MIN_PAIR_ROWS = 30
#: Lags of :class:`AutocorrelationError`.
ACF_LAGS = (1, 2, 3)


class TimeGapSimilarity(Metric):
    """``KSComplement`` of the time gaps between consecutive steps (``variable=None``) or between
    consecutive observations of one variable: 1 when the sampling rhythms match, 0 when the
    synthetic cohort has no such gap but the real one has."""

    name = "time_gap_similarity"
    goal = Goal.MAXIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def compute(
        cls, real_data: SequenceArrays, synthetic_data: SequenceArrays, variable: str | None = None
    ) -> float:
        """KSComplement of the pooled gaps of the two cohorts' padded arrays."""
        return _ks_or_worst(
            observation_gaps(real_data, variable), observation_gaps(synthetic_data, variable)
        )


def autocorrelation(arrays: SequenceArrays, variable: str, lags=ACF_LAGS) -> np.ndarray:
    """Pooled within-patient autocorrelation of one variable's successive observations.

    Each patient's observations are centred on the patient's own mean; lag-k products and squares
    are summed over all patients before dividing, so patients weigh by their number of
    observations. NaN where no patient has two observations.
    """
    values, _ = compact_observations(arrays, variable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        centred = values - np.nanmean(values, axis=1, keepdims=True)
    denominator = np.nansum(centred**2)
    result = np.full(len(lags), np.nan)
    if denominator > 0:
        for i, lag in enumerate(lags):
            if lag < centred.shape[1]:
                result[i] = np.nansum(centred[:, :-lag] * centred[:, lag:]) / denominator
    return result


class AutocorrelationError(Metric):
    """Mean absolute difference of the within-patient autocorrelations at lags 1-3 of one
    variable's successive observations (see :func:`autocorrelation`); 0 is a perfect match.
    A synthetic cohort without successive observations counts as having no autocorrelation."""

    name = "acf_error"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 2.0

    @classmethod
    def compute(
        cls, real_data: SequenceArrays, synthetic_data: SequenceArrays, variable: str
    ) -> float:
        """The error for ``variable`` between two cohorts' padded arrays."""
        synthetic = np.nan_to_num(autocorrelation(synthetic_data, variable))
        return float(np.mean(np.abs(autocorrelation(real_data, variable) - synthetic)))


class ObservationRateError(Metric):
    """Absolute difference of the fraction of entries that are observed (event rows for a
    temporal variable, patients for a static column). It equals ``1 - MissingValueSimilarity``
    and is stated on its own because the generators' target is ``<= 0.05``."""

    name = "observation_rate_error"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def compute(cls, real_data: pd.Series, synthetic_data: pd.Series) -> float:
        """The error for one column of each cohort."""
        return float(abs(real_data.notna().mean() - synthetic_data.notna().mean()))


class MeanSequenceLengthError(Metric):
    """Relative error of the mean number of steps per patient: ``|mean_s - mean_r| / mean_r``."""

    name = "mean_sequence_length_error"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = np.inf

    @classmethod
    def compute(cls, real_data: np.ndarray, synthetic_data: np.ndarray) -> float:
        """The error between two arrays of sequence lengths."""
        real_mean = float(np.mean(real_data))
        if real_mean == 0:
            return np.nan
        return abs(float(np.mean(synthetic_data)) - real_mean) / real_mean


def _ks_or_worst(real: np.ndarray, synthetic: np.ndarray) -> float:
    """KSComplement, or 0 when only the real sample has values (nothing can match it)."""
    if len(real) and not len(synthetic):
        return 0.0
    return KSComplement.compute(real, synthetic)


def _similarity(metric: type, real: pd.Series, synthetic: pd.Series) -> float:
    """An SDMetrics similarity of two columns; its minimum when only the real one has values."""
    if real.notna().any() and not synthetic.notna().any():
        return float(metric.min_value)
    return _safely(metric.compute, real, synthetic)


def _safely(compute: Callable[..., float], *args, **kwargs) -> float:
    """A metric's value, NaN where SDMetrics says it cannot be computed on these data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(compute(*args, **kwargs))
        except (ConstantInputError, IncomputableMetricError):
            return np.nan


def _observed(cohort: Cohort, variable: str) -> tuple[pd.Series, pd.Series]:
    rows = cohort.events[variable].notna()
    events = cohort.events.loc[rows]
    return events[cohort.id_column].reset_index(drop=True), events[variable].reset_index(drop=True)


def _column_scores(real: Cohort, synthetic: Cohort) -> list[Score]:
    scores = []
    for variable in real.variables:
        r, s = real.events[variable], synthetic.events[variable]
        marginal = KSComplement if real.schema[variable].kind == "numeric" else TVComplement
        scores.append(_score(marginal, variable, _similarity(marginal, r, s)))
        for metric in (MissingValueSimilarity, ObservationRateError):
            scores.append(_score(metric, variable, _safely(metric.compute, r, s)))
        scores.append(
            _score(
                TimeGapSimilarity,
                variable,
                _safely(TimeGapSimilarity.compute, real.arrays, synthetic.arrays, variable),
            )
        )
    for column in real.static_columns:
        r, s = real.static[column], synthetic.static[column]
        marginal = KSComplement if real.schema[column].kind == "numeric" else TVComplement
        scores.append(_score(marginal, column, _similarity(marginal, r, s)))
        for metric in (MissingValueSimilarity, ObservationRateError):
            scores.append(_score(metric, column, _safely(metric.compute, r, s)))
    return scores


def _sequence_scores(real: Cohort, synthetic: Cohort) -> list[Score]:
    scores = []
    for variable in numeric_variables(real):
        r, s = _observed(real, variable), _observed(synthetic, variable)
        for metric in (StatisticMSAS, InterRowMSAS):
            value = 0.0 if len(r[1]) and not len(s[1]) else _safely(metric.compute, r, s)
            scores.append(_score(metric, variable, value))
        scores.append(
            _score(
                AutocorrelationError,
                variable,
                _safely(AutocorrelationError.compute, real.arrays, synthetic.arrays, variable),
            )
        )
    scores += [
        _score(
            SequenceLengthSimilarity,
            None,
            _safely(
                SequenceLengthSimilarity.compute,
                real.events[real.id_column],
                synthetic.events[synthetic.id_column],
            ),
        ),
        _score(
            TimeGapSimilarity,
            None,
            _safely(TimeGapSimilarity.compute, real.arrays, synthetic.arrays),
        ),
        _score(
            MeanSequenceLengthError,
            None,
            MeanSequenceLengthError.compute(real.arrays.lengths, synthetic.arrays.lengths),
        ),
    ]
    return scores


def _correlation_scores(real: Cohort, synthetic: Cohort) -> list[Score]:
    numeric_static = [c for c in real.static_columns if real.schema[c].kind == "numeric"]
    tables = [
        (numeric_variables(real), real.events, synthetic.events),
        (numeric_static, real.static, synthetic.static),
    ]
    scores = []
    for columns, r, s in tables:
        for a, b in itertools.combinations(columns, 2):
            r_pair, s_pair = r[[a, b]].dropna(), s[[a, b]].dropna()
            if len(r_pair) < MIN_PAIR_ROWS:
                continue
            value = (
                _safely(CorrelationSimilarity.compute, r_pair, s_pair)
                if len(s_pair) > 2
                else CorrelationSimilarity.min_value
            )
            scores.append(_score(CorrelationSimilarity, f"{a}|{b}", value))
    return scores


def _discriminative_scores(real: Cohort, synthetic: Cohort, seed: int, gru: bool) -> list[Score]:
    boosted = DiscriminativeScore.compute_breakdown(
        patient_features(real), patient_features(synthetic), seed
    )
    scores = [
        _score(DiscriminativeScore, None, boosted["score"]),
        Score("fidelity", "discriminative_auroc", None, boosted["auroc"], "minimize"),
    ]
    if gru:
        recurrent = GRUDiscriminativeScore.compute_breakdown(real, synthetic, seed)
        scores += [
            _score(GRUDiscriminativeScore, None, recurrent["score"]),
            Score("fidelity", "discriminative_auroc_gru", None, recurrent["auroc"], "minimize"),
        ]
    return scores


def _score(metric: type, variable: str | None, value: float) -> Score:
    name = metric.name if issubclass(metric, Metric) else metric.__name__
    return Score("fidelity", name, variable, value, goal_of(metric))


def fidelity_scores(
    real: Cohort, synthetic: Cohort, seed: int = 0, gru: bool = True
) -> list[Score]:
    """Every fidelity score of ``synthetic`` against ``real`` (cohorts with the same schema).

    SDMetrics metrics keep their class name as metric name; ours use their ``name``. Set
    ``gru=False`` to skip the recurrent discriminator (the slowest metric).
    """
    return [
        *_column_scores(real, synthetic),
        *_sequence_scores(real, synthetic),
        *_correlation_scores(real, synthetic),
        *_discriminative_scores(real, synthetic, seed, gru),
    ]
