"""Discriminative scores: how well a classifier tells real from synthetic patients.

Both classifiers see the same number of real and synthetic patients (the larger cohort is
subsampled, seeded), are trained on patient-level stratified folds and scored out of fold, so
chance is exactly 0.5. The score is ``|accuracy - 0.5|`` (0: indistinguishable, 0.5: always told
apart); the AUROC of the out-of-fold probabilities is reported next to it.

- :class:`DiscriminativeScore`: gradient boosting on per-patient summary features
  (:func:`~synthmed.evaluation.features.patient_features`), 5 folds.
- :class:`GRUDiscriminativeScore`: a GRU over the padded sequences (values, observation masks
  and time gaps) joined with the static attributes, 3 folds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sdmetrics.goal import Goal
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from synthmed.cohort import Cohort
from synthmed.evaluation.base import Metric
from synthmed.evaluation.features import standardise, static_matrix, without_empty_columns

#: Most patients per side the boosted discriminator uses (subsampled, seeded, above it).
BOOSTED_MAX_PATIENTS = 5000
#: Most patients per side the GRU discriminator uses.
GRU_MAX_PATIENTS = 1000
#: The GRU reads at most this many first steps of each sequence (the length is a static input).
GRU_MAX_STEPS = 128


def _balanced_positions(
    n_real: int, n_synthetic: int, cap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    size = min(n_real, n_synthetic, cap)
    return (
        np.sort(rng.choice(n_real, size, replace=False)),
        np.sort(rng.choice(n_synthetic, size, replace=False)),
    )


def _breakdown(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    accuracy = float(np.mean((probabilities > 0.5) == labels))
    return {
        "score": abs(accuracy - 0.5),
        "accuracy": accuracy,
        "auroc": float(roc_auc_score(labels, probabilities)),
    }


class DiscriminativeScore(Metric):
    """``|accuracy - 0.5|`` of gradient boosting telling real from synthetic patients.

    The classifier is scikit-learn's ``HistGradientBoostingClassifier`` (200 trees of at most 15
    leaves, learning rate 0.1, L2 1.0) on per-patient summary features; accuracy and AUROC are
    computed on 5 patient-level out-of-fold predictions.
    """

    name = "discriminative_score"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 0.5

    @classmethod
    def compute_breakdown(
        cls, real_data: pd.DataFrame, synthetic_data: pd.DataFrame, seed: int = 0
    ) -> dict[str, float]:
        """Score, accuracy and AUROC for two tables of per-patient features (same columns)."""
        rng = np.random.default_rng(seed)
        real_rows, synthetic_rows = _balanced_positions(
            len(real_data), len(synthetic_data), BOOSTED_MAX_PATIENTS, rng
        )
        x = np.vstack(
            [
                real_data.to_numpy(dtype=np.float64)[real_rows],
                synthetic_data[real_data.columns].to_numpy(dtype=np.float64)[synthetic_rows],
            ]
        )
        labels = np.repeat([0, 1], len(real_rows))
        probabilities = np.zeros(len(labels))
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        for fit_rows, test_rows in folds.split(x, labels):
            model = HistGradientBoostingClassifier(
                max_iter=200,
                learning_rate=0.1,
                max_leaf_nodes=15,
                l2_regularization=1.0,
                early_stopping=False,
                random_state=seed,
            )
            model.fit(without_empty_columns(x[fit_rows]), labels[fit_rows])
            probabilities[test_rows] = model.predict_proba(x[test_rows])[:, 1]
        return _breakdown(labels, probabilities)

    @classmethod
    def compute(cls, real_data: pd.DataFrame, synthetic_data: pd.DataFrame, seed: int = 0) -> float:
        """``|accuracy - 0.5|`` for two tables of per-patient features."""
        return cls.compute_breakdown(real_data, synthetic_data, seed)["score"]


def _sequence_inputs(
    cohorts: tuple[Cohort, Cohort], positions: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step inputs ``[n, T, 2V+1]``, static inputs ``[n, S]`` and lengths ``[n]`` of the
    chosen patients of both cohorts, scaled by the pooled statistics of the two."""
    steps = min(GRU_MAX_STEPS, max(c.arrays.max_length for c in cohorts))
    variables = cohorts[0].arrays.variables
    parts = []
    for cohort, rows in zip(cohorts, positions, strict=True):
        arrays = cohort.arrays
        width = min(steps, arrays.max_length)
        pad = ((0, 0), (0, steps - width))
        order = [arrays.variables.index(v) for v in variables]
        values = np.pad(
            arrays.values[rows, :width][:, :, order].astype(np.float64),
            (*pad, (0, 0)),
            constant_values=np.nan,
        )
        gaps = np.pad(np.log1p(np.maximum(arrays.gaps[rows, :width], 0.0)), pad)
        static = static_matrix(cohort).iloc[rows]
        static.insert(0, "log_length", np.log1p(arrays.lengths[rows]))
        parts.append((values, gaps, np.minimum(arrays.lengths[rows], steps), static))
    values = np.concatenate([p[0] for p in parts])
    observed = ~np.isnan(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nan_to_num(np.nanmean(values, axis=(0, 1)))
        scale = np.nan_to_num(np.nanstd(values, axis=(0, 1)))
    scale = np.where(scale > 0, scale, 1.0)
    values = np.where(observed, (values - mean) / scale, 0.0)
    gaps = np.concatenate([p[1] for p in parts])
    lengths = np.concatenate([p[2] for p in parts])
    inside = np.arange(steps)[None, :] < lengths[:, None]
    gap_scale = gaps[inside].std() if inside.any() and gaps[inside].std() > 0 else 1.0
    gaps = np.where(inside, (gaps - gaps[inside].mean()) / gap_scale, 0.0)
    sequences = np.concatenate([values, observed, gaps[:, :, None]], axis=2)
    static = pd.concat([p[3] for p in parts])
    (static_inputs,) = standardise(static)
    return sequences.astype(np.float32), static_inputs.astype(np.float32), lengths


class GRUDiscriminativeScore(Metric):
    """``|accuracy - 0.5|`` of a recurrent classifier telling real from synthetic patients.

    A one-layer GRU (32 units) reads each patient's first :data:`GRU_MAX_STEPS` steps (scaled
    values with 0 where unobserved, the observation mask, the log time gap); its last state joins
    the scaled static attributes and log length in a small MLP. Trained with Adam (lr 3e-3,
    batch 64, 12 epochs) on 3 patient-level folds; accuracy and AUROC are out of fold.
    """

    name = "discriminative_score_gru"
    goal = Goal.MINIMIZE
    min_value = 0.0
    max_value = 0.5

    @classmethod
    def compute_breakdown(
        cls, real_data: Cohort, synthetic_data: Cohort, seed: int = 0
    ) -> dict[str, float]:
        """Score, accuracy and AUROC for two cohorts with the same schema."""
        import torch

        rng = np.random.default_rng(seed)
        positions = _balanced_positions(
            real_data.n_patients, synthetic_data.n_patients, GRU_MAX_PATIENTS, rng
        )
        sequences, static, lengths = _sequence_inputs((real_data, synthetic_data), positions)
        labels = np.repeat([0, 1], len(positions[0]))
        probabilities = np.zeros(len(labels))
        folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
        for fit_rows, test_rows in folds.split(static, labels):
            torch.manual_seed(seed)
            model = _GRUClassifier(sequences.shape[2], static.shape[1])
            model.fit(
                sequences[fit_rows], static[fit_rows], lengths[fit_rows], labels[fit_rows], rng
            )
            probabilities[test_rows] = model.predict(
                sequences[test_rows], static[test_rows], lengths[test_rows]
            )
        return _breakdown(labels, probabilities)

    @classmethod
    def compute(cls, real_data: Cohort, synthetic_data: Cohort, seed: int = 0) -> float:
        """``|accuracy - 0.5|`` for two cohorts with the same schema."""
        return cls.compute_breakdown(real_data, synthetic_data, seed)["score"]


class _GRUClassifier:
    """The GRU of :class:`GRUDiscriminativeScore`, with its training loop.

    Batches hold patients of similar length (sorted by length with random jitter each epoch), so
    little time is spent on padding; the state at each patient's last step is read out.
    """

    hidden = 32
    epochs = 12
    batch_size = 64
    learning_rate = 3e-3

    def __init__(self, n_inputs: int, n_static: int) -> None:
        from torch import nn

        self.gru = nn.GRU(n_inputs, self.hidden, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(self.hidden + n_static, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)
        )

    def _logits(self, sequences, static, lengths):
        import torch

        width = max(int(lengths.max()), 1)
        outputs, _ = self.gru(sequences[:, :width])
        last = outputs[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)]
        return self.head(torch.cat([last, static], dim=1)).squeeze(1)

    def _batches(self, lengths: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
        jitter = rng.uniform(0, 8, len(lengths)) if rng is not None else 0.0
        order = np.argsort(lengths + jitter, kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if rng is not None:
            rng.shuffle(batches)
        return batches

    def fit(self, sequences, static, lengths, labels, rng: np.random.Generator) -> None:
        import torch

        parameters = [*self.gru.parameters(), *self.head.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=self.learning_rate)
        loss_function = torch.nn.BCEWithLogitsLoss()
        data = [torch.as_tensor(a) for a in (sequences, static, lengths, labels.astype(np.float32))]
        for _ in range(self.epochs):
            for batch in self._batches(lengths, rng):
                x, s, n, y = (d[torch.as_tensor(batch)] for d in data)
                optimiser.zero_grad()
                loss_function(self._logits(x, s, n), y).backward()
                optimiser.step()

    def predict(self, sequences, static, lengths) -> np.ndarray:
        import torch

        probabilities = np.zeros(len(lengths))
        data = [torch.as_tensor(a) for a in (sequences, static, lengths)]
        with torch.no_grad():
            for batch in self._batches(lengths, None):
                x, s, n = (d[torch.as_tensor(batch)] for d in data)
                probabilities[batch] = torch.sigmoid(self._logits(x, s, n)).numpy()
        return probabilities
