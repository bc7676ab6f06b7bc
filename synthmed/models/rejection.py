"""Discriminator rejection sampling: keep drafted patients in proportion to how real they look.

After a generator is fitted, a gradient-boosting classifier learns to tell its drafts from the
training patients on per-patient summary features
(:func:`~synthmed.evaluation.features.patient_features`). Its odds estimate the density ratio
``p_real(x) / p_model(x)``; keeping a draft with probability ``min(1, ratio / bound)`` turns the
model's distribution into the real one wherever the ratio is below the bound (Azadi et al., 2019,
"Discriminator Rejection Sampling"). The bound is set so that a chosen share of drafts is kept:
the lower the share, the closer to real and the slower the sampling.

An estimated ratio is not unbiased within groups of patients: drafts with more observations give
the classifier more to catch them by, so a plain filter kept too few of them (on PhysioNet's
hourly stays it cut the arterial pressures' observation rate by 0.06, against 0.02 before
filtering). The log ratio is therefore tilted by a linear term in the number of steps and each
variable's number of observations, fitted so that the kept drafts have the training patients'
mean counts (exponential tilting, as in entropy balancing), which holds every observation rate
where the training data have it.

Filters can be chained (:class:`FilterCascade`): each further stage is fitted on the drafts that
the stages before it keep, and estimates what their classifiers missed.

The classifier reads the real training patients, so the filter is not available under DP. It is
stored as plain arrays (:class:`BoostedTrees`), never pickled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from synthmed.cohort import Cohort
from synthmed.evaluation.features import patient_features, without_empty_columns

#: Most training patients the classifier reads (the real cohort is subsampled above it).
FILTER_MAX_PATIENTS = 10_000
#: Each leaf of a filter's trees holds at least this share of the real patients' count (and
#: scikit-learn's default of 20 rows). With small leaves the trees learnt single training
#: patients, and a cascade kept drafts that resemble them: on PhysioNet's hourly stays three
#: stages brought SDMetrics' DCROverfittingProtection from 0.97 to 0.85 with leaves of 20, and
#: left it at 0.996 with leaves of 200 (5 % of 4,000 patients).
MIN_LEAF_SHARE = 0.05
#: Rounds of drafting before a patient keeps its last draft whatever the filter says.
MAX_ROUNDS = 20
#: Rows the trees are evaluated on at once (bounds the memory of the gathers).
_PREDICT_ROWS = 8192
_LARGEST = np.finfo(np.float64).max
_NODE_FIELDS = ("feature", "threshold", "missing_left", "left", "right", "leaf", "value")


@dataclasses.dataclass
class BoostedTrees:
    """A binary gradient-boosting classifier as padded node arrays, ``[n_trees, n_nodes]`` each.

    A row goes left at a node when its feature is at most the threshold, or when it is missing
    and the node sends missing values left, as scikit-learn's ``HistGradientBoostingClassifier``
    decides; the logit is the baseline plus the sum of the leaves reached. ``depth``, the
    deepest leaf's, is recorded in model files (prediction walks each row to its own leaves).
    """

    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray
    value: np.ndarray
    baseline: float
    depth: int

    @classmethod
    def from_sklearn(cls, model: HistGradientBoostingClassifier) -> BoostedTrees:
        """Export a fitted binary ``HistGradientBoostingClassifier`` on numeric features."""
        if model.n_trees_per_iteration_ != 1:
            raise ValueError("only a binary classifier can be exported")
        nodes = [predictors[0].nodes for predictors in model._predictors]
        if any(n["is_categorical"].any() for n in nodes):
            raise ValueError("only numeric features can be exported")
        width = max(len(n) for n in nodes)
        shape = (len(nodes), width)
        # Padding nodes are leaves worth 0 that no row reaches.
        arrays = {
            "feature": np.zeros(shape, np.int64),
            "threshold": np.zeros(shape, np.float64),
            "missing_left": np.zeros(shape, bool),
            "left": np.zeros(shape, np.int64),
            "right": np.zeros(shape, np.int64),
            "leaf": np.ones(shape, bool),
            "value": np.zeros(shape, np.float64),
        }
        sources = {
            "feature": "feature_idx",
            "threshold": "num_threshold",
            "missing_left": "missing_go_to_left",
            "left": "left",
            "right": "right",
        }
        for t, n in enumerate(nodes):
            for name, source in sources.items():
                arrays[name][t, : len(n)] = n[source]
            arrays["leaf"][t, : len(n)] = n["is_leaf"].astype(bool)
            arrays["value"][t, : len(n)] = n["value"]
        depth = max(int(n["depth"].max()) for n in nodes)
        return cls(**arrays, baseline=float(np.ravel(model._baseline_prediction)[0]), depth=depth)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """The logit of the positive class for each row of ``x`` (``[n, n_features]``).

        Blocks of rows are scored in parallel on as many threads as torch uses (numpy releases
        the GIL in the gathers and comparisons that do the work); each row's logit is the same
        whatever the blocks."""
        x = np.asarray(x, dtype=np.float64)
        n_trees, width = self.value.shape
        n_features = x.shape[1]
        # Each row is read in two copies: in the first a missing value is +inf, so it goes
        # right at every split, in the second -inf, so it goes left; a node reads the copy its
        # missing values follow. Recorded infinities become the largest float and thresholds
        # of +inf (scikit-learn's split of the missing values from all others) the same, so
        # every comparison of a present value decides as before.
        column = (self.feature + n_features * self.missing_left).ravel()
        threshold = np.minimum(self.threshold, _LARGEST).ravel()
        roots = np.arange(n_trees) * width
        # A node's children side by side: the one taken is ``children[2 * node + go_left]``.
        children = np.stack([self.right + roots[:, None], self.left + roots[:, None]], -1).ravel()
        leaf, value = self.leaf.ravel(), self.value.ravel()

        def score(block: np.ndarray) -> np.ndarray:
            block = np.minimum(block, _LARGEST)
            missing = np.isnan(block)
            cells = np.hstack(
                [np.where(missing, np.inf, block), np.where(missing, -np.inf, block)]
            ).ravel()
            node = np.tile(roots, len(block))
            row_start = np.repeat(np.arange(len(block)) * (2 * n_features), n_trees)
            # Each (row, tree) pair walks down until it reaches a leaf, and only the pairs still
            # walking go on to the next level: the trees are lopsided (on PhysioNet 31 leaves,
            # depth 24, leaves 9 levels deep on average), so most pairs stop early.
            walking = np.flatnonzero(~leaf[node])
            while len(walking):
                at = node[walking]
                go_left = cells[row_start[walking] + column[at]] <= threshold[at]
                at = children[2 * at + go_left]
                node[walking] = at
                walking = walking[~leaf[at]]
            return self.baseline + value[node].reshape(len(block), n_trees).sum(axis=1)

        threads = max(1, torch.get_num_threads())
        rows = min(_PREDICT_ROWS, max(1, math.ceil(len(x) / threads)))
        blocks = [x[start : start + rows] for start in range(0, len(x), rows)]
        if threads == 1 or len(blocks) < 2:
            return np.concatenate([score(block) for block in blocks] or [np.empty(0)])
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(blocks))) as pool:
            return np.concatenate(list(pool.map(score, blocks)))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name).copy()) for name in _NODE_FIELDS}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], baseline: float, depth: int
    ) -> BoostedTrees:
        arrays = {name: tensors[name].numpy() for name in _NODE_FIELDS}
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1:
            raise ValueError(f"the tree arrays have different shapes: {sorted(shapes)}")
        return cls(**arrays, baseline=float(baseline), depth=int(depth))


class RejectionFilter:
    """The fitted filter: which features it reads, its trees and the bound on the log odds.

    A draft is kept with probability ``min(1, exp(logit + tilt - bound))``: the classifier's
    logit, plus the :class:`Tilt` of the draft's counts.
    """

    def __init__(
        self,
        columns: list[str],
        trees: BoostedTrees,
        tilt: Tilt,
        bound: float,
        acceptance: float,
    ) -> None:
        self.columns = list(columns)
        self.trees = trees
        self.tilt = tilt
        self.bound = float(bound)
        self.acceptance = float(acceptance)

    @classmethod
    def fit(
        cls,
        real: Cohort,
        drafts: Cohort,
        calibration: Cohort,
        acceptance: float,
        seed: int,
    ) -> RejectionFilter:
        """Train on ``real`` against ``drafts``; set the bound so that a share ``acceptance`` of
        the ``calibration`` drafts (drawn apart from ``drafts``) would be kept."""
        rng = np.random.default_rng(seed)
        real_features = patient_features(real)
        if len(real_features) > FILTER_MAX_PATIENTS:
            keep = np.sort(rng.choice(len(real_features), FILTER_MAX_PATIENTS, replace=False))
            real_features = real_features.iloc[keep]
        columns = list(real_features.columns)
        draft_features = patient_features(drafts)[columns]
        x = np.vstack([real_features.to_numpy(np.float64), draft_features.to_numpy(np.float64)])
        labels = np.r_[np.ones(len(real_features)), np.zeros(len(draft_features))]
        model = HistGradientBoostingClassifier(
            max_iter=300,
            early_stopping=True,
            min_samples_leaf=max(20, int(MIN_LEAF_SHARE * len(real_features))),
            random_state=int(rng.integers(2**31)),
        )
        model.fit(without_empty_columns(x), labels)
        trees = BoostedTrees.from_sklearn(model)
        counts = [c for c in columns if c == "n_steps" or c.endswith("__n_obs")]
        real_counts = real_features[counts].to_numpy(np.float64)
        tilt = Tilt(counts, real_counts.mean(axis=0), real_counts.std(axis=0))
        calibration_features = patient_features(calibration)
        # The classes' sizes shift every logit alike, so the bound absorbs them.
        logits = trees.decision_function(calibration_features[columns])
        bound = tilt.fit(logits, calibration_features, acceptance)
        return cls(columns, trees, tilt, bound, acceptance)

    def keep_probability(self, drafts: Cohort) -> np.ndarray:
        """The probability of keeping each patient of ``drafts``."""
        return self.keep_from_features(_draft_features(drafts))

    def keep_from_features(self, features: pd.DataFrame) -> np.ndarray:
        """:meth:`keep_probability` from the drafts' :func:`patient_features`."""
        logits = self.trees.decision_function(features[self.columns]) + self.tilt(features)
        return _keep_probability(logits, self.bound)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "columns": self.columns,
            "tilt_columns": self.tilt.columns,
            "bound": self.bound,
            "acceptance": self.acceptance,
            "baseline": self.trees.baseline,
            "depth": self.trees.depth,
        }
        tensors = self.trees.to_tensors()
        for name in ("center", "scale", "weights"):
            tensors[f"tilt_{name}"] = torch.from_numpy(getattr(self.tilt, name).copy())
        return config, tensors

    @classmethod
    def from_state(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> RejectionFilter:
        trees = BoostedTrees.from_tensors(tensors, config["baseline"], config["depth"])
        tilt = Tilt(
            config["tilt_columns"], tensors["tilt_center"].numpy(), tensors["tilt_scale"].numpy()
        )
        tilt.weights = tensors["tilt_weights"].numpy()
        if not len(tilt.center) == len(tilt.scale) == len(tilt.weights) == len(tilt.columns):
            raise ValueError("the tilt's arrays do not match its columns")
        return cls(config["columns"], trees, tilt, config["bound"], config["acceptance"])


class FilterCascade:
    """Rejection filters applied in turn, each fitted on the drafts that the ones before it kept.

    One classifier's odds estimate the density ratio only as well as its trees and its early
    stopping allow, so the drafts a single filter keeps are still told from real patients, by
    what it missed; lowering its share does not help, since the estimate, not the bound, is what
    falls short. A second filter, trained on the first one's kept drafts against the same real
    patients, estimates what is left of the ratio, as boosting fits the residual of the stages
    before it. A draft is kept with the product of the stages' probabilities, so about the
    product of their shares of drafts is kept.
    """

    def __init__(self, stages: list[RejectionFilter]) -> None:
        if not stages:
            raise ValueError("a filter cascade needs at least one stage")
        self.stages = list(stages)

    @property
    def acceptance(self) -> float:
        """The share of drafts the whole cascade keeps."""
        return math.prod(stage.acceptance for stage in self.stages)

    def keep_probability(self, drafts: Cohort) -> np.ndarray:
        """The probability of keeping each patient of ``drafts``: it passes every stage."""
        features = _draft_features(drafts)
        return np.prod([stage.keep_from_features(features) for stage in self.stages], axis=0)

    def passes(self, drafts: Cohort, uniform: np.ndarray) -> np.ndarray:
        """``uniform < keep_probability(drafts)``, computed stage by stage: a stage scores only
        the drafts whose uniform draw is still below the product of the stages before it (the
        others cannot pass whatever it says), so later stages score a share of the drafts."""
        features = _draft_features(drafts)
        keep = np.ones(len(features))
        open_rows = np.arange(len(features))
        for stage in self.stages:
            keep[open_rows] *= stage.keep_from_features(features.iloc[open_rows])
            open_rows = open_rows[uniform[open_rows] < keep[open_rows]]
            if not len(open_rows):
                break
        return uniform < keep

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        configs, tensors = [], {}
        for k, stage in enumerate(self.stages):
            config, stage_tensors = stage.to_state()
            configs.append(config)
            tensors.update({f"stage{k}.{name}": v for name, v in stage_tensors.items()})
        return {"stages": configs}, tensors

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FilterCascade:
        """Also reads the single filter that files written before cascades hold."""
        if "stages" not in config:
            return cls([RejectionFilter.from_state(config, tensors)])
        stages = []
        for k, stage_config in enumerate(config["stages"]):
            prefix = f"stage{k}."
            stage_tensors = {
                name[len(prefix) :]: v for name, v in tensors.items() if name.startswith(prefix)
            }
            stages.append(RejectionFilter.from_state(stage_config, stage_tensors))
        return cls(stages)


class Tilt:
    """A linear term ``weights . (stats - center) / scale`` added to the log ratio, with
    ``center`` the training patients' means of the ``columns`` (per-patient counts)."""

    iterations = 30

    def __init__(self, columns: list[str], center: np.ndarray, scale: np.ndarray) -> None:
        self.columns = list(columns)
        self.center = np.asarray(center, np.float64)
        self.scale = np.where(np.asarray(scale, np.float64) > 0, scale, 1.0)
        self.weights = np.zeros(len(self.columns))

    def _standardised(self, features: pd.DataFrame) -> np.ndarray:
        stats = features[self.columns].to_numpy(np.float64)
        return np.nan_to_num((stats - self.center) / self.scale)

    def __call__(self, features: pd.DataFrame) -> np.ndarray:
        return self._standardised(features) @ self.weights

    def fit(self, logits: np.ndarray, features: pd.DataFrame, acceptance: float) -> float:
        """Fit ``weights`` so that drafts kept from ``features`` (with classifier ``logits``)
        have mean standardised counts 0, the training mean; returns the bound that keeps
        ``acceptance`` of them. Damped Newton steps on the convex dual of that constraint, the
        bound re-solved at each step."""
        stats = self._standardised(features)
        ridge = 1e-6 * np.eye(len(self.columns))
        for _ in range(self.iterations):
            tilted = logits + stats @ self.weights
            bound = _bound_for_acceptance(tilted, acceptance)
            keep = _keep_probability(tilted, bound)
            keep /= keep.sum()
            mean = keep @ stats
            centred = stats - mean
            covariance = centred.T @ (centred * keep[:, None]) + ridge
            self.weights = self.weights - 0.7 * np.linalg.solve(covariance, mean)
        return _bound_for_acceptance(logits + stats @ self.weights, acceptance)


def _draft_features(drafts: Cohort) -> pd.DataFrame:
    """The drafts' :func:`patient_features`, on as many threads as torch uses."""
    return patient_features(drafts, threads=torch.get_num_threads())


def _keep_probability(logits: np.ndarray, bound: float) -> np.ndarray:
    """``min(1, exp(logits - bound))``: the rejection sampler's keep probability."""
    return np.exp(np.minimum(logits - bound, 0.0))


def _bound_for_acceptance(logits: np.ndarray, acceptance: float) -> float:
    """The bound b with ``mean(min(1, exp(logits - b))) == acceptance`` (bisection; the mean
    falls as b grows)."""
    low, high = float(logits.min()), float(logits.max()) - math.log(acceptance)
    for _ in range(100):
        middle = 0.5 * (low + high)
        if _keep_probability(logits, middle).mean() > acceptance:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclasses.dataclass
class Kept:
    """Which draft each patient kept: ``parts[k]`` is a drafted batch, ``choice[i]`` the
    ``(part, row)`` patient ``i`` kept; ``drafted`` counts every draft, ``forced`` the patients
    that kept their last draft after :data:`MAX_ROUNDS` rounds without one passing."""

    parts: list[Any]
    choice: np.ndarray
    drafted: int
    forced: int


def drafts_per_slot(acceptance: float) -> int:
    """Drafts each pending slot gets per round of :func:`draft_and_keep`."""
    return max(1, math.ceil(1.0 / acceptance))


def draft_and_keep(
    n: int,
    draft: Callable[[np.ndarray], Any],
    passes: Callable[[Any, np.ndarray], np.ndarray],
    uniform: Callable[[int], np.ndarray],
    acceptance: float,
) -> Kept:
    """Draft patients for ``n`` slots until each keeps one.

    ``draft(slots)`` generates one patient per entry of ``slots`` (a slot may repeat: each
    pending slot gets several drafts per round, about ``1 / acceptance``, so most slots finish in
    one round); a slot keeps its first draft that passes: ``passes(batch, uniform(k))`` says
    which drafts of a batch do (``uniform(k) < keep probability``).
    """
    copies = drafts_per_slot(acceptance)
    choice = np.full((n, 2), -1, dtype=np.int64)
    pending = np.arange(n)
    parts: list[Any] = []
    drafted = forced = 0
    for round_ in range(MAX_ROUNDS):
        slots = np.repeat(pending, copies)
        batch = draft(slots)
        drafted += len(slots)
        passed = passes(batch, uniform(len(slots)))
        if round_ == MAX_ROUNDS - 1:
            # The last draft of a slot that still has none passing is kept.
            last = np.r_[slots[1:] != slots[:-1], True]
            forced = int(len(pending) - len(np.unique(slots[passed])))
            passed |= last & ~np.isin(slots, slots[passed])
        # A slot's first passing draft: the first row of its run among the passing rows.
        rows = np.flatnonzero(passed)
        first = rows[np.r_[True, slots[rows[1:]] != slots[rows[:-1]]]] if len(rows) else rows
        choice[slots[first], 0] = len(parts)
        choice[slots[first], 1] = first
        parts.append(batch)
        pending = pending[choice[pending, 0] < 0]
        if not len(pending):
            break
    return Kept(parts, choice, drafted, forced)
