"""What the private generators release besides their SGD-trained weights: the summary they
start from (value histograms, mean length, observation rates), the CGAN's static moments and the
outcome labeller."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from synthmed import load_synthesizer
from synthmed.datasets import simulate_cohort
from synthmed.models.cgan import CGANConfig, CGANSynthesizer
from synthmed.models.cgan_networks import STEP_PREFIX, summaries, summary_parts
from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer
from synthmed.models.outcome_labeller import (
    OutcomeFeatures,
    OutcomeLabeller,
    fit_labeller_privately,
    labelled_columns,
    recalibrate_privately,
)
from synthmed.models.privacy import privacy_details

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    # epsilon 1e4 (a budget that is noise-free in effect) sits at the edge of RDP's orders
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),
]

OUTCOME = "In-hospital_death"


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort(400, seed=3)


def _features_of(cohort, rows=slice(None)):
    arrays = cohort.arrays
    features = OutcomeFeatures(cohort.schema, max_length=arrays.max_length, max_time=48.0)
    values = np.where(arrays.mask, arrays.values, np.nan)
    return features, features.transform(
        cohort.static.iloc[rows], values[rows], arrays.times[rows], arrays.lengths[rows]
    )


def test_features_are_scaled_by_the_declared_bounds_not_by_the_data(cohort):
    features, x = _features_of(cohort)
    assert x.shape == (cohort.n_patients, features.size)
    # A patient's features do not depend on who else is in the batch (no data statistic).
    _, alone = _features_of(cohort, slice(5, 6))
    np.testing.assert_array_equal(alone[0], x[5])
    # Hand-computed: mean, min and max of the first variable as fractions of its declared range.
    name = cohort.variables[0]
    column = cohort.schema[name]
    arrays = cohort.arrays
    observed = arrays.values[5, : arrays.lengths[5], 0][arrays.mask[5, : arrays.lengths[5], 0]]
    scaled = (observed - column.lower) / (column.upper - column.lower)
    at = 3  # after steps, duration and the variable's observation count
    np.testing.assert_allclose(
        x[5, at : at + 3], [scaled.mean(), scaled.min(), scaled.max()], rtol=1e-5
    )
    assert x[5, 2] == pytest.approx(len(observed) / arrays.max_length)
    assert OUTCOME not in features.static_columns


def test_curved_features_add_log_and_square_of_every_summary_but_the_flags(cohort):
    arrays = cohort.arrays
    values = np.where(arrays.mask, arrays.values, np.nan)
    args = (cohort.static, values, arrays.times, arrays.lengths)
    straight = OutcomeFeatures(cohort.schema, arrays.max_length, 48.0, curved=False)
    curved = OutcomeFeatures(cohort.schema, arrays.max_length, 48.0)
    x, xc = straight.transform(*args), curved.transform(*args)
    assert x.shape[1] == straight.size and xc.shape[1] == curved.size
    np.testing.assert_array_equal(xc[:, : x.shape[1]], x)
    # The documented layout: steps and end time, then per variable its count and, if numeric,
    # six summaries and a never-observed flag; per static column a value and a missing flag, or
    # one flag per category.
    schema = cohort.schema
    flag = [False, False]
    for name in cohort.variables:
        flag += [False] + ([False] * 6 + [True] if schema[name].kind == "numeric" else [])
    for name in straight.static_columns:
        column = schema[name]
        flag += [False, True] if column.kind == "numeric" else [True] * len(column.categories)
    flag = np.array(flag)
    assert len(flag) == x.shape[1] and np.isin(x[:, flag], (0.0, 1.0)).all()
    continuous = x[:, ~flag]
    width = continuous.shape[1]
    logged = np.log1p(20 * np.maximum(continuous, 0)) / np.log1p(20)
    np.testing.assert_allclose(xc[:, x.shape[1] : x.shape[1] + width], logged, rtol=1e-5)
    np.testing.assert_allclose(xc[:, x.shape[1] + width :], continuous**2, rtol=1e-5)


def test_calibration_sets_the_mean_probability_to_the_prevalence():
    labeller = OutcomeLabeller(3, 1)
    labeller.prevalence.fill_(0.2)
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    labeller.calibrate(x)
    assert float(labeller.probabilities(x).mean().detach()) == pytest.approx(0.2, abs=1e-4)


def _opacus(epsilon: float):
    """A ``make_private`` for the labeller's helpers alone, outside any synthesizer."""
    from opacus import PrivacyEngine

    def make_private(module, optimizer, loader, epochs):
        return PrivacyEngine().make_private_with_epsilon(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=1e-5,
            epochs=epochs,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )

    return make_private


def _logistic_data(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, 4)).astype(np.float32)
    logit = 4.0 * x[:, 0] - 3.0 * x[:, 1] - 0.5
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return torch.as_tensor(x), torch.as_tensor(y[:, None]), np.array([4.0, -3.0, 0.0, 0.0])


def test_labeller_keeps_the_average_of_its_late_iterates():
    x, y, _ = _logistic_data()
    labeller = OutcomeLabeller(4, 1)
    seen = []

    def recording(module, optimizer, loader, epochs):
        module, optimizer, loader = _opacus(50.0)(module, optimizer, loader, epochs)
        step = optimizer.step

        def step_and_record(*args, **kwargs):
            result = step(*args, **kwargs)
            seen.append(labeller.linear.weight.detach().clone())
            return result

        optimizer.step = step_and_record
        return module, optimizer, loader

    fit_labeller_privately(labeller, x, y, torch.Generator().manual_seed(0), recording, steps=40)
    assert len(seen) == 40
    kept = labeller.linear.weight.detach()
    torch.testing.assert_close(kept, torch.stack(seen[20:]).mean(0))
    assert not torch.equal(kept, seen[-1])


@pytest.mark.parametrize("inflation", [1.0, 2.0])
def test_recalibration_undoes_an_overconfident_logit(inflation):
    x, y, truth = _logistic_data(seed=1)
    labeller = OutcomeLabeller(4, 1)
    with torch.no_grad():
        labeller.linear.weight.copy_(torch.as_tensor(truth * inflation, dtype=torch.float32)[None])
        labeller.linear.bias.fill_(-0.5 * inflation)
    slopes = recalibrate_privately(labeller, x, y, torch.Generator().manual_seed(0), _opacus(5.0))
    assert float(slopes[0]) == pytest.approx(1 / inflation, rel=0.15)
    weights = labeller.linear.weight.detach().numpy()[0]
    np.testing.assert_allclose(weights, truth * inflation * float(slopes[0]), atol=1e-5)


def _private_lstm(epsilon: float | None, **settings) -> LSTMSynthesizer:
    small = LSTMConfig(
        hidden_size=8,
        head_hidden=8,
        static_hidden=8,
        gap_components=2,
        mask_components=2,
        value_components=2,
        static_components=2,
    )
    options = dict(epochs=1, batch_size=50, device="cpu", verbose=False, max_length=24)
    return LSTMSynthesizer(small, epsilon=epsilon, **{**options, **settings})


@pytest.fixture(scope="module")
def private_model(cohort):
    return _private_lstm(8.0).fit(cohort)


def test_private_lstm_draws_outcomes_from_a_labeller_that_learned_them(private_model, cohort):
    model = private_model
    assert model.labelled_columns_ == [OUTCOME] == labelled_columns(cohort.schema)
    # The labeller ranks the real patients by their outcome (simulated death follows severity,
    # which shapes the vitals), though it saw them only through DP-SGD.
    _, x = _features_of(cohort)
    truth = cohort.static[OUTCOME].to_numpy().astype(int)
    scores = model.labeller_.probabilities(torch.as_tensor(x))[:, 0].detach().numpy()
    assert roc_auc_score(truth, scores) > 0.75
    # Generated patients have about the real prevalence, and their drawn outcome follows the
    # labeller's probability for them (not the static model's draw).
    synthetic = model.sample(1500, seed=0)
    rate = (synthetic.static[OUTCOME] == 1).mean()
    assert rate == pytest.approx(truth.mean(), abs=0.06)
    _, xs = _features_of(synthetic)
    p = model.labeller_.probabilities(torch.as_tensor(xs))[:, 0].detach().numpy()
    assert roc_auc_score(synthetic.static[OUTCOME].to_numpy().astype(int), p) > 0.7


def test_charted_flags_and_dropout_default_to_off_under_dp_and_on_without(private_model, cohort):
    assert private_model.config_.charted_flags is False
    assert private_model.network_.sequence.n_flags == 0
    assert private_model.config_.dropout == private_model.network_.sequence.dropout == 0.0
    public = _private_lstm(None).fit(cohort)
    assert public.config_.charted_flags is True
    assert public.network_.sequence.n_flags == len(cohort.schema.temporal_columns)
    assert public.config_.dropout == public.network_.sequence.dropout == 0.25


def test_private_lstm_honours_outcome_conditions_by_redrawing_patients(private_model):
    conditions = pd.DataFrame({OUTCOME: [1] * 30 + [0] * 30 + [None] * 30})
    sampled = private_model.sample(conditions=conditions, seed=1)
    drawn = sampled.static[OUTCOME].to_numpy()
    assert (drawn[:30] == 1).all() and (drawn[30:60] == 0).all()
    again = private_model.sample(conditions=conditions, seed=1)
    pd.testing.assert_frame_equal(sampled.static, again.static)
    pd.testing.assert_frame_equal(sampled.events, again.events)


def test_labeller_is_saved_and_loaded(private_model, tmp_path):
    before = private_model.sample(200, seed=4)
    loaded = load_synthesizer(private_model.save(tmp_path / "dp.synthmed"))
    after = loaded.sample(200, seed=4)
    pd.testing.assert_frame_equal(before.static, after.static)
    pd.testing.assert_frame_equal(before.events, after.events)
    torch.testing.assert_close(loaded.labeller_.shift, private_model.labeller_.shift)


def test_a_labeller_saved_before_curved_features_loads_on_straight_ones(private_model, tmp_path):
    from synthmed.models.base import Synthesizer
    from synthmed.models.persistence import read_model_file

    model_type, config, tensors = read_model_file(private_model.save(tmp_path / "dp.synthmed"))
    assert config["state"].pop("labeller_curved") is True
    # An older file: the labeller's weights are those of the straight features only.
    straight = OutcomeFeatures(private_model.schema_, 24, 48.0, curved=False).size
    tensors["labeller.linear.weight"] = tensors["labeller.linear.weight"][:, :straight]
    old = Synthesizer.registry()[model_type]._from_saved(config, tensors, device="cpu")
    assert old.labeller_curved_ is False
    assert old._outcome_features().size == straight == old.labeller_.linear.in_features
    sampled = old.sample(100, seed=0)
    assert set(sampled.static[OUTCOME].dropna().unique()) <= {0, 1}


def test_labeller_phases_spend_within_the_budget(private_model):
    epsilon, _ = private_model.privacy_spent
    assert 7.5 < epsilon <= 8.0 * 1.01
    phases = privacy_details(private_model)["phases"]
    # value histograms, static model, sequence model, labeller, recalibration, prevalence
    assert [p["budget_fraction"] for p in phases] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.05, 0.05])
    assert phases[0]["sample_rate"] == phases[5]["sample_rate"] == 1.0


def test_no_labeller_without_dp_or_without_a_binary_outcome(cohort):
    assert _private_lstm(None).fit(cohort).labeller_ is None
    schema = cohort.schema.with_column(OUTCOME, role="static")
    from synthmed import Cohort

    plain = Cohort(cohort.static, cohort.events, schema, cohort.metadata)
    model = _private_lstm(8.0).fit(plain)
    assert model.labeller_ is None
    phases = privacy_details(model)["phases"]
    assert [p["budget_fraction"] for p in phases] == pytest.approx([0.1, 0.2, 0.7])


def test_private_summary_recovers_the_data_at_a_generous_budget(cohort):
    from synthmed.models.transforms import ValueScaler

    model = _private_lstm(1e4).fit(cohort)
    public = ValueScaler().fit(cohort.arrays.values, cohort.schema)
    private = model.value_scaler_
    for j, name in enumerate(cohort.variables):
        if cohort.schema[name].kind != "numeric" or private.log_[j] != public.log_[j]:
            continue
        # Binned, per-patient weighted: close to the data's statistics, not equal to them.
        assert abs(private.center_[j] - public.center_[j]) < 0.5 * public.scale_[j], name
        assert 0.5 < private.scale_[j] / public.scale_[j] < 2.0, name
    assert model.facts_["mean_length"] == pytest.approx(
        cohort.arrays.lengths.clip(max=24).mean(), rel=0.05
    )


def test_private_summary_falls_back_to_the_bounds_when_noise_drowns_it(cohort):
    from synthmed.models.transforms import ValueScaler

    model = _private_lstm(0.05, epochs=1).fit(cohort.subset(cohort.ids[:60]))
    bounds = ValueScaler().fit(cohort.arrays.values, cohort.schema, from_bounds=True)
    np.testing.assert_allclose(model.value_scaler_.center_, bounds.center_)


def _private_cgan(epsilon: float) -> CGANSynthesizer:
    small = CGANConfig(
        static_hidden=16,
        static_noise_dim=8,
        lstm_hidden=16,
        sequence_noise_dim=4,
        critic_hidden=16,
        step_embedding=4,
        max_steps=24,
    )
    return CGANSynthesizer(
        config=small, epochs=1, batch_size=50, epsilon=epsilon, device="cpu", verbose=False
    )


def test_private_cgan_draws_outcomes_from_its_labeller_too(cohort, tmp_path):
    model = _private_cgan(8.0).fit(cohort)
    assert model.labelled_columns_ == [OUTCOME]
    assert model.privacy_spent[0] <= 8.0 * 1.01
    sampled = model.sample(conditions=pd.DataFrame({OUTCOME: [1] * 20 + [None] * 200}), seed=0)
    drawn = sampled.static[OUTCOME].to_numpy().astype(int)
    assert (drawn[:20] == 1).all()
    assert abs(drawn[20:].mean() - float(model.labeller_.prevalence[0])) < 0.1
    loaded = load_synthesizer(model.save(tmp_path / "cgan.synthmed"))
    again = loaded.sample(conditions=pd.DataFrame({OUTCOME: [1] * 20 + [None] * 200}), seed=0)
    pd.testing.assert_frame_equal(sampled.static, again.static)
    pd.testing.assert_frame_equal(sampled.events, again.events)


def test_private_cgan_releases_the_share_of_patients_who_have_each_variable(cohort, monkeypatch):
    from synthmed.models import cgan as cgan_module
    from synthmed.models.private_summary import release_summary

    # Half of the patients have no arterial line: no MAP, SysABP or DiasABP at all.
    no_line = cohort.ids[::2]
    events = cohort.events.copy()
    events.loc[events["patient_id"].isin(no_line), ["MAP", "SysABP", "DiasABP"]] = np.nan
    lined = type(cohort)(cohort.static, events, cohort.schema, cohort.metadata)
    released = []

    def spy(*args, **options):
        released.append((args[2], release_summary(*args, **options)))
        return released[-1][1]

    monkeypatch.setattr(cgan_module, "release_summary", spy)
    _private_cgan(1e4).fit(lined)
    ((inside, summary),) = released
    arrays = lined.arrays
    truth = (arrays.mask & inside[..., None]).any(axis=1).mean(axis=0).clip(0.01, 0.99)
    assert summary.charted_shares["MAP"] == pytest.approx(0.5, abs=0.02)
    shares = [summary.charted_shares[v] for v in arrays.variables]
    np.testing.assert_allclose(shares, truth, atol=0.02)


def test_private_cgan_patient_moments_tie_each_level_to_the_others(cohort):
    model = _private_cgan(1e4).fit(cohort)
    layout, sequence = model.layout_, model.generator_.sequence
    static = torch.as_tensor(layout.encoder.transform(cohort.static))
    steps = layout.encode_steps(cohort)
    patient = torch.cat([static, summaries(steps, sequence.value_variable)], 1)
    rows = model._patient_moments(patient, steps)
    # Every released row is within the bound the mechanism is calibrated on.
    assert float(rows.norm(dim=1).max()) <= model._patient_bound()
    released = rows.mean(0)
    # HR's mean and last value handed to other patients: every moment of one column is kept,
    # the products of HR's level with the other levels are not.
    w = sequence.value_width
    shuffled = patient.clone()
    parts = summary_parts(shuffled[:, layout.encoder.width_ :], sequence.n_variables, w)  # views
    order = torch.randperm(len(patient), generator=torch.Generator().manual_seed(0))
    for level in (parts.mean, parts.last):
        level[:, 0] = level[order, 0]
    moved = (model._patient_moments(shuffled, steps).mean(0) - released).abs()
    n_products = w * (w - 1) // 2
    assert float(moved[:-n_products].max()) < 1e-6
    assert float(moved[-n_products:].max()) > 0.05


def test_private_cgan_static_moments_are_bounded_and_recover_the_data(cohort):
    model = _private_cgan(1e4).fit(cohort)
    encoded = torch.as_tensor(model.layout_.encoder.transform(cohort.static))
    rows = model._static_moments(encoded)
    # The declared bounds bound each patient's row, so private_sum clips no real patient.
    assert float(rows.norm(dim=1).max()) <= model._static_bound()
    released = model._private_mean(
        rows, model._static_bound(), 0.05, torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(released.numpy(), rows.mean(0).numpy(), atol=0.02)
    # Every block's share is there: the one-hot means of a categorical column sum to ~1.
    icu = next(b for b in model.layout_.encoder.blocks_ if b.name == "ICUType")
    assert float(released[icu.start : icu.start + icu.width].sum()) == pytest.approx(1, abs=0.03)


def test_private_cgan_moment_targets_describe_the_real_patients(cohort, monkeypatch):
    captured = []
    release = CGANSynthesizer._moment_targets

    def spy(self, *args, **kwargs):
        captured.append(release(self, *args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(CGANSynthesizer, "_moment_targets", spy)
    model = _private_cgan(1e4).fit(cohort)
    (targets,) = captured
    assert targets.value_known.all()
    layout, sequence = model.layout_, model.generator_.sequence
    static = torch.as_tensor(layout.encoder.transform(cohort.static))
    steps = layout.encode_steps(cohort)

    def distance(steps):
        patient = torch.cat([static, summaries(steps, sequence.value_variable)], 1)
        return float(model._moment_distance((static, patient, steps), targets))

    # The real patients, in the critics' input layout, sit on the released moments ...
    near = distance(steps)
    assert near < 0.1
    # ... and values moved by half a scaled unit where observed are far from them.
    start = STEP_PREFIX + sequence.n_variables
    observed = steps[..., STEP_PREFIX:start][..., sequence.value_variable]
    shifted = steps.clone()
    shifted[..., start:] += 0.5 * observed
    assert distance(shifted) > 10 * near
    # So are stays whose gaps are all in one step, though their mean log-gap is the real one.
    lumped = steps.clone()
    lumped[..., 0] = 0.0
    lumped[:, 1, 0] = steps[..., 0].sum(1)
    assert distance(lumped) > 10 * near
