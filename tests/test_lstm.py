"""LSTMSynthesizer: fitting, sampling, conditioning, reproducibility, persistence, errors, and
the likelihood heads it is built from. Tiny models on a simulated cohort keep this file fast."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from synthmed import Cohort, DataError, ModelFileError, SchemaError
from synthmed.datasets import simulate_cohort
from synthmed.models.heads import (
    GaussianMixture,
    NonEmptyBernoulliMixture,
    ProductMixture,
    ZeroInflatedLogNormalMixture,
)
from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer
from synthmed.models.lstm_network import SequenceSampler, StepFeatures, ValueCodec, gap_features
from synthmed.models.persistence import load_synthesizer, read_model_file, save_model_file
from synthmed.models.value_grid import detect_resolution, frequent_values, snap
from synthmed.models.variability import match_temperature, within_stay_spread
from synthmed.schema import ColumnSchema, Schema

TINY = LSTMConfig(
    hidden_size=16,
    head_hidden=16,
    gap_components=2,
    mask_components=3,
    value_components=2,
    static_hidden=16,
    static_layers=1,
    static_components=2,
)


def tiny(**settings) -> LSTMSynthesizer:
    defaults = {"config": TINY, "epochs": 3, "batch_size": 32, "verbose": False, "device": "cpu"}
    return LSTMSynthesizer(**{**defaults, **settings})


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    """A simulated cohort in which ICU type 4 never occurs (the schema still allows it)."""
    simulated = simulate_cohort(120, seed=1)
    # Static columns out of alphabetical order: saved files sort their JSON keys.
    order = ["ICUType", "Age", "In-hospital_death", "Gender"]
    static = simulated.static[order].copy()
    static["ICUType"] = static["ICUType"].replace({4: 3})
    schema = simulated.schema
    columns = [schema[name] for name in order] + [schema[v] for v in schema.temporal_columns]
    return Cohort(static, simulated.events, Schema(columns, schema.id_column))


@pytest.fixture(scope="module")
def synth(cohort: Cohort) -> LSTMSynthesizer:
    return tiny(seed=0).fit(cohort)


def assert_same(a: Cohort, b: Cohort) -> None:
    pd.testing.assert_frame_equal(a.static, b.static)
    pd.testing.assert_frame_equal(a.events, b.events)


# -- fitting and sampling ------------------------------------------------------------------------


def test_fit_records_history_and_facts(synth: LSTMSynthesizer, cohort: Cohort) -> None:
    history = synth.history_
    assert len(history) == 3
    assert {"train_loss", "val_loss", "static", "gap", "mask", "values", "end"} <= set(history)
    assert np.isfinite(history["train_loss"]).all()
    assert synth.max_length_ == cohort.arrays.lengths.max()
    assert synth.n_truncated_ == 0
    assert synth.max_time_ == pytest.approx(cohort.events["time"].max())


def test_sample_is_a_valid_cohort(synth: LSTMSynthesizer, cohort: Cohort) -> None:
    out = synth.sample(60, seed=1)
    assert isinstance(out, Cohort)
    assert out.n_patients == 60
    assert out.variables == cohort.variables
    assert list(out.static.columns) == cohort.static_columns
    assert "empty_event_rows" not in out.cleaning  # no step without an observed variable
    events = out.events
    assert (events["time"] >= 0).all()
    assert (events["time"] <= synth.max_time_ + 1e-9).all()
    assert events.groupby(out.id_column)["time"].apply(lambda t: t.is_monotonic_increasing).all()
    # Values honour the schema's bounds, and integer columns come out whole.
    for name in cohort.variables:
        column = cohort.schema[name]
        values = events[name].dropna()
        assert values.between(column.lower, column.upper).all()
    assert (out.static["Age"] == out.static["Age"].round()).all()
    assert out.metadata["generator"] == "LSTMSynthesizer"


def test_lengths_and_masks_vary(synth: LSTMSynthesizer) -> None:
    arrays = synth.sample(80, seed=2).arrays
    assert arrays.lengths.std() > 0
    assert arrays.lengths.max() <= synth.max_length_
    patterns = {tuple(row) for row in arrays.mask[arrays.step_mask]}
    assert len(patterns) > 5
    rates = arrays.mask[arrays.step_mask].mean(axis=0)
    assert ((rates > 0) & (rates < 1)).all()


def test_times_and_values_on_the_training_grid(synth: LSTMSynthesizer) -> None:
    out = synth.sample(40, seed=3)
    times = out.events["time"].to_numpy()
    # The very floats of the training times (k / 60), not neighbours a classifier tells apart.
    np.testing.assert_array_equal(times, np.round(times * 60) / 60)
    hr = out.events["HR"].dropna().to_numpy()
    np.testing.assert_allclose(hr, np.round(hr))


# -- reproducibility -----------------------------------------------------------------------------


def test_same_seed_same_sample_different_seed_different(synth: LSTMSynthesizer) -> None:
    assert_same(synth.sample(30, seed=5), synth.sample(30, seed=5))
    other = synth.sample(30, seed=6)
    assert not other.events.equals(synth.sample(30, seed=5).events)


def test_same_seed_same_fit(cohort: Cohort) -> None:
    small = cohort.subset(cohort.ids[:40])
    first = tiny(epochs=1, seed=3).fit(small).sample(20, seed=0)
    second = tiny(epochs=1, seed=3).fit(small).sample(20, seed=0)
    assert_same(first, second)
    third = tiny(epochs=1, seed=4).fit(small).sample(20, seed=0)
    assert not third.events.equals(first.events)


# -- conditions ----------------------------------------------------------------------------------


def test_dict_conditions_are_honoured(synth: LSTMSynthesizer) -> None:
    out = synth.sample(40, conditions={"In-hospital_death": 1, "Age": 71}, seed=0)
    assert (out.static["In-hospital_death"] == 1).all()
    assert (out.static["Age"] == 71).all()
    assert out.static["Gender"].nunique() == 2  # free columns are still drawn


def test_dataframe_conditions_are_honoured_row_by_row(synth: LSTMSynthesizer) -> None:
    conditions = pd.DataFrame(
        {
            "ICUType": [1, 2, None, 3] * 10,
            "Age": [30.0, np.nan, 80.0, np.nan] * 10,
        }
    )
    out = synth.sample(conditions=conditions, seed=0)
    assert out.n_patients == 40
    static = out.static.reset_index(drop=True)
    given = conditions["ICUType"].notna()
    assert (static.loc[given, "ICUType"].to_numpy() == conditions.loc[given, "ICUType"]).all()
    given = conditions["Age"].notna()
    assert (static.loc[given, "Age"].to_numpy() == conditions.loc[given, "Age"]).all()
    assert static.loc[~given, "Age"].nunique() > 1


def test_conditions_change_the_sequences(synth: LSTMSynthesizer) -> None:
    """The LSTM reads the static vector: fixing it changes what follows."""
    a = synth.sample(30, conditions={"Age": 20}, seed=0)
    b = synth.sample(30, conditions={"Age": 90}, seed=0)
    assert not a.events.drop(columns=a.id_column).equals(b.events.drop(columns=b.id_column))


# -- persistence ---------------------------------------------------------------------------------


def test_save_load_gives_the_same_samples(synth: LSTMSynthesizer, tmp_path) -> None:
    before = synth.sample(25, seed=7)
    path = synth.save(tmp_path / "model.synthmed")
    loaded = load_synthesizer(path)
    assert isinstance(loaded, LSTMSynthesizer)
    assert loaded.get_params() == synth.get_params()
    assert loaded.max_length_ == synth.max_length_
    assert_same(loaded.sample(25, seed=7), before)


def test_file_written_before_the_variability_matching_samples_at_temperature_one(
    synth: LSTMSynthesizer, tmp_path
) -> None:
    """Files written before ``match_variability`` existed have neither the setting nor the
    factors: they load, and sample with the step noise as trained."""
    path = synth.save(tmp_path / "model.synthmed")
    model_type, config, tensors = read_model_file(path)
    del config["params"]["match_variability"]
    del config["state"]["facts"]["value_temperature"]
    old = load_synthesizer(save_model_file(tmp_path / "old.synthmed", model_type, config, tensors))
    assert set(old.value_temperature_) == set(synth.value_temperature_)
    assert set(old.value_temperature_.values()) == {1.0}
    as_trained = load_synthesizer(path)
    as_trained._use_value_temperature(None)
    assert_same(old.sample(25, seed=7), as_trained.sample(25, seed=7))
    with pytest.raises(AssertionError):
        assert_same(old.sample(25, seed=7), synth.sample(25, seed=7))


def test_corrupted_file_raises(synth: LSTMSynthesizer, tmp_path) -> None:
    path = synth.save(tmp_path / "model.synthmed")
    content = bytearray(path.read_bytes())
    truncated = tmp_path / "truncated.synthmed"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ModelFileError):
        load_synthesizer(truncated)
    garbage = tmp_path / "garbage.synthmed"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        load_synthesizer(garbage)


def test_inconsistent_state_raises_model_file_error(synth: LSTMSynthesizer) -> None:
    state, tensors = synth._get_state()
    tensors = dict(tensors)
    tensors.pop(next(iter(tensors)))
    config = {
        "params": synth.get_params(),
        "schema": synth.schema_.to_dict(),
        "fitted": {
            "seed_": 0,
            "n_train_patients_": 1,
            "id_prefix_": "syn-",
            "fit_seconds_": 0.0,
            "privacy_spent_": None,
            "history_": {},
        },
        "state": state,
    }
    with pytest.raises(ModelFileError):
        LSTMSynthesizer._from_saved(config, tensors)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_n_raises(synth: LSTMSynthesizer, n) -> None:
    with pytest.raises(ValueError, match="n must be a positive integer"):
        synth.sample(n)


def test_unknown_condition_column_raises(synth: LSTMSynthesizer) -> None:
    with pytest.raises(SchemaError, match="Weight"):
        synth.sample(5, conditions={"Weight": 80})


def test_category_never_seen_in_training_raises(synth: LSTMSynthesizer) -> None:
    with pytest.raises(DataError, match="never occurs in the training data"):
        synth.sample(5, conditions={"ICUType": 4})
    with pytest.raises(DataError, match="never seen"):
        synth.sample(5, conditions={"ICUType": 7})


@pytest.mark.parametrize(
    "settings",
    [
        {"epochs": 0},
        {"batch_size": -1},
        {"learning_rate": 0},
        {"validation_fraction": 1.0},
        {"patience": 0},
        {"max_length": 0},
        {"config": {"hidden_size": 0}},
        {"config": {"no_such_field": 3}},
        {"match_variability": "yes"},
        {"quantize": 1},
    ],
)
def test_bad_settings_raise(settings) -> None:
    with pytest.raises(ValueError):
        LSTMSynthesizer(**settings)


def test_no_temporal_variable_raises(cohort: Cohort) -> None:
    static = cohort.static
    events = cohort.events[[cohort.id_column, "time"]].iloc[:0]
    schema = cohort.schema
    bare = Schema([schema[c] for c in schema.static_columns], schema.id_column)
    with pytest.raises(DataError, match="temporal variable"):
        tiny().fit(Cohort(static, events, bare))


# -- training details ----------------------------------------------------------------------------


def test_max_length_truncates_and_counts(cohort: Cohort) -> None:
    synth = tiny(epochs=1, max_length=10).fit(cohort)
    assert synth.n_truncated_ == int((cohort.arrays.lengths > 10).sum()) > 0
    assert synth.max_length_ == 10
    assert synth.sample(30, seed=0).arrays.lengths.max() <= 10


def test_early_stopping_keeps_the_best_epoch(cohort: Cohort) -> None:
    synth = tiny(epochs=40, patience=2, learning_rate=0.05, seed=1).fit(cohort)
    history = synth.history_
    assert len(history) < 40
    best = int(history["val_loss"].idxmin()) + 1
    assert synth.best_epoch_ == best
    assert len(history) - best == 2


def test_lstm_outputs_are_dropped_in_training_not_in_validation(cohort: Cohort, monkeypatch):
    # A quarter of the LSTM's outputs reach the heads as zeros while training (without DP);
    # the held-out loss is computed without dropout. LSTM outputs are otherwise never 0 exactly.
    shares: dict[bool, list[float]] = {True: [], False: []}
    build = LSTMSynthesizer._build_network

    def recording_build(self, private):
        network = build(self, private)

        def record(module, inputs):
            shares[module.training].append(float((inputs[0] == 0).float().mean()))

        network.sequence.out.register_forward_pre_hook(record)
        return network

    monkeypatch.setattr(LSTMSynthesizer, "_build_network", recording_build)
    tiny(epochs=2).fit(cohort)
    assert np.mean(shares[True]) == pytest.approx(0.25, abs=0.03)
    assert shares[False] and max(shares[False]) == 0.0


def test_learning_rate_halves_after_half_the_patience(cohort: Cohort, monkeypatch) -> None:
    # After a quarter of it, one raw PhysioNet fit stopped on a dip of its noisy held-out loss.
    made = []
    original = torch.optim.lr_scheduler.ReduceLROnPlateau.__init__

    def recording_init(self, optimizer, **settings):
        made.append(settings)
        original(self, optimizer, **settings)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "__init__", recording_init)
    synth = tiny(epochs=40, patience=6, learning_rate=0.05, seed=1).fit(cohort)
    assert made[-1] == {"factor": 0.5, "patience": 3}  # the sequence model's, made last
    rates = synth.history_["learning_rate"].to_numpy()
    assert rates.min() < 0.05, "the rate never dropped"
    assert set(np.log2(0.05 / rates).round(6)) <= set(range(10))


def test_kept_weights_are_the_moving_average_of_the_iterates(cohort: Cohort, adam_iterates):
    # Without DP the weights kept are an exponential moving average of the iterates, over
    # about the last 3.5 epochs, not Adam's last noisy step.
    synth = tiny(epochs=3, batch_size=16, validation_fraction=0.0).fit(cohort)
    sequence_optimizer = adam_iterates[-1][0]
    steps = [weights for optimizer, weights in adam_iterates if optimizer is sequence_optimizer]
    decay = 1 - 1 / (3.5 * math.ceil(cohort.n_patients / 16))
    average = steps[0]
    for weights in steps[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights, strict=True)]
    names = [name for name, _ in synth.network_.sequence.named_parameters()]
    kept = dict(synth.network_.sequence.named_parameters())
    assert len(names) == len(average)
    out = names.index("out.weight")  # a layer that project() leaves alone
    torch.testing.assert_close(kept["out.weight"], average[out])
    assert not torch.allclose(kept["out.weight"], steps[-1][out], atol=1e-4)


def test_minibatches_not_one_step_per_epoch(cohort: Cohort, monkeypatch) -> None:
    steps = []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    synth = tiny(epochs=1, batch_size=16).fit(cohort)
    n_train = cohort.n_patients - round(cohort.n_patients * 0.1)
    # The static model trains first with its own optimizer; the sequence model's comes last.
    sequence_optimizer = steps[-1]
    assert sum(o is sequence_optimizer for o in steps) == math.ceil(n_train / 16)
    static_fit = synth.facts_["static_fit"]
    assert sum(o is not sequence_optimizer for o in steps) == static_fit["epochs"] * math.ceil(
        n_train / 256
    )


def test_static_model_is_trained_to_calibration() -> None:
    # Trained on its own schedule (not with the sequence model's one epoch here), the static
    # model reproduces the share of missing values and the outcome rate.
    simulated = simulate_cohort(400, seed=3)
    static = simulated.static.copy()
    static.loc[static.index[::3], "Age"] = np.nan
    cohort = Cohort(static, simulated.events, simulated.schema)
    config = dataclasses.replace(TINY, static_hidden=64, static_layers=2)
    synth = tiny(epochs=1, config=config).fit(cohort)
    synthetic = synth.sample(3000, seed=0).static
    assert abs(synthetic["Age"].isna().mean() - 1 / 3) < 0.05
    death = "In-hospital_death"
    assert abs(synthetic[death].mean() - static[death].mean()) < 0.05
    assert synth.facts_["static_fit"]["best_epoch"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda(cohort: Cohort) -> None:
    synth = tiny(device="cuda", epochs=1).fit(cohort)
    assert synth.sample(10, seed=0).n_patients == 10


# -- building blocks -----------------------------------------------------------------------------


def test_sampler_unrolls_the_trained_lstm_exactly(synth: LSTMSynthesizer) -> None:
    net = synth.network_.sequence
    sampler = SequenceSampler(
        net, synth._codec, {"gap_scale": 1.0, "time_scale": 1.0, "length_scale": 10.0}, 0.0, 0.0
    )
    gen = torch.Generator().manual_seed(0)
    static = torch.randn(4, net.static_size + net.n_flags, generator=gen)  # with the flags
    x = torch.randn(4, 5, net.input_size, generator=gen)
    with torch.no_grad():
        expected, _ = net.lstm(
            torch.cat([x, static[:, None].expand(-1, 5, -1)], 2), net.initial_state(static)
        )
        h0, c0 = net.initial_state(static)
        h, c = h0[0], c0[0]
        w_in, w_hh, w_static, bias = sampler.layers[0]
        static_bias = torch.addmm(bias, static, w_static)
        for t in range(5):
            h, c = sampler._lstm_cell(x[:, t], h, c, w_in, w_hh, static_bias)
            torch.testing.assert_close(h, expected[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chained", [False, True])
def test_mask_head_is_a_distribution_over_non_empty_masks_and_samples_it(chained) -> None:
    head = NonEmptyBernoulliMixture(n_variables=3, n_components=2)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, head.n_params, generator=gen) * 2
    interactions = torch.tril(torch.randn(3, 3, generator=gen) * 3, -1) if chained else None
    masks = torch.tensor(
        [m for m in itertools.product([0, 1], repeat=3) if any(m)], dtype=torch.float32
    )
    terms = masks @ interactions.t() if chained else None
    probs = head.log_prob(raw.expand(len(masks), -1), masks, terms).exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    drawn = head.sample(raw.expand(100_000, -1), torch.Generator().manual_seed(1), interactions)
    assert drawn.any(dim=1).all()
    frequency = torch.stack([(drawn == m.bool()).all(1).float().mean() for m in masks])
    torch.testing.assert_close(frequency, probs, atol=0.006, rtol=0)


def test_gap_head_integrates_to_one() -> None:
    head = ZeroInflatedLogNormalMixture(n_components=3, scale=2.0)
    raw = torch.randn(
        head.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    grid = torch.linspace(1e-6, 400.0, 400_001, dtype=torch.float64)
    density = head.log_prob(raw.expand(len(grid), -1), grid).exp()
    mass = (
        torch.trapezoid(density, grid)
        + head.log_prob(raw, torch.zeros((), dtype=torch.float64)).exp()
    )
    assert float(mass) == pytest.approx(1.0, abs=2e-3)
    draws = head.sample(raw.expand(2000, -1), torch.Generator().manual_seed(2))
    assert (draws >= 0).all()


def test_product_mixture_marginalises_unobserved_variables() -> None:
    head = ProductMixture(n_numeric=2, category_sizes=[3], n_components=4)
    raw = torch.randn(1, head.n_params, generator=torch.Generator().manual_seed(0))
    z = torch.tensor([[0.3, -1.0]])
    yes, no = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    # Summing the categorical variable over its categories gives the likelihood without it.
    joint = (
        torch.stack(
            [
                head.log_prob(raw, z, torch.tensor([[c]]), yes, torch.tensor([[True]]))
                for c in range(3)
            ]
        )
        .exp()
        .sum()
    )
    without = head.log_prob(raw, z, torch.tensor([[0]]), yes, torch.tensor([[False]])).exp()
    torch.testing.assert_close(joint, without.squeeze())
    # An unobserved numeric variable does not depend on its placeholder value.
    a = head.log_prob(raw, z, torch.tensor([[0]]), no, torch.tensor([[False]]))
    b = head.log_prob(
        raw, z + torch.tensor([[0.0, 5.0]]), torch.tensor([[0]]), no, torch.tensor([[False]])
    )
    torch.testing.assert_close(a, b)


def test_gaussian_mixture_sample_matches_its_density() -> None:
    head = GaussianMixture(n_dims=1, n_components=2)
    raw = torch.tensor([[0.0, 0.0, -3.0, 3.0, -2.0, -2.0]])
    draws = head.sample(raw.expand(20_000, -1), torch.Generator().manual_seed(0))
    assert float(draws.mean()) == pytest.approx(0.0, abs=0.1)
    assert float((draws > 0).float().mean()) == pytest.approx(0.5, abs=0.03)


def test_detect_resolution() -> None:
    rng = np.random.default_rng(0)
    assert detect_resolution(np.round(rng.normal(80, 10, 500))) == 1.0
    assert detect_resolution(np.round(rng.normal(37, 1, 500), 1)) == pytest.approx(0.1)
    assert detect_resolution(rng.normal(0, 1, 500)) == 0.0


def test_frequent_values_and_snapping() -> None:
    inches = np.repeat(np.round(np.arange(60, 76) * 2.54, 1), 20)
    support, share, weights = frequent_values(np.r_[inches, 171.3])  # one rare value left out
    assert support == sorted(set(inches.tolist()))
    assert share == pytest.approx(len(inches) / (len(inches) + 1))
    np.testing.assert_allclose(weights, np.full(len(support), 1 / len(support)))
    assert frequent_values(np.random.default_rng(0).normal(size=500)) is None
    # Heaped values: 60 % on round kilograms, the rest continuous, are snapped 60 % of the time.
    rng = np.random.default_rng(0)
    heaped = np.r_[np.repeat([60.0, 70.0, 80.0], 200), np.round(rng.uniform(50, 90, 400), 2)]
    heaps, heaped_share, _ = frequent_values(heaped)
    assert heaps == [60.0, 70.0, 80.0] and heaped_share == pytest.approx(0.6, abs=0.01)
    snapped = snap(np.array([152.5, 170.0, 175.0, 240.0]), support)
    np.testing.assert_allclose(snapped[:3], [152.4, 170.2, 175.3])
    assert snapped[3] == 240.0  # far outside the frequent values: left alone


def test_a_seed_gives_the_same_static_values_in_every_process(tmp_path) -> None:
    """Snapping draws for two gridded static columns are taken in schema order. Taken in the
    order of a set of names, they followed the process's string hashing: the same seed gave
    other weights and heights in another Python process."""
    simulated = simulate_cohort(120, seed=1)
    rng = np.random.default_rng(0)
    static = simulated.static.copy()
    static["Weight"] = rng.choice([60.0, 70.0, 80.0, 90.0], len(static)) + np.where(
        rng.random(len(static)) < 0.3, np.round(rng.normal(0, 3, len(static)), 1), 0.0
    )
    static["Height"] = np.round(rng.normal(170, 10, len(static)))
    schema = simulated.schema
    columns = [schema[n] for n in schema.static_columns] + [
        ColumnSchema("Weight", "numeric", "static", lower=30, upper=200),
        ColumnSchema("Height", "numeric", "static", lower=120, upper=220),
    ]
    columns += [schema[v] for v in schema.temporal_columns]
    cohort = Cohort(static, simulated.events, Schema(columns, schema.id_column))
    synth = tiny(seed=0, epochs=1).fit(cohort)
    assert {"Weight", "Height"} <= set(synth.facts_["static_resolution"]) | set(
        synth.facts_["static_support"]
    )
    path = tmp_path / "model.synthmed"
    synth.save(path)
    code = (
        "import sys; from synthmed.models.persistence import load_synthesizer; "
        "s = load_synthesizer(sys.argv[1]).sample(200, seed=3).static; "
        "print(s[['Weight', 'Height']].to_csv())"
    )
    outputs = set()
    for hash_seed in ("0", "1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_window_end_feature_sharpens_towards_the_end_of_the_window() -> None:
    """The stop head must tell hour 47 of a 48-hour window from hour 46: the time since
    admission alone differs by 1/48 there. The last input is exp(-time left / gap scale)."""
    args = {"gap_scale": 1.0, "time_scale": 48.0, "length_scale": 64.0}
    features = StepFeatures(3, 1, [], device=torch.device("cpu"), max_time=48.0, **args)
    features.update(
        torch.tensor([46.0, 47.0, 48.0]),
        torch.ones(3, 1, dtype=torch.bool),
        torch.zeros(3, 1),
        torch.zeros((3, 0), dtype=torch.int64),
    )
    np.testing.assert_allclose(features.inputs()[:, -1], np.exp([-2.0, -1.0, 0.0]), rtol=1e-6)
    assert features.inputs().shape[1] == StepFeatures.size(1, [])
    without = StepFeatures(3, 1, [], device=torch.device("cpu"), **args)
    assert (without.inputs()[:, -1] == 0).all()


def test_within_stay_spread_counts_patients_observed_twice_inside_their_stay() -> None:
    nan = np.nan
    values = np.array(
        [
            [[1.0, 5.0], [3.0, nan], [nan, nan], [100.0, 100.0]],  # step 4 lies past the stay
            [[2.0, nan], [2.0, 7.0], [8.0, nan], [nan, nan]],
        ]
    )
    spread = within_stay_spread(values, np.array([3, 4]))
    # variable 0: patients' SDs 1 (1, 3) and sqrt(8) (2, 2, 8); variable 1: nobody twice.
    np.testing.assert_allclose(spread[0], (1.0 + math.sqrt(8.0)) / 2)
    assert np.isnan(spread[1])


def test_match_temperature_finds_the_factor_that_matches_the_spread() -> None:
    base = np.array([2.0, 1.0, 4.0, 3.0])
    target = np.array([1.6, 1.2, np.nan, 3.0])

    def generate(temperature: np.ndarray) -> np.ndarray:
        return base * temperature**0.9  # the spread grows a little slower than the noise

    temperature = match_temperature(target, generate)
    np.testing.assert_allclose(generate(temperature)[[0, 1, 3]], target[[0, 1, 3]], rtol=0.02)
    assert temperature[2] == 1.0  # no target: left alone


def test_matched_variability_brings_generated_stays_to_the_training_spread(
    synth: LSTMSynthesizer, cohort: Cohort
) -> None:
    """The tiny, briefly trained model generates stays whose values move far more or less than
    the training stays; the matched temperatures bring the spread to the training one."""
    unmatched = tiny(seed=0, match_variability=False).fit(cohort)
    assert set(unmatched.value_temperature_.values()) == {1.0}
    assert set(synth.value_temperature_) == set(synth.facts_["numeric_variables"])
    assert any(abs(t - 1.0) > 0.05 for t in synth.value_temperature_.values())
    arrays = cohort.arrays
    target = within_stay_spread(arrays.values, arrays.lengths)

    def error(model: LSTMSynthesizer) -> float:
        out = model.sample(400, seed=3).arrays
        return float(np.nanmean(np.abs(within_stay_spread(out.values, out.lengths) / target - 1)))

    assert error(synth) < 0.1 < error(unmatched)


def _coded(draws: np.ndarray, support: list[float], weights: list[float]) -> np.ndarray:
    """``draws`` (recorded units, bounds 0-300) through a one-variable ``ValueCodec`` that snaps
    to ``support`` with cells weighted by ``weights``."""
    codec = ValueCodec(
        [False],
        [0],
        [1],
        [0],
        [300],
        [0.0],
        [support],
        torch.device("cpu"),
        support_weights=[weights],
    )
    return codec.from_z(torch.tensor(draws[:, None], dtype=torch.float32))[:, 0].numpy()


def test_snapping_cells_follow_the_support_weights() -> None:
    """Hourly means of a heart rate: whole beats 94 % of the time, halves 6 %. A smooth draw
    must land on them in those shares, not one half each (which told synthetic patients from
    real ones on the hourly grid)."""
    _, _, weights = frequent_values(np.repeat([1.0, 2.0, 3.0], [300, 100, 100]))
    np.testing.assert_allclose(weights, [0.6, 0.2, 0.2])
    whole, halves = np.arange(60.0, 121.0), np.arange(60.5, 120.0)
    support = np.sort(np.r_[whole, halves]).tolist()
    weights = [0.94 / len(whole) if v % 1 == 0 else 0.06 / len(halves) for v in support]
    draws = np.random.default_rng(0).uniform(70, 110, 20_000)
    coded = _coded(draws, support, weights)
    for snapped in (snap(draws, support, weights=weights), coded.astype(np.float64)):
        assert np.isin(snapped, support).all()
        assert np.mean(snapped % 1 == 0.5) == pytest.approx(0.06, abs=0.01)
    # Without weights: the nearest value, so halves take half of the draws.
    assert np.mean(snap(draws, support) % 1 == 0.5) == pytest.approx(0.5, abs=0.02)


def test_values_in_a_gap_of_the_frequent_values_keep_their_own_value() -> None:
    """Recorded diastolic pressures: a 0 now and then (an artefact), then nothing below 31. The
    0's weighted cell reached up to 15 mmHg, and generated values anywhere in between became 0
    (3 % of them, against 0.3 % of recorded values). Values are moved onto a frequent value only
    from within two median spacings of the support."""
    support = [0.0, *np.arange(31.0, 121.0).tolist()]
    weights = [0.05] + [0.95 / 90] * 90
    draws = np.array([0.4, 1.5, 5.0, 12.0, 28.0, 29.5, 31.3, 64.6])
    expected = [0.0, 0.0, 5.0, 12.0, 28.0, 31.0, 31.0, 65.0]
    coded = _coded(draws, support, weights)
    np.testing.assert_allclose(snap(draws, support, weights=weights), expected)
    np.testing.assert_allclose(coded, expected, atol=1e-5)


def test_codec_snaps_like_its_numpy_twin() -> None:
    support = [list(np.round(np.arange(60, 76) * 2.54, 1)), None]
    codec = ValueCodec(
        [False, False], [0, 0], [1, 1], [0, 0], [500, 500], [0.1, 1.0], support, torch.device("cpu")
    )
    x = np.round(np.random.default_rng(0).uniform(140, 200, 1000), 1)
    out = codec.from_z(torch.tensor(np.stack([x, x], 1), dtype=torch.float32)).numpy()
    expected = snap(x, support[0])
    inside = (x > 150) & (x < 192)
    assert np.isin(np.round(out[inside, 0].astype(np.float64), 1), support[0]).all()
    # Same value, or a tie between two equally near support values.
    np.testing.assert_allclose(np.abs(out[:, 0] - x), np.abs(expected - x), atol=1e-4)
    np.testing.assert_allclose(out[:, 1], np.round(x))


def test_config_accepts_a_dict_of_fields() -> None:
    synth = LSTMSynthesizer(config={"hidden_size": 8})
    assert synth.config == LSTMConfig(hidden_size=8)
    assert synth.get_params()["config"]["hidden_size"] == 8


def test_resumed_training_matches_an_uninterrupted_one(cohort: Cohort, tmp_path, monkeypatch):
    small = cohort.subset(cohort.ids[:60])
    uninterrupted = tiny(epochs=3, seed=2).fit(small)
    original = LSTMSynthesizer._validation_loss
    calls = []

    def crash_in_epoch_2(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return original(self, *args)

    monkeypatch.setattr(LSTMSynthesizer, "_validation_loss", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny(epochs=3, seed=2).fit(small, checkpoint_dir=tmp_path)
    monkeypatch.setattr(LSTMSynthesizer, "_validation_loss", original)
    resumed = tiny(epochs=3, seed=2).fit(small, checkpoint_dir=tmp_path, resume=True)
    columns = ["epoch", "train_loss", "val_loss"]
    pd.testing.assert_frame_equal(resumed.history_[columns], uninterrupted.history_[columns])
    assert_same(resumed.sample(10, seed=0), uninterrupted.sample(10, seed=0))


def test_a_categorical_temporal_variable_is_generated_with_its_categories() -> None:
    simulated = simulate_cohort(100, seed=3)
    long = simulated.to_long()
    heart = long["HR"].to_numpy()
    rhythm = np.where(heart > 100, "tachy", np.where(heart < 70, "brady", "normal"))
    long["Rhythm"] = pd.Series(rhythm, dtype=object).where(long["HR"].notna())
    cohort = Cohort.from_long(
        long,
        simulated.id_column,
        simulated.time_column,
        static=["Age", "Gender", "ICUType"],
        outcomes=["In-hospital_death"],
    )
    synth = tiny(seed=0).fit(cohort)
    assert synth.facts_["categorical_variables"] == ["Rhythm"]
    events = synth.sample(300, seed=1).events
    drawn = events["Rhythm"].dropna()
    # Every category of training is drawn, at about the training's observation rate.
    assert set(drawn) == {"tachy", "brady", "normal"}
    observed_share = events["Rhythm"].notna().mean()
    real_share = cohort.events["Rhythm"].notna().mean()
    assert 0.3 * real_share < observed_share < min(1.0, 3 * real_share)


@pytest.fixture(scope="module")
def plain_synth(cohort: Cohort) -> LSTMSynthesizer:
    """Neither the value head's level inputs nor charted flags."""
    config = dataclasses.replace(TINY, value_reads_levels=False, charted_flags=False)
    return tiny(seed=0, config=config).fit(cohort)


@pytest.mark.parametrize("model", ["synth", "plain_synth"])
def test_sampler_sees_what_training_sees(model: str, request: pytest.FixtureRequest) -> None:
    """Replaying a generated sequence through the training path gives the very distributions
    the step-by-step sampler drew it from (same features, same state, same heads), with and
    without the value head reading the levels and the charted flags."""
    synth = request.getfixturevalue(model)
    net = synth.network_.sequence
    assert net.n_level_inputs == (2 * net.n_numeric if model == "synth" else 0)
    sampler = synth._sampler
    seen: dict[str, list[torch.Tensor]] = {
        "gap": [],
        "mask": [],
        "value": [],
        "anchor": [],
        "flag": [],
        "flags": [],
    }
    heads = {"gap": net.gap_head, "mask": net.mask_head, "value": net.value_head}
    if net.n_flags:
        heads["flag"] = net.flag_head
    originals = {name: head.sample for name, head in heads.items()}

    def recording(name):
        def sample(raw, generator, *extra):
            seen[name].append(raw.clone())
            if name == "value":
                seen["anchor"].append(extra[0].clone())
            drawn = originals[name](raw, generator, *extra)
            if name == "flag":
                seen["flags"].append(drawn.float())
            return drawn

        return sample

    static = torch.as_tensor(synth.static_encoder_.transform(synth.sample(1, seed=4).static))
    try:
        for name, head in heads.items():
            head.sample = recording(name)
        times, values, codes, mask, lengths = sampler.sample(
            static, torch.Generator().manual_seed(0), synth.max_length_, synth.max_time_
        )
    finally:
        for name, head in heads.items():
            head.sample = originals[name]
    steps = int(lengths[0])
    assert steps > 3
    gaps = torch.diff(times[0, :steps], prepend=torch.zeros(1))
    z = synth._codec.to_z(values[0, :steps])
    features = StepFeatures(
        1, net.n_numeric, [], device=torch.device("cpu"), **sampler.feature_args
    )
    inputs = []
    for t in range(steps):
        inputs.append(features.inputs())
        features.update(gaps[t : t + 1], mask[0, t : t + 1], z[t : t + 1], codes[0, t : t + 1])
    flags = seen["flags"][0] if net.n_flags else None
    assert (flags is not None) == (model == "synth")
    if flags is not None:  # a variable without its flag is never observed
        assert not (mask[0, :steps] & (flags[0] == 0)).any()
    with torch.no_grad():
        condition = net.conditioning(static, flags)
        x = torch.cat([torch.cat(inputs), condition.expand(steps, -1)], dim=1)[None]
        out, _ = net.lstm(x, net.initial_state(condition))
        hidden = torch.cat([out[0], gap_features(gaps, net.gap_scale)], dim=1)
        expected = {
            "gap": net.out(out[0])[:, 1:],
            "mask": net.mask_raw(net.mask_net(hidden), flags),
            "value": net.value_net(
                torch.cat(
                    [hidden, mask[0, :steps].float(), torch.cat(inputs)[:, : net.n_level_inputs]],
                    dim=1,
                )
            ),
        }
    expected["anchor"] = torch.cat(inputs)[:, : net.n_numeric]  # last observed values
    if flags is not None:
        expected["flag"] = net.flag_net(static).expand(steps, -1)
        seen["flag"] = seen["flag"] * steps
    for name in expected:
        drawn = torch.cat(seen[name][:steps])
        torch.testing.assert_close(drawn, expected[name], atol=1e-4, rtol=1e-4)


def _as_written_before(synth: LSTMSynthesizer, setting: str, tmp_path) -> LSTMSynthesizer:
    """``synth`` saved and loaded again from a file without ``setting``, as files were written
    before the setting existed."""
    model_type, config, tensors = read_model_file(synth.save(tmp_path / "new.synthmed"))
    del config["state"]["config"][setting]
    save_model_file(tmp_path / "old.synthmed", model_type, config, tensors)
    return load_synthesizer(tmp_path / "old.synthmed")


def test_files_from_before_value_reads_levels_load_with_the_levels_read(
    synth: LSTMSynthesizer, tmp_path
) -> None:
    old = _as_written_before(synth, "value_reads_levels", tmp_path)
    assert old.config_.value_reads_levels
    assert_same(old.sample(20, seed=3), synth.sample(20, seed=3))
    with pytest.raises(ValueError, match="value_reads_levels"):
        LSTMConfig(value_reads_levels=1)


def test_files_from_before_charted_flags_load_without_them(
    plain_synth: LSTMSynthesizer, tmp_path
) -> None:
    old = _as_written_before(plain_synth, "charted_flags", tmp_path)
    assert old.config_.charted_flags is False
    assert_same(old.sample(20, seed=3), plain_synth.sample(20, seed=3))
    with pytest.raises(ValueError, match="charted_flags"):
        LSTMConfig(charted_flags="yes")


@pytest.mark.parametrize("flags", [True, False])
def test_charted_flags_keep_a_variable_to_the_patients_that_have_it(flags: bool) -> None:
    """Half the patients never have SaO2 (no blood gases), the others at most steps. With
    charted flags the share of generated patients with any SaO2 stays near a half; drawn step
    by step without them, nearly every long stay picks some up."""
    simulated = simulate_cohort(300, seed=2)
    without = simulated.static.index[::2]
    events = simulated.events.copy()
    events.loc[events[simulated.schema.id_column].isin(without), "SaO2"] = np.nan
    events = events[events[simulated.schema.temporal_columns].notna().any(axis=1)]
    cohort = Cohort(simulated.static, events, simulated.schema)
    config = dataclasses.replace(TINY, charted_flags=flags)
    synth = tiny(config=config, epochs=20, seed=0).fit(cohort)
    arrays = synth.sample(300, seed=1).arrays
    has = arrays.mask[:, :, arrays.variables.index("SaO2")].any(axis=1)
    real = cohort.arrays.mask[:, :, cohort.arrays.variables.index("SaO2")].any(axis=1)
    assert 0.4 < real.mean() < 0.55
    if flags:
        assert abs(has.mean() - real.mean()) < 0.15
    else:
        assert has.mean() > real.mean() + 0.15


def _with_static_column(cohort: Cohort, column: ColumnSchema, values: np.ndarray) -> Cohort:
    schema = cohort.schema
    columns = [schema[c] for c in schema.static_columns] + [column]
    columns += [schema[v] for v in schema.temporal_columns]
    static = cohort.static.assign(**{column.name: values})
    return Cohort(static, cohort.events, Schema(columns, schema.id_column))


def test_a_long_tailed_static_column_is_generated_in_log_space(tmp_path) -> None:
    # Days in hospital: most stays short, a few in the hundreds. Scored as standardised numbers,
    # the static model reached the tail by stretching the bulk, and the draws clipped at 0 days
    # piled up there (PhysioNet 2012: a sixth of generated survival times were 0 days).
    simulated = simulate_cohort(300, seed=2)
    days = np.random.default_rng(0).lognormal(2.3, 1.0, simulated.n_patients).round()
    stay = ColumnSchema("Length_of_stay", "numeric", "static", "days", 0.0, 400.0, integer=True)
    cohort = _with_static_column(simulated, stay, days)
    config = dataclasses.replace(TINY, static_hidden=32, static_components=3)
    # Two fits: the share at 0-1 days varies from fit to fit (0.03-0.07 on a log scale).
    fits = [tiny(epochs=1, config=config, seed=seed).fit(cohort) for seed in (0, 1)]
    synth = fits[0]
    assert synth.static_encoder_.columns_["Length_of_stay"]["log"]
    drawn = [fit.sample(2000, seed=0).static["Length_of_stay"] for fit in fits]
    for days_drawn in drawn:
        np.testing.assert_array_equal(days_drawn, days_drawn.round())
        assert days_drawn.min() >= 0
        assert abs(days_drawn.median() / np.median(days) - 1) < 0.25
    assert np.mean([(d <= 1).mean() for d in drawn]) < 0.06  # real: 3.7 %
    loaded = load_synthesizer(synth.save(tmp_path / "days.synthmed"))
    assert_same(loaded.sample(30, seed=1), synth.sample(30, seed=1))


def test_static_numbers_stay_inside_the_range_of_the_training_values() -> None:
    # Ages above 89 are recorded as 90 in PhysioNet 2012; a smooth density spills past them.
    simulated = simulate_cohort(300, seed=4)
    static = simulated.static.copy()
    static["Age"] = np.minimum(static["Age"], np.quantile(static["Age"], 0.8))
    cohort = Cohort(static, simulated.events, simulated.schema)
    synth = tiny(epochs=1).fit(cohort)
    drawn = synth.sample(2000, seed=0).static["Age"]
    ages = np.sort(static["Age"].to_numpy())
    assert drawn.max() == ages[-1] and drawn.min() >= ages[4]
    assert (drawn == ages[-1]).mean() > 0.1  # real: a fifth


def test_static_dequantisation_cells_narrow_on_the_log_scale() -> None:
    from synthmed.models.lstm import _dequantize_widths
    from synthmed.models.transforms import StaticEncoder

    simulated = simulate_cohort(200, seed=0)
    days = np.random.default_rng(0).lognormal(2.3, 1.0, simulated.n_patients).round()
    stay = ColumnSchema("Length_of_stay", "numeric", "static", "days", 0.0, 400.0, integer=True)
    cohort = _with_static_column(simulated, stay, days)
    encoder = StaticEncoder().fit(cohort.static, cohort.schema, log_skewed=True)
    values = np.array([0.0, 1.0, 10.0, 100.0, np.nan])
    widths = _dequantize_widths(encoder, "Length_of_stay", values, 1.0)
    scale = encoder.columns_["Length_of_stay"]["scale"]
    np.testing.assert_allclose(
        widths[:4] * scale, np.log([1.5, 2.5 / 1.5, 11.5 / 10.5, 101.5 / 100.5])
    )
    assert widths[4] == widths[0]  # missing: taken as 0, its noise is never used
    linear = _dequantize_widths(encoder, "Age", np.array([20.0, 80.0]), 1.0)
    np.testing.assert_allclose(linear, 1.0 / encoder.columns_["Age"]["scale"])
