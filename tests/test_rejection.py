"""Discriminator rejection sampling: the exported trees, the bound, the drafting loop, and the
``rejection_sampling`` setting on every synthesizer (fit, sample, seeds, conditions, files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from test_cgan import TINY as TINY_CGAN
from test_lstm import TINY as TINY_LSTM

from synthmed.datasets import simulate_cohort
from synthmed.models import base as base_module
from synthmed.models.base import FILTER_PREFIX
from synthmed.models.cgan import CGANSynthesizer
from synthmed.models.lstm import LSTMSynthesizer
from synthmed.models.persistence import load_synthesizer, read_model_file, save_model_file
from synthmed.models.rejection import (
    MAX_ROUNDS,
    BoostedTrees,
    RejectionFilter,
    Tilt,
    _bound_for_acceptance,
    draft_and_keep,
)


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort(150, seed=4)


@pytest.fixture(scope="module")
def refined(cohort) -> LSTMSynthesizer:
    return LSTMSynthesizer(
        config=TINY_LSTM,
        epochs=3,
        batch_size=32,
        verbose=False,
        device="cpu",
        seed=0,
        rejection_sampling=0.4,
    ).fit(cohort)


# -- the parts -------------------------------------------------------------------------------------


def test_exported_trees_decide_as_scikit_learn_does_missing_values_included():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    x[rng.random(x.shape) < 0.2] = np.nan
    labels = (np.nan_to_num(x[:, 0]) + np.isnan(x[:, 1]) + rng.normal(size=600) > 0.5).astype(int)
    model = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(x, labels)
    trees = BoostedTrees.from_sklearn(model)
    assert trees.value.shape[0] == model.n_iter_
    np.testing.assert_allclose(
        trees.decision_function(x), model.decision_function(x), rtol=0, atol=1e-10
    )
    again = BoostedTrees.from_tensors(trees.to_tensors(), trees.baseline, trees.depth)
    np.testing.assert_array_equal(again.decision_function(x), trees.decision_function(x))


def test_exported_trees_decide_as_scikit_learn_does_where_missingness_alone_splits():
    # Where being missing is what matters, scikit-learn splits the missing values from all
    # others with a threshold of +inf; recorded infinities must still fall on its sides.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2000, 3))
    gone = rng.random(2000) < 0.5
    x[gone, 1] = np.nan
    x[rng.random(2000) < 0.1, 2] = np.nan
    labels = (gone ^ (rng.random(2000) < 0.1) | (x[:, 0] > 1.5)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(x, labels)
    trees = BoostedTrees.from_sklearn(model)
    assert np.isinf(trees.threshold[~trees.leaf]).any()
    probe = x[:200].copy()
    probe[:40, :2] = np.inf
    probe[40:80, :2] = -np.inf
    np.testing.assert_allclose(
        trees.decision_function(probe), model.decision_function(probe), rtol=0, atol=1e-10
    )


def test_exported_trees_decide_as_scikit_learn_does_down_lopsided_trees():
    # A signal in one feature's tail grows chains of splits: rows leave a tree at very different
    # depths, and each must stop at its own leaf.
    rng = np.random.default_rng(5)
    x = rng.exponential(size=(4000, 3))
    x[rng.random(x.shape) < 0.1] = np.nan
    labels = (np.nan_to_num(x[:, 0], nan=3.0) + 0.3 * rng.normal(size=4000) > 2.5).astype(int)
    model = HistGradientBoostingClassifier(
        max_iter=30, max_leaf_nodes=31, min_samples_leaf=5, random_state=0
    ).fit(x, labels)
    trees = BoostedTrees.from_sklearn(model)
    leaf_depths = np.concatenate(
        [p[0].nodes["depth"][p[0].nodes["is_leaf"].astype(bool)] for p in model._predictors]
    )
    assert trees.depth >= 8 and leaf_depths.min() <= 3
    np.testing.assert_allclose(
        trees.decision_function(x), model.decision_function(x), rtol=0, atol=1e-10
    )
    assert trees.decision_function(x[:0]).shape == (0,)
    # Scored in blocks on several threads, each row's logit is the same to the last bit.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        threaded = trees.decision_function(x)
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        np.testing.assert_array_equal(threaded, trees.decision_function(x))
    finally:
        torch.set_num_threads(before)


def test_bound_keeps_the_requested_share_of_drafts():
    logits = np.random.default_rng(1).normal(0.0, 2.0, size=5000)
    for share in (0.1, 0.35, 0.8):
        bound = _bound_for_acceptance(logits, share)
        assert np.exp(np.minimum(logits - bound, 0.0)).mean() == pytest.approx(share, abs=1e-6)


def test_drafts_kept_in_proportion_to_the_ratio_follow_the_target_distribution():
    # Drafts from N(0, 1), target N(1, 1): the density ratio is exp(x - 1/2), so keeping a draft
    # with probability min(1, ratio / bound) makes the kept ones (nearly) N(1, 1).
    # With the bound exp(2.5) about 8 % of drafts pass.
    rng = np.random.default_rng(2)
    kept = draft_and_keep(
        20_000,
        lambda slots: rng.normal(size=len(slots)),
        lambda x, u: u < np.exp(np.minimum(x - 3.0, 0.0)),
        lambda k: rng.random(k),
        acceptance=0.08,
    )
    values = np.array([kept.parts[p][r] for p, r in kept.choice])
    assert (kept.choice >= 0).all() and kept.forced == 0
    assert kept.drafted >= 13 * 20_000
    assert values.mean() == pytest.approx(1.0, abs=0.05)
    assert values.std() == pytest.approx(1.0, abs=0.05)


def test_the_tilt_holds_the_counts_where_a_biased_classifier_would_move_them():
    # The classifier's logits are biased against patients with many observations; untilted, the
    # kept drafts have fewer observations than the training patients (mean 10), tilted as many.
    rng = np.random.default_rng(3)
    counts = rng.poisson(10, size=20_000).astype(float)
    features = pd.DataFrame({"n_steps": counts + 5, "HR__n_obs": counts})
    logits = rng.normal(size=len(counts)) - 0.3 * (counts - 10)
    tilt = Tilt(["n_steps", "HR__n_obs"], np.array([15.0, 10.0]), np.array([3.0, 3.0]))

    def kept_mean(log_ratio: np.ndarray, bound: float) -> float:
        keep = np.exp(np.minimum(log_ratio - bound, 0.0))
        return float(keep @ counts / keep.sum())

    untilted = kept_mean(logits, _bound_for_acceptance(logits, 0.3))
    bound = tilt.fit(logits, features, 0.3)
    tilted = logits + tilt(features)
    assert untilted < 9.0
    assert kept_mean(tilted, bound) == pytest.approx(10.0, abs=0.01)
    assert np.exp(np.minimum(tilted - bound, 0.0)).mean() == pytest.approx(0.3, abs=1e-6)


def test_no_leaf_of_the_filter_holds_fewer_rows_than_a_twentieth_of_the_real_patients(
    monkeypatch,
):
    # Smaller leaves let the trees learn single training patients, and a cascade of filters
    # then keeps drafts that resemble them.
    exported = []
    export = BoostedTrees.from_sklearn.__func__

    def recording_export(cls, model):
        exported.append(model)
        return export(cls, model)

    monkeypatch.setattr(BoostedTrees, "from_sklearn", classmethod(recording_export))
    real, drafts = simulate_cohort(1200, seed=1), simulate_cohort(1200, seed=2)
    RejectionFilter.fit(real, drafts, simulate_cohort(200, seed=3), 0.5, seed=0)
    leaves = np.concatenate(
        [p[0].nodes["count"][p[0].nodes["is_leaf"].astype(bool)] for p in exported[0]._predictors]
    )
    assert len(leaves) > len(exported[0]._predictors)  # the trees did split
    assert leaves.min() >= 1200 // 20


def test_a_slot_whose_drafts_never_pass_keeps_its_last_draft_and_is_counted():
    counter = iter(range(10**6))

    def draft(slots: np.ndarray) -> np.ndarray:
        return np.array([next(counter) for _ in slots], dtype=float)

    # Slot 0's drafts never pass; slot 1's always do.
    passing: set[float] = set()

    def passes(batch: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.array([v in passing for v in batch]) & (u < 1.0)

    def draft_marking(slots: np.ndarray) -> np.ndarray:
        batch = draft(slots)
        passing.update(batch[slots == 1].tolist())
        return batch

    kept = draft_and_keep(2, draft_marking, passes, lambda k: np.full(k, 0.5), acceptance=0.5)
    assert kept.forced == 1
    assert kept.drafted == 2 * 2 + (MAX_ROUNDS - 1) * 2
    part, row = kept.choice[0]
    assert part == MAX_ROUNDS - 1 and row == 1  # the last of the slot's two final drafts


# -- on a synthesizer --------------------------------------------------------------------------------


def test_sampling_keeps_drafts_the_filter_finds_more_real(refined, cohort):
    plain = LSTMSynthesizer(
        config=TINY_LSTM, epochs=3, batch_size=32, verbose=False, device="cpu", seed=0
    ).fit(cohort)
    filter_ = refined.rejection_filter_
    assert filter_ is not None and plain.rejection_filter_ is None
    kept = refined.sample(300, seed=5)
    drafts = plain.sample(300, seed=5)
    assert kept.metadata["rejection_sampling"]["kept"] == 300
    assert kept.metadata["rejection_sampling"]["drafted"] >= 300 / 0.4
    assert "rejection_sampling" not in drafts.metadata
    # Same training, same seed: without the filter the model draws the drafts themselves.
    # Kept drafts are those the filter would keep more often: E[a^2] / E[a] over the drafts.
    keep = {name: filter_.keep_probability(c) for name, c in (("kept", kept), ("drafts", drafts))}
    assert keep["kept"].mean() > 1.2 * keep["drafts"].mean()


def test_refined_sampling_is_reproducible_and_honours_conditions(refined):
    first, second = refined.sample(80, seed=3), refined.sample(80, seed=3)
    pd.testing.assert_frame_equal(first.events, second.events)
    pd.testing.assert_frame_equal(first.static, second.static)
    other = refined.sample(80, seed=4)
    assert not other.events.equals(first.events)
    lengths = first.arrays.lengths
    assert lengths.min() < lengths.max()

    conditioned = refined.sample(60, conditions={"In-hospital_death": 1, "ICUType": 2}, seed=1)
    assert (conditioned.static["In-hospital_death"] == 1).all()
    assert (conditioned.static["ICUType"] == 2).all()
    rows = pd.DataFrame({"Age": [30.0, 80.0, np.nan], "Gender": [0, 1, 1]})
    table = refined.sample(conditions=rows, seed=2)
    np.testing.assert_array_equal(table.static["Age"].to_numpy()[:2], [30.0, 80.0])
    np.testing.assert_array_equal(table.static["Gender"].to_numpy(), [0, 1, 1])


def test_patients_drafted_in_blocks_keep_their_own_rows_conditions(refined, monkeypatch):
    monkeypatch.setattr(base_module, "DRAFTS_AT_ONCE", 48)  # blocks of 16 patients at 0.4
    ages = np.arange(20.0, 60.0)
    rows = pd.DataFrame({"Age": ages, "In-hospital_death": np.arange(40) % 2})
    sampled = refined.sample(conditions=rows, seed=8)
    np.testing.assert_array_equal(sampled.static["Age"].to_numpy(), ages)
    np.testing.assert_array_equal(sampled.static["In-hospital_death"], np.arange(40) % 2)
    assert sampled.metadata["rejection_sampling"]["drafted"] >= 40 * 3


def test_the_filter_is_saved_and_sampling_after_loading_is_identical(refined, tmp_path):
    path = refined.save(tmp_path / "refined.synthmed")
    _, config, tensors = read_model_file(path)
    assert config["rejection_filter"]["stages"][0]["acceptance"] == pytest.approx(0.4)
    assert any(name.startswith(FILTER_PREFIX) for name in tensors)
    loaded = load_synthesizer(path)
    assert loaded.rejection_filter_ is not None
    pd.testing.assert_frame_equal(
        loaded.sample(50, seed=9).events, refined.sample(50, seed=9).events
    )


def test_a_file_with_the_single_filter_of_earlier_versions_still_loads(refined, tmp_path):
    # Before filter cascades a file held one filter's settings and unprefixed stage tensors.
    model_type, config, tensors = read_model_file(refined.save(tmp_path / "new.synthmed"))
    config["rejection_filter"] = config["rejection_filter"]["stages"][0]
    tensors = {name.replace("stage0.", ""): value for name, value in tensors.items()}
    del config["params"]["rejection_stages"]
    old = load_synthesizer(save_model_file(tmp_path / "old.synthmed", model_type, config, tensors))
    assert old.rejection_stages == 1 and len(old.rejection_filter_.stages) == 1
    pd.testing.assert_frame_equal(old.sample(40, seed=2).events, refined.sample(40, seed=2).events)


def test_each_stage_learns_from_the_drafts_the_stages_before_it_keep(cohort, monkeypatch):
    drafts_seen = []
    fit = RejectionFilter.fit.__func__

    def recording_fit(cls, real, drafts, calibration, acceptance, seed):
        drafts_seen.append(drafts)
        return fit(cls, real, drafts, calibration, acceptance, seed)

    monkeypatch.setattr(RejectionFilter, "fit", classmethod(recording_fit))
    settings = dict(config=TINY_LSTM, epochs=3, batch_size=32, verbose=False, device="cpu", seed=0)
    cascade = LSTMSynthesizer(**settings, rejection_sampling=0.4, rejection_stages=2).fit(cohort)
    single = LSTMSynthesizer(**settings, rejection_sampling=0.4).fit(cohort)
    stages = cascade.rejection_filter_.stages
    assert len(stages) == 2 and len(drafts_seen) == 3
    assert cascade.rejection_filter_.acceptance == pytest.approx(0.4**2)
    # The first stage is the single filter of the same seed, so the second is what is added.
    first = stages[0].keep_probability(drafts_seen[0])
    np.testing.assert_array_equal(first, single.rejection_filter_.keep_probability(drafts_seen[0]))
    # The second stage learnt from drafts that the first keeps more often than plain drafts.
    assert stages[0].keep_probability(drafts_seen[1]).mean() > 1.2 * first.mean()
    kept = cascade.sample(200, seed=5)
    assert kept.metadata["rejection_sampling"]["drafted"] >= 200 / 0.4**2
    keep = cascade.rejection_filter_.keep_probability
    assert keep(kept).mean() > 1.2 * keep(single.sample(200, seed=5)).mean()


def test_a_cascade_scores_a_stage_only_on_drafts_the_stages_before_it_left_a_chance(
    cohort, monkeypatch
):
    settings = dict(config=TINY_LSTM, epochs=3, batch_size=32, verbose=False, device="cpu", seed=0)
    cascade = LSTMSynthesizer(**settings, rejection_sampling=0.4, rejection_stages=3).fit(cohort)
    filter_ = cascade.rejection_filter_
    drafts = LSTMSynthesizer(**settings).fit(cohort).sample(400, seed=3)
    uniform = np.random.default_rng(0).random(400)
    expected = uniform < filter_.keep_probability(drafts)
    scored = []
    keep_from_features = RejectionFilter.keep_from_features

    def counting(self, features):
        scored.append(len(features))
        return keep_from_features(self, features)

    monkeypatch.setattr(RejectionFilter, "keep_from_features", counting)
    np.testing.assert_array_equal(filter_.passes(drafts, uniform), expected)
    assert expected.any() and not expected.all()
    assert scored[0] == 400 and scored[1] < 400 * 0.8 and scored[-1] < scored[1]


def test_sample_to_streams_refined_patients(refined, tmp_path):
    from synthmed import Cohort

    folder = refined.sample_to(tmp_path / "out", 70, chunk_size=40, seed=6)
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 2
    first = Cohort.read_parquet(parts[0])
    assert first.metadata["rejection_sampling"]["kept"] == 40


def test_the_report_says_how_many_drafts_were_kept(refined, cohort, tmp_path):
    from synthmed import evaluate

    sampled = refined.sample(60, seed=2)
    counts = sampled.metadata["rejection_sampling"]
    page = evaluate(cohort, sampled, gru=False).to_html(tmp_path / "r.html").read_text()
    assert f"rejection sampling: kept 60 of {counts['drafted']:,} drafts" in page


def test_the_cgan_takes_the_same_setting(cohort):
    model = CGANSynthesizer(
        epochs=2,
        batch_size=32,
        seed=0,
        device="cpu",
        verbose=False,
        config=TINY_CGAN,
        rejection_sampling=0.5,
    ).fit(cohort)
    sampled = model.sample(40, seed=1)
    assert sampled.n_patients == 40
    assert sampled.metadata["rejection_sampling"]["drafted"] >= 80


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.2, True, "half"])
def test_rejection_sampling_must_be_a_share(share):
    with pytest.raises(ValueError, match="rejection_sampling must be None or the share"):
        LSTMSynthesizer(rejection_sampling=share)


@pytest.mark.parametrize("stages", [0, -1, 1.5, True, "2"])
def test_rejection_stages_must_be_a_positive_integer(stages):
    with pytest.raises(ValueError, match="rejection_stages must be a positive integer"):
        LSTMSynthesizer(rejection_sampling=0.5, rejection_stages=stages)


def test_rejection_sampling_is_refused_under_dp():
    with pytest.raises(ValueError, match="cannot be combined with epsilon"):
        LSTMSynthesizer(epsilon=3.0, rejection_sampling=0.5)
    with pytest.raises(ValueError, match="cannot be combined with epsilon"):
        CGANSynthesizer(epsilon=3.0, rejection_sampling=0.5)
