"""Privacy: is the synthetic cohort closer to the training patients than unseen patients are?

Every patient becomes a vector of per-patient summary features
(:func:`~synthmed.evaluation.features.patient_features`, static columns and outcomes included),
standardised by the training cohort's means and standard deviations (missing entries at the
mean). Euclidean nearest-neighbour distances between these vectors give:

- ``dcr_ratio`` (:class:`DCRRatio`): median distance to the closest training record of the
  synthetic patients over that of the holdout patients; about 1 or above is safe, well below 1
  means the generator stays close to its training patients.
- ``nndr`` (:class:`NNDR`): median ratio of the distances to the closest and second-closest
  training record of the synthetic patients; near 0 means synthetic patients sit on single
  training patients (its ceiling is the holdout's own median).
- ``exact_copy_rate`` (:class:`ExactCopyRate`): fraction of synthetic patients whose vector
  equals a training patient's (distance below :data:`EXACT_COPY_TOLERANCE`).
- ``membership_inference_auroc`` (:class:`MembershipInferenceAUROC`): an attacker who scores
  each real patient by minus its distance to the closest synthetic patient, to tell training
  members from holdout patients; 0.5 is no better than chance, 1 is full disclosure.

SDMetrics' ``DCROverfittingProtection`` (share of synthetic patients closer to the training
set than to the holdout, as a score: 1 is no overfitting) is reported as well. Its pairwise
computation runs in pandas and is slow, so it gets a compact vector (each variable's per-patient
mean and the static columns) of at most :data:`SDMETRICS_MAX_SYNTHETIC` synthetic patients and
as many training as holdout patients (the smaller count, at most :data:`SDMETRICS_MAX_REAL`;
seeded subsamples). Subsampling the training set weakens it: a synthetic copy of a training
patient left out of the subsample is not seen as one.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
from sdmetrics.goal import Goal
from sdmetrics.single_table import DCROverfittingProtection
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from synthmed.cohort import Cohort
from synthmed.evaluation.base import Metric, Score, goal_of
from synthmed.evaluation.features import patient_features, standardise

#: Standardised distance under which a synthetic patient counts as an exact copy.
EXACT_COPY_TOLERANCE = 1e-6
#: Most synthetic patients passed to SDMetrics' DCROverfittingProtection.
SDMETRICS_MAX_SYNTHETIC = 500
#: Most training (and as many holdout) patients passed to SDMetrics' DCROverfittingProtection.
SDMETRICS_MAX_REAL = 1000


@dataclasses.dataclass(frozen=True)
class NearestRecords:
    """Nearest-neighbour distances between standardised patient vectors.

    Attributes:
        synthetic_to_train: ``[n_synthetic, 2]`` distances to the closest two training patients.
        holdout_to_train: ``[n_holdout, 2]`` the same for the real holdout patients.
        train_to_synthetic: ``[n_train]`` distance of each training patient to the closest
            synthetic patient.
        holdout_to_synthetic: ``[n_holdout]`` the same for the holdout patients.
    """

    synthetic_to_train: np.ndarray
    holdout_to_train: np.ndarray
    train_to_synthetic: np.ndarray
    holdout_to_synthetic: np.ndarray

    @classmethod
    def compute(
        cls, train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame
    ) -> NearestRecords:
        """Distances between three tables of per-patient features with the same columns (the
        training table needs at least two rows)."""
        train_x, holdout_x, synthetic_x = standardise(train, holdout, synthetic)
        to_train = NearestNeighbors(n_neighbors=2).fit(train_x)
        to_synthetic = NearestNeighbors(n_neighbors=1).fit(synthetic_x)
        return cls(
            synthetic_to_train=to_train.kneighbors(synthetic_x)[0],
            holdout_to_train=to_train.kneighbors(holdout_x)[0],
            train_to_synthetic=to_synthetic.kneighbors(train_x)[0][:, 0],
            holdout_to_synthetic=to_synthetic.kneighbors(holdout_x)[0][:, 0],
        )


def _nndr(distances: np.ndarray) -> np.ndarray:
    closest, second = distances[:, 0], distances[:, 1]
    return np.divide(closest, second, out=np.zeros_like(closest), where=second > 0)


class _DistanceMetric(Metric):
    """A metric computed from :class:`NearestRecords` of three feature tables."""

    @classmethod
    def from_distances(cls, distances: NearestRecords) -> float:
        """The metric from precomputed distances (each subclass defines it)."""
        raise NotImplementedError

    @classmethod
    def compute(
        cls,
        real_training_data: pd.DataFrame,
        synthetic_data: pd.DataFrame,
        real_validation_data: pd.DataFrame,
    ) -> float:
        """The metric for per-patient feature tables, in SDMetrics' argument order."""
        return cls.from_distances(
            NearestRecords.compute(real_training_data, real_validation_data, synthetic_data)
        )


class DCRRatio(_DistanceMetric):
    """Median synthetic-to-train DCR over median holdout-to-train DCR (see module docstring)."""

    name = "dcr_ratio"
    goal = Goal.MAXIMIZE
    min_value = 0.0
    max_value = np.inf

    @classmethod
    def from_distances(cls, distances: NearestRecords) -> float:
        """The ratio of the medians (NaN when the holdout median is 0)."""
        reference = float(np.median(distances.holdout_to_train[:, 0]))
        if reference == 0:
            return np.nan
        return float(np.median(distances.synthetic_to_train[:, 0])) / reference


class NNDR(_DistanceMetric):
    """Median nearest-neighbour distance ratio of the synthetic patients to the training set."""

    name = "nndr"
    goal = Goal.MAXIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def from_distances(cls, distances: NearestRecords) -> float:
        """Median of closest / second-closest distance (0 for an exact copy)."""
        return float(np.median(_nndr(distances.synthetic_to_train)))


class ExactCopyRate(_DistanceMetric):
    """Fraction of synthetic patients identical to a training patient."""

    name = "exact_copy_rate"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def from_distances(cls, distances: NearestRecords) -> float:
        """Share of synthetic-to-train DCRs below :data:`EXACT_COPY_TOLERANCE`."""
        return float(np.mean(distances.synthetic_to_train[:, 0] < EXACT_COPY_TOLERANCE))


class MembershipInferenceAUROC(_DistanceMetric):
    """AUROC of the distance-to-closest-synthetic attack telling train from holdout patients."""

    name = "membership_inference_auroc"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 1.0

    @classmethod
    def from_distances(cls, distances: NearestRecords) -> float:
        """AUROC of ``-distance`` with members (train) as positives."""
        labels = np.r_[
            np.ones(len(distances.train_to_synthetic)),
            np.zeros(len(distances.holdout_to_synthetic)),
        ]
        scores = -np.r_[distances.train_to_synthetic, distances.holdout_to_synthetic]
        return float(roc_auc_score(labels, scores))


def _compact(features: pd.DataFrame) -> pd.DataFrame:
    return features[[c for c in features.columns if "__" not in c or c.endswith("__mean")]]


def _sdmetrics_dcr(
    train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, seed: int
) -> Score:
    rng = np.random.default_rng(seed)

    def sample(table: pd.DataFrame, size: int) -> pd.DataFrame:
        rows = np.sort(rng.choice(len(table), min(len(table), size), replace=False))
        return _compact(table).iloc[rows].reset_index(drop=True)

    real_size = min(len(train), len(holdout), SDMETRICS_MAX_REAL)
    tables = (
        sample(train, real_size),
        sample(holdout, real_size),
        sample(synthetic, SDMETRICS_MAX_SYNTHETIC),
    )
    train_x, holdout_x, synthetic_x = (
        pd.DataFrame(x, columns=tables[0].columns) for x in standardise(*tables)
    )
    metadata = {"columns": {c: {"sdtype": "numerical"} for c in train_x.columns}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = DCROverfittingProtection.compute(train_x, synthetic_x, holdout_x, metadata, None)
    return Score(
        "privacy", "DCROverfittingProtection", None, float(value), goal_of(DCROverfittingProtection)
    )


def privacy_scores(
    holdout: Cohort, synthetic: Cohort, train: Cohort, seed: int = 0
) -> tuple[list[Score], NearestRecords]:
    """The privacy scores and the distances behind them (kept for the report's histograms).

    ``ceiling`` holds the same quantity for the holdout in place of the synthetic cohort where
    that is meaningful (``nndr``: the holdout's own median NNDR; ``exact_copy_rate``: the share
    of holdout patients identical to a training patient).
    """
    features = [patient_features(c) for c in (train, holdout, synthetic)]
    distances = NearestRecords.compute(*features)
    holdout_copies = float(np.mean(distances.holdout_to_train[:, 0] < EXACT_COPY_TOLERANCE))
    holdout_nndr = float(np.median(_nndr(distances.holdout_to_train)))
    scores = [
        Score(
            "privacy",
            DCRRatio.name,
            None,
            DCRRatio.from_distances(distances),
            goal_of(DCRRatio),
            1.0,
        ),
        Score(
            "privacy", NNDR.name, None, NNDR.from_distances(distances), goal_of(NNDR), holdout_nndr
        ),
        Score(
            "privacy",
            ExactCopyRate.name,
            None,
            ExactCopyRate.from_distances(distances),
            goal_of(ExactCopyRate),
            holdout_copies,
        ),
        Score(
            "privacy",
            MembershipInferenceAUROC.name,
            None,
            MembershipInferenceAUROC.from_distances(distances),
            goal_of(MembershipInferenceAUROC),
        ),
        _sdmetrics_dcr(*features, seed),
    ]
    return scores, distances


def spent_budget(synthetic: Cohort) -> list[Score]:
    """``epsilon`` and ``delta`` rows when the synthetic cohort's metadata records them."""
    return [
        Score("privacy", key, None, float(synthetic.metadata[key]), "minimize")
        for key in ("epsilon", "delta")
        if synthetic.metadata.get(key) is not None
    ]
