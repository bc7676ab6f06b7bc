"""CGANSynthesizer: fit/sample, validity, seeds, conditions, persistence, DP seam, bad input."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from synthmed import Cohort, Schema, load_synthesizer
from synthmed.datasets import simulate_cohort
from synthmed.errors import DataError, ModelFileError, NotFittedError, SchemaError
from synthmed.models import cgan as cgan_module
from synthmed.models.cgan import (
    HISTORY_COLUMNS,
    CGANConfig,
    CGANSynthesizer,
    _merge_equal_times,
)
from synthmed.models.cgan_networks import (
    SINCE_BUCKETS,
    STEP_PREFIX,
    Critic,
    Head,
    SequenceGenerator,
    summaries,
    summary_parts,
)
from synthmed.models.persistence import read_model_file, save_model_file
from synthmed.models.privacy import PrivacyWarning, privacy_details
from synthmed.models.private_summary import PRIVATE_MAX_STEPS, release_summary

TINY = CGANConfig(
    static_noise_dim=4,
    static_hidden=16,
    static_layers=1,
    sequence_noise_dim=4,
    lstm_hidden=16,
    steps_per_cell=4,
    step_embedding=2,
    critic_hidden=16,
    critic_layers=1,
)


def tiny(**settings) -> CGANSynthesizer:
    defaults = dict(epochs=2, batch_size=32, seed=0, device="cpu", verbose=False, config=TINY)
    return CGANSynthesizer(**{**defaults, **settings})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks gain nothing from threads, and on a busy machine threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    """The simulated cohort with its static columns out of alphabetical order (model files sort
    JSON keys, so a layout that followed key order would break on reload)."""
    simulated = simulate_cohort(80, seed=0)
    order = ["In-hospital_death", "ICUType", "Gender", "Age"]
    schema = simulated.schema
    columns = [schema[name] for name in order] + [schema[v] for v in schema.temporal_columns]
    reordered = Schema(columns, schema.id_column, schema.time_column, schema.time_unit)
    return Cohort(simulated.static[order], simulated.events, reordered, simulated.metadata)


@pytest.fixture(scope="module")
def fitted(cohort) -> CGANSynthesizer:
    return tiny(epochs=3).fit(cohort)


@pytest.fixture(scope="module")
def synthetic(fitted) -> Cohort:
    return fitted.sample(200, seed=1)


@pytest.fixture(scope="module")
def ragged() -> Cohort:
    """Static values missing, a patient without events, a categorical temporal variable."""
    rng = np.random.default_rng(3)
    n = 40
    static = pd.DataFrame(
        {
            "Age": np.where(rng.random(n) < 0.3, np.nan, rng.integers(20, 90, n).astype(float)),
            "Unit": rng.choice(["med", "surg", "card"], n),
            "death": rng.integers(0, 2, n),
        },
        index=pd.Index([f"p{i}" for i in range(n)], name="patient_id"),
    )
    rows = []
    for pid in static.index[1:]:
        for t in np.sort(rng.uniform(0, 24, rng.integers(1, 12))):
            rows.append(
                {
                    "patient_id": pid,
                    "time": round(float(t), 2),
                    "HR": rng.normal(85, 12) if rng.random() < 0.8 else np.nan,
                    "Vent": rng.choice(["on", "off"]) if rng.random() < 0.5 else None,
                }
            )
    events = pd.DataFrame(rows)
    events.loc[events["HR"].isna() & events["Vent"].isna(), "HR"] = 80.0
    cohort = Cohort(static, events)
    return Cohort(
        cohort.static, cohort.events, cohort.schema.with_column("HR", lower=40.0, upper=130.0)
    )


@pytest.fixture(scope="module")
def hourly() -> Cohort:
    """Heart rates like hourly means: whole beats 88 %, halves 10 %, thirds 2 % (too rare to
    count as frequent values), inside bounds that lie off every grid."""
    simulated = simulate_cohort(80, seed=0)
    events = simulated.events.copy()
    rng = np.random.default_rng(0)
    kind = rng.choice(3, size=len(events), p=[0.88, 0.10, 0.02])
    events["HR"] = np.round(80 + (events["HR"] - 80) / 3) + np.array([0.0, 0.5, 1 / 3])[kind]
    schema = simulated.schema.with_column("HR", lower=60.2, upper=110.2)
    return Cohort(simulated.static, events, schema, simulated.metadata)


@pytest.fixture(scope="module")
def hourly_model(hourly) -> CGANSynthesizer:
    return tiny(epochs=3).fit(hourly)


# -- fit and sample --------------------------------------------------------------------------------


def test_sample_is_a_valid_varied_cohort(fitted, synthetic, cohort):
    assert isinstance(synthetic, Cohort)
    assert synthetic.n_patients == 200
    assert synthetic.schema == cohort.schema
    arrays = synthetic.arrays
    assert len(np.unique(arrays.lengths)) > 5, "sequence lengths should vary"
    inside = arrays.step_mask
    rates = arrays.mask[inside].mean(axis=0)
    assert (rates > 0).all() and (rates < 1).any(), "every variable observed, not always"
    assert arrays.mask[inside].any(axis=1).all(), "no empty step is emitted"
    assert len({tuple(row) for row in arrays.mask[inside][:500]}) > 3, "masks should vary"
    gaps = np.diff(arrays.times, axis=1)[inside[:, 1:]]
    assert (gaps >= 0).all()
    assert arrays.times[inside].min() >= 0
    assert arrays.times[inside].max() <= fitted.layout_.time_max + 1e-6


def test_values_honour_schema_bounds_and_integers(synthetic):
    schema = synthetic.schema
    for name in synthetic.variables:
        values = synthetic.events[name].dropna()
        assert values.min() >= schema[name].lower and values.max() <= schema[name].upper, name
    age = synthetic.static["Age"]
    assert (age == age.round()).all()
    assert age.between(schema["Age"].lower, schema["Age"].upper).all()


def test_tight_bounds_and_ragged_data_are_honoured(ragged):
    model = tiny(epochs=2, batch_size=16).fit(ragged)
    out = model.sample(150, seed=0)
    hr = out.events["HR"].dropna()
    assert hr.between(40.0, 130.0).all()
    assert set(out.events["Vent"].dropna()) <= {"on", "off"}
    assert out.events["Vent"].notna().any()
    assert set(out.static["Unit"]) <= {"med", "surg", "card"}


def test_times_keep_the_training_resolution_without_duplicates(fitted, synthetic):
    assert fitted.layout_.time_resolution == 1 / 60  # measured as 0.01666666666666661
    assert not fitted.layout_.slots  # 48 hours of minutes are far more slots than steps
    times = synthetic.events["time"].to_numpy()
    # The very floats of the training times (k / 60): a sum of rounded gaps drifted off them
    # by up to 3e-12, which told every generated stay's end from a real one.
    np.testing.assert_array_equal(times, np.round(times * 60) / 60)
    assert not synthetic.events.duplicated([synthetic.id_column, "time"]).any()


def test_value_grids_are_learnt_from_the_recorded_values(fitted, hourly_model):
    grids = fitted.layout_.grids
    assert grids["HR"]["resolution"] == 1.0 and grids["Age"]["resolution"] == 1.0
    assert grids["Temp"]["resolution"] == pytest.approx(0.1)
    hr = hourly_model.layout_.grids["HR"]
    assert hr["resolution"] == 0.0, "thirds lie on no decimal grid"
    support, weights = np.array(hr["support"]), np.array(hr["weights"])
    assert set(support % 1) == {0.0, 0.5}, "thirds are too rare to be frequent values"
    assert hr["share"] == pytest.approx(0.95, abs=0.02)
    assert weights[support % 1 == 0.5].sum() == pytest.approx(0.10 / 0.98, abs=0.03)


def test_sampled_values_lie_where_recorded_values_lie(hourly_model):
    out = hourly_model.sample(300, seed=0)
    grid = hourly_model.layout_.grids["HR"]
    hr = out.events["HR"].dropna().to_numpy(dtype=np.float64)
    assert hr.min() >= 60.2 and hr.max() <= 110.2
    # Snapped with the share of training values on the support, the rest left as generated.
    assert np.isin(hr, grid["support"]).mean() == pytest.approx(grid["share"], abs=0.03)
    temp = out.events["Temp"].dropna().to_numpy(dtype=np.float64) * 10
    np.testing.assert_allclose(temp, np.round(temp), atol=1e-4)
    age = out.static["Age"].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(age, np.round(age))


def test_snapping_follows_how_often_each_value_was_recorded(hourly_model):
    """Smoothly spread values land on whole beats and halves in the training shares, not on
    the nearest value (halves would take half of them)."""
    draws = np.random.default_rng(0).uniform(74, 85, 20_000)  # inside the support
    layout, grid = hourly_model.layout_, hourly_model.layout_.grids["HR"]
    placed = layout.to_grid("HR", draws, torch.Generator().manual_seed(0))
    on_support = np.isin(placed, grid["support"])
    assert on_support.mean() == pytest.approx(grid["share"], abs=0.01)
    assert np.mean(placed[on_support] % 1 == 0.5) == pytest.approx(0.10, abs=0.03)
    np.testing.assert_array_equal(placed[~on_support], draws[~on_support])


def test_values_are_never_moved_outside_the_bounds(hourly_model):
    grids = {
        "HR": {"resolution": 0.0, "support": [60.0, 61.0], "share": 1.0, "weights": [0.5, 0.5]},
        "Temp": {"resolution": 1.0},
    }
    layout = dataclasses.replace(hourly_model.layout_, grids=grids)
    noise = torch.Generator().manual_seed(0)
    hr = layout.to_grid("HR", np.array([60.3, 60.9, np.nan]), noise)
    np.testing.assert_array_equal(hr, [60.2, 61.0, np.nan])  # 60.0 would cross the bound
    temp = layout.to_grid("Temp", np.array([20.0, 44.8, 37.3]), noise)
    np.testing.assert_array_equal(temp, [20.0, 45.0, 37.0])


def test_gaps_not_times_are_rounded_to_the_time_resolution(fitted, cohort):
    """Gaps of 1.3 hours on an hourly grid are one hour each: rounding the times instead
    (0.2, 1.5, 2.8, 4.1, 5.4 to 0, 2, 3, 4, 5) left hour 1 empty."""
    layout = dataclasses.replace(fitted.layout_, time_resolution=1.0)
    steps = layout.encode_steps(cohort.subset(cohort.ids[:1]))[:, :5].clone()
    steps[0, :, 1] = torch.tensor([0.2, 1.5, 2.8, 4.1, 5.4]) / layout.time_max
    steps[0, :, 2] = 1.0
    steps[0, :, STEP_PREFIX] = 1.0  # every step observes the first variable
    times, _, lengths = layout.decode_steps(steps)
    assert lengths.tolist() == [5]
    np.testing.assert_allclose(times[0], [0.0, 1.0, 2.0, 3.0, 4.0])


@pytest.fixture(scope="module")
def on_the_hour(cohort) -> Cohort:
    """The simulated stays on an hourly grid (each hour's values averaged), as the PhysioNet
    loader's ``resample="1h"`` gives them."""
    events = cohort.events.copy()
    events["time"] = np.floor(events["time"])
    events = events.groupby([cohort.id_column, "time"], as_index=False).mean()
    return Cohort(cohort.static, events, cohort.schema, cohort.metadata)


def test_a_cohort_on_a_time_grid_is_generated_slot_by_slot(on_the_hour):
    """Every hour of the window is a step that holds observations or not: generated times lie
    on the grid inside the window, and stays are not cut short by a generated end."""
    model = tiny(epochs=2).fit(on_the_hour)
    assert model.generator_.sequence.since_logits.any(), "observation schedules are learnt"
    layout = model.layout_
    last = on_the_hour.arrays.times[on_the_hour.arrays.step_mask].max()
    assert layout.slots and layout.time_resolution == 1.0 and layout.time_max == last
    assert layout.n_steps == int(last) + 1
    real = on_the_hour.arrays
    times, values, lengths = layout.decode_steps(layout.encode_steps(on_the_hour))
    np.testing.assert_array_equal(lengths, real.lengths)
    np.testing.assert_array_equal(
        times[:, : real.max_length][real.step_mask], real.times[real.step_mask]
    )
    np.testing.assert_allclose(
        values[:, : real.max_length][real.mask], real.values[real.mask], rtol=1e-4
    )
    synthetic = model.sample(100, seed=0)
    generated = synthetic.events["time"].to_numpy()
    np.testing.assert_array_equal(generated, np.round(generated))
    assert generated.min() >= 0 and generated.max() <= last
    assert not synthetic.events.duplicated([synthetic.id_column, "time"]).any()
    # The generator starts with most slots observed, as most hours of a stay are.
    assert synthetic.arrays.lengths.mean() > 0.5 * layout.n_steps


def test_a_declared_grid_and_window_give_slots_under_dp(on_the_hour):
    """The slots come from the settings alone, so max_steps left unset needs no warning."""
    config = dataclasses.replace(TINY, max_time=30.0, time_grid=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)
        model = tiny(epochs=1, epsilon=5.0, config=config).fit(on_the_hour)
    layout = model.layout_
    assert layout.slots and layout.n_steps == 31 and layout.time_max == 30.0
    assert not model.generator_.sequence.schedules  # see SequenceGenerator
    assert not layout.coupled_masks and not model.generator_.sequence.coupled_masks
    generated = model.sample(50, seed=0).events["time"].to_numpy()
    np.testing.assert_array_equal(generated, np.round(generated))
    assert generated.max() <= 30


def test_unset_epochs_are_chosen_by_the_time_layout(cohort, on_the_hour, monkeypatch, tmp_path):
    """epochs=None: the slot count on a time grid without DP, the event count otherwise, the
    private count under DP (all made small here), recorded in epochs_, the saved file and every
    sample's metadata."""
    monkeypatch.setattr(cgan_module, "_SLOT_EPOCHS", 3)
    monkeypatch.setattr(cgan_module, "_EPOCHS", 2)
    monkeypatch.setattr(cgan_module, "_PRIVATE_EPOCHS", 1)
    assert CGANSynthesizer().epochs is None
    slots = tiny(epochs=None).fit(on_the_hour)
    assert slots.layout_.slots and slots.epochs_ == 3 and len(slots.history_) == 3
    events = tiny(epochs=None).fit(cohort)
    assert not events.layout_.slots and events.epochs_ == 2 and len(events.history_) == 2
    config = dataclasses.replace(TINY, max_time=30.0, time_grid=1.0)
    private = tiny(epochs=None, epsilon=5.0, config=config).fit(on_the_hour)
    assert private.layout_.slots and private.epochs_ == 1
    critics = privacy_details(private)["phases"][3]  # after the summary and the moments
    assert critics["budget_fraction"] == pytest.approx(0.4) and critics["epochs"] == 1
    assert tiny(epochs=1).fit(on_the_hour).epochs_ == 1
    loaded = load_synthesizer(slots.save(tmp_path / "slots.synthmed"))
    assert loaded.epochs is None and loaded.epochs_ == 3
    assert loaded.sample(2, seed=0).metadata["epochs"] == 3


def test_times_off_a_declared_grid_are_refused_naming_the_patient(cohort):
    config = dataclasses.replace(TINY, time_grid=1.0)
    with pytest.raises(DataError, match=r"patient .* at time .* off the time grid of 1"):
        tiny(epochs=1, config=config).fit(cohort)


def test_steps_sharing_a_time_are_merged():
    times = np.array([[0.0, 1.0, 1.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.0, 0.0]])
    values = np.full((2, 5, 2), np.nan)
    values[0, :, 0] = [1, 2, 3, 4, 9]
    values[0, 1, 1] = 7
    values[1, 0, 0], values[1, 1, 1], values[1, 2, 0] = 5, 6, 8
    merged_times, merged, lengths = _merge_equal_times(times, values, np.array([4, 3]))
    assert lengths.tolist() == [3, 1]
    np.testing.assert_array_equal(merged_times[0], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(merged[0, :, 0], [1, 3, 4])
    assert merged[0, 1, 1] == 7 and np.isnan(merged[0, 0, 1])
    np.testing.assert_array_equal(merged[1, 0], [8, 6])


def test_history_has_one_finite_row_per_epoch(fitted):
    history = fitted.history_
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert np.isfinite(history.drop(columns="epoch").to_numpy()).all()
    assert (history["gradient_penalty"] >= 0).all()


def test_training_moves_the_generator(cohort):
    before = tiny(epochs=1)
    before.fit(cohort)
    after = tiny(epochs=4).fit(cohort)
    weights = [m.generator_.sequence.out.weight for m in (before, after)]
    assert not torch.equal(*weights)


def test_kept_generator_is_the_moving_average_of_its_iterates(cohort, adam_iterates):
    # Without DP the generator kept is an exponential moving average of its iterates over
    # about the last ten epochs, not its last step against a moving critic.
    # Without the extra static rounds the generator steps once per batch.
    config = dataclasses.replace(TINY, static_critic_steps=0)
    synth = tiny(epochs=3, config=config).fit(cohort)
    kept = list(synth.generator_.parameters())
    steps = [w for _, w in adam_iterates if len(w) == len(kept)]
    assert len(steps) == 3 * -(-cohort.n_patients // 32)
    decay = 1 - 1 / (10 * -(-cohort.n_patients // 32))
    average = steps[0]
    for weights in steps[1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights, strict=True)]
    for parameter, expected in zip(kept, average, strict=True):
        torch.testing.assert_close(parameter.detach(), expected)
    assert not torch.allclose(kept[-1], steps[-1][-1], atol=1e-4)


def test_checkpoint_without_the_average_resumes_from_its_generator(cohort, tmp_path):
    # Checkpoints written before the moving average was kept have no "averaged" entry: the
    # average then starts from the generator they saved, not from a fresh initialisation.
    finished = tiny(epochs=2).fit(cohort, checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert "averaged" in payload["state"]
    del payload["state"]["averaged"]
    torch.save(payload, path)
    resumed = tiny(epochs=2).fit(cohort, checkpoint_dir=tmp_path, resume=True)
    assert len(resumed.history_) == 2
    saved = payload["state"]["generator"]
    for name, weight in resumed.generator_.state_dict().items():
        torch.testing.assert_close(weight, saved[name])
    assert not all(
        torch.equal(weight, finished.generator_.state_dict()[name])
        for name, weight in saved.items()
    ), "the saved last iterate should differ from the average kept by the finished fit"


def test_steps_encoding_round_trips_real_sequences(fitted, cohort):
    layout = fitted.layout_
    times, values, lengths = layout.decode_steps(layout.encode_steps(cohort))
    arrays = cohort.arrays
    np.testing.assert_array_equal(lengths, arrays.lengths)
    width = arrays.max_length
    np.testing.assert_allclose(times[:, :width], arrays.times, atol=1e-4)
    observed = arrays.mask
    assert (np.isnan(values[:, :width]) == ~observed).all()
    np.testing.assert_allclose(values[:, :width][observed], arrays.values[observed], rtol=1e-4)


def test_critic_summaries_match_numpy(fitted, cohort):
    layout = fitted.layout_
    steps = layout.encode_steps(cohort)
    stats = summaries(steps, fitted.generator_.sequence.value_variable).numpy()
    v = len(layout.variables)
    scaled = np.where(cohort.arrays.mask, layout.scaler.transform(cohort.arrays.values), np.nan)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected_mean = np.nan_to_num(np.nanmean(scaled, axis=1))
        expected_max = np.nan_to_num(np.nanmax(scaled, axis=1))
    np.testing.assert_allclose(stats[:, :v], np.log1p(cohort.arrays.mask.sum(1)), rtol=1e-5)
    np.testing.assert_allclose(stats[:, 2 * v : 3 * v], expected_mean, atol=1e-4)
    np.testing.assert_allclose(stats[:, 5 * v : 6 * v], expected_max, atol=1e-4)
    # summary_parts names the same columns (here every variable is numeric: one value column).
    parts = summary_parts(torch.as_tensor(stats), v, v)
    np.testing.assert_allclose(parts.mean.numpy(), expected_mean, atol=1e-4)
    arrays = cohort.arrays
    last_step = np.maximum(arrays.lengths - 1, 0)
    end = arrays.times[np.arange(len(last_step)), last_step] / layout.time_max
    np.testing.assert_allclose(parts.end_time.numpy(), end, atol=1e-5)
    np.testing.assert_allclose(
        parts.log_length.numpy(), np.log1p(np.minimum(arrays.lengths, layout.n_steps)), rtol=1e-5
    )


# -- seeds -----------------------------------------------------------------------------------------


def _same(a: Cohort, b: Cohort) -> bool:
    try:
        pd.testing.assert_frame_equal(
            a.static.reset_index(drop=True), b.static.reset_index(drop=True)
        )
        pd.testing.assert_frame_equal(
            a.events.drop(columns=a.id_column), b.events.drop(columns=b.id_column)
        )
    except AssertionError:
        return False
    return True


def test_same_seed_same_output_different_seed_different(cohort, fitted):
    again = tiny(epochs=3).fit(cohort)
    pd.testing.assert_frame_equal(
        again.history_.drop(columns="seconds"), fitted.history_.drop(columns="seconds")
    )
    assert _same(again.sample(30, seed=7), fitted.sample(30, seed=7))
    assert not _same(fitted.sample(30, seed=7), fitted.sample(30, seed=8))
    other = tiny(epochs=3, seed=1).fit(cohort)
    assert not _same(other.sample(30, seed=7), fitted.sample(30, seed=7))


# -- conditions ------------------------------------------------------------------------------------


def test_dict_conditions_are_honoured_exactly(fitted):
    out = fitted.sample(60, conditions={"In-hospital_death": 1, "ICUType": 2, "Age": 71.5}, seed=0)
    assert (out.static["In-hospital_death"] == 1).all()
    assert (out.static["ICUType"] == 2).all()
    assert (out.static["Age"] == 71.5).all()
    assert out.static["Gender"].nunique() == 2, "free columns are drawn, not fixed"


def test_frame_conditions_are_honoured_row_by_row(fitted):
    rows = pd.DataFrame(
        {
            "Gender": [0, 1, np.nan, 1, np.nan],
            "Age": [30.0, np.nan, 85.0, 44.0, np.nan],
            "In-hospital_death": [1, 0, 1, np.nan, np.nan],
        }
    )
    out = fitted.sample(conditions=rows, seed=3)
    static = out.static.reset_index(drop=True)
    for name in rows.columns:
        given = rows[name].notna()
        assert (static.loc[given, name].astype(float) == rows.loc[given, name]).all(), name
    assert static["ICUType"].notna().all()


def test_conditions_reach_the_sequences(fitted):
    static = fitted.generator_.static
    width = fitted.layout_.encoder.width_
    assert static.net[0].in_features > width, "the static generator sees the given values"
    assert fitted.generator_.sequence.lstm[0].input_size > width, "sequences see the static vector"
    a = fitted.sample(40, conditions={"In-hospital_death": 0, "ICUType": 1}, seed=5)
    b = fitted.sample(40, conditions={"In-hospital_death": 1, "ICUType": 4}, seed=5)
    # Same seed, same noise: only the conditions differ, and they reach the free static
    # columns (drawn conditionally, not independently) and the sequences.
    assert not np.array_equal(a.static["Age"], b.static["Age"])
    assert not np.array_equal(np.nan_to_num(a.arrays.values), np.nan_to_num(b.arrays.values))


# -- persistence -----------------------------------------------------------------------------------


def test_save_load_gives_identical_samples(fitted, tmp_path):
    path = fitted.save(tmp_path / "cgan.synthmed")
    loaded = load_synthesizer(path)
    assert isinstance(loaded, CGANSynthesizer)
    assert loaded.config == fitted.config
    assert _same(loaded.sample(40, seed=11), fitted.sample(40, seed=11))
    conditioned = {"ICUType": 3}
    assert _same(
        loaded.sample(10, conditions=conditioned, seed=2),
        fitted.sample(10, conditions=conditioned, seed=2),
    )
    pd.testing.assert_frame_equal(
        loaded.history_, fitted.history_, check_dtype=False, check_like=True
    )


def test_corrupted_or_mismatched_files_raise_model_file_error(fitted, tmp_path):
    path = fitted.save(tmp_path / "cgan.synthmed")
    data = path.read_bytes()
    (tmp_path / "truncated.synthmed").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        load_synthesizer(tmp_path / "truncated.synthmed")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.synthmed").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError):
        load_synthesizer(tmp_path / "flipped.synthmed")
    # Well-formed files whose settings do not match their weights, or that lack a weight.
    model_type, config, tensors = read_model_file(path)
    config["params"]["config"]["lstm_hidden"] += 1
    save_model_file(tmp_path / "mismatch.synthmed", model_type, config, tensors)
    with pytest.raises(ModelFileError, match="CGANSynthesizer"):
        load_synthesizer(tmp_path / "mismatch.synthmed")
    config["params"]["config"]["lstm_hidden"] -= 1
    del tensors[next(iter(tensors))]
    save_model_file(tmp_path / "missing.synthmed", model_type, config, tensors)
    with pytest.raises(ModelFileError):
        load_synthesizer(tmp_path / "missing.synthmed")


def test_model_file_with_old_value_grids_is_refused(fitted, tmp_path):
    model_type, config, tensors = read_model_file(fitted.save(tmp_path / "cgan.synthmed"))
    config["state"]["layout"]["grids"]["HR"] = {"decimals": 0}
    save_model_file(tmp_path / "old.synthmed", model_type, config, tensors)
    with pytest.raises(ModelFileError, match="older format"):
        load_synthesizer(tmp_path / "old.synthmed")


def test_sample_to_streams_a_dataset(fitted, tmp_path):
    folder = fitted.sample_to(tmp_path / "out", 25, chunk_size=10, seed=4)
    back = Cohort.read_parquet(folder)
    assert back.n_patients == 25


# -- DP seam ---------------------------------------------------------------------------------------


def test_critic_and_loader_go_through_the_privacy_seam(cohort, monkeypatch):
    seen = {}

    def spy(self, module, optimizer, data_loader, epochs, budget_fraction=1.0):
        seen.update(module=module, optimizer=optimizer, loader=data_loader, epochs=epochs)
        seen["budget_fraction"] = budget_fraction
        return module, optimizer, data_loader

    monkeypatch.setattr(CGANSynthesizer, "_make_private", spy)
    tiny(epochs=1).fit(cohort)
    assert isinstance(seen["module"], Critic)
    critic_parameters = {id(p) for p in seen["module"].parameters()}
    optimised = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    assert optimised == critic_parameters
    assert len(seen["loader"].dataset) == cohort.n_patients
    assert seen["epochs"] == 1 and seen["budget_fraction"] == 1.0  # all of it without DP
    no_batchnorm = [m for m in seen["module"].modules() if "BatchNorm" in type(m).__name__]
    assert not no_batchnorm


def test_private_training_spends_at_most_the_budget_and_records_it(cohort, monkeypatch):
    released = []

    def spy(synth, data, inside, max_length, generator, **options):
        released.append((inside, max_length))
        released.append(release_summary(synth, data, inside, max_length, generator, **options))
        return released[-1]

    monkeypatch.setattr(cgan_module, "release_summary", spy)
    model = tiny(epsilon=3.0, config=dataclasses.replace(TINY, max_steps=6)).fit(cohort)
    epsilon, delta = model.privacy_spent
    assert 0 < epsilon <= 3.0 + 1e-6
    assert delta < 1 / cohort.n_patients
    assert model.sample(4).metadata["epsilon"] == epsilon
    # The value histograms, the static and patient moments, the critics, then the outcome
    # labeller, its recalibration and the outcome's prevalence (see test_privacy).
    shares = [p["budget_fraction"] for p in privacy_details(model)["phases"]]
    assert shares == pytest.approx([0.1, 0.05, 0.05, 0.4, 0.3, 0.05, 0.05])
    # The histograms cover the steps the model learns from, and the scaler is fitted on them.
    (inside, max_length), summary = released
    assert max_length == 6
    np.testing.assert_array_equal(inside[:, :6], cohort.arrays.step_mask[:, :6])
    assert not inside[:, 6:].any()
    expected = summary.value_scaler(cohort.schema)
    np.testing.assert_array_equal(model.layout_.scaler.center_, expected.center_)
    np.testing.assert_array_equal(model.layout_.scaler.scale_, expected.scale_)
    assert model.labelled_columns_ == ["In-hospital_death"]
    assert not model.generator_.sequence.schedules  # see SequenceGenerator
    # No value grid is read from the data: only the schema's integer flag counts.
    numeric = [n for n in cohort.schema.columns if cohort.schema[n].kind == "numeric"]
    expected = {n: {"resolution": 1.0 if cohort.schema[n].integer else 0.0} for n in numeric}
    assert model.layout_.grids == expected


def test_unset_steps_and_critic_width_take_private_defaults_under_dp(cohort, monkeypatch):
    """Left at None, ``max_steps`` is the longest stay without DP and 256 under DP (the data's
    longest stay would leak), and the critics are 256 wide without DP and 64 under it."""
    widths = []
    critic = cgan_module.Critic

    def spy(*args):
        widths.append(args[5])
        return critic(*args)

    monkeypatch.setattr(cgan_module, "Critic", spy)
    config = dataclasses.replace(TINY, critic_hidden=None, max_steps=None)
    public = tiny(epochs=1, config=config).fit(cohort)
    with pytest.warns(PrivacyWarning, match="CGANConfig.max_steps is not set"):
        private = tiny(epochs=1, epsilon=3.0, config=config).fit(cohort)
    assert public.layout_.n_steps == cohort.arrays.lengths.max() < PRIVATE_MAX_STEPS
    assert private.layout_.n_steps == PRIVATE_MAX_STEPS == 256
    assert widths == [256, 64]
    capped = tiny(epochs=1, config=dataclasses.replace(config, max_steps=5)).fit(cohort)
    assert capped.layout_.n_steps == 5


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps_per_cell": 0}, "steps_per_cell"),
        ({"lstm_hidden": 2.5}, "lstm_hidden"),
        ({"critic_lr": -1.0}, "critic_lr"),
        ({"gradient_penalty": float("nan")}, "gradient_penalty"),
        ({"condition_rate": 1.5}, "condition_rate"),
        ({"betas": (0.5, 1.0)}, "betas"),
        ({"time_grid": 0.0}, "time_grid"),
        ({"max_time": True}, "max_time"),
    ],
)
def test_bad_config_fails_at_construction(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def test_bad_arguments_are_refused(fitted, cohort):
    with pytest.raises(ValueError, match="config"):
        CGANSynthesizer(config={"lstm_hidden": 8})
    with pytest.raises(ValueError, match=r"epochs must be a positive integer or None"):
        CGANSynthesizer(epochs=0)
    with pytest.raises(NotFittedError):
        tiny().sample(3)
    with pytest.raises(DataError):
        tiny().fit(cohort.static)
    with pytest.raises(SchemaError):
        fitted.sample(3, conditions={"Height": 170})
    with pytest.raises(DataError):
        fitted.sample(3, conditions={"ICUType": 9})
    with pytest.raises(ValueError):
        fitted.sample(0)


def test_params_round_trip_and_repr(fitted):
    params = fitted.get_params()
    assert params["config"] == dataclasses.asdict(TINY)
    rebuilt = CGANSynthesizer(**{**params, "config": CGANConfig(**params["config"])})
    assert rebuilt.config == TINY
    assert "CGANSynthesizer(" in repr(fitted)


def test_observations_follow_the_time_since_the_last_one():
    """A variable whose logit is high only four slots after its last observation (and before
    any) is charted every fourth slot; one with a flat shift at every step is not."""
    n_variables, n_slots = 2, 16
    network = SequenceGenerator(
        static_width=1,
        n_variables=n_variables,
        value_heads=[Head("numeric", j) for j in range(n_variables)],
        n_steps=n_slots,
        steps_per_cell=4,
        noise_dim=2,
        hidden=8,
        layers=1,
        max_log_gap=3.0,
        slots=True,
        schedules=True,
    )
    with torch.no_grad():
        network.out.weight.zero_()
        network.out.bias.view(4, -1)[:, 1] = 30.0  # every slot holds observations
        network.out.bias.view(4, -1)[:, 2 : 2 + n_variables] = 0.0
        network.since_logits.fill_(-30.0)
        network.since_logits[0, [4, SINCE_BUCKETS]] = 30.0
        network.since_logits[1] = 30.0
    with torch.no_grad():  # hard 0/1 draws, without the straight-through terms
        steps = network(torch.zeros(50, 1), 1 / n_slots, torch.Generator().manual_seed(0), 0.5)
    mask = steps[..., STEP_PREFIX : STEP_PREFIX + n_variables]
    every_fourth = (torch.arange(n_slots) % 4 == 0).float()
    assert torch.equal(mask[..., 0], every_fourth.expand(50, -1))
    assert bool((mask[..., 1] == 1).all())
    # A patient whose rhythm is zero ignores the schedule: observed at every slot.
    with torch.no_grad():
        network.out.bias.view(4, -1)[:, 2 : 2 + n_variables] = 30.0
        network.scale.weight.zero_()
        network.scale.bias[-n_variables:] = -50.0  # softplus: rhythm ~ 0
        steps = network(torch.zeros(50, 1), 1 / n_slots, torch.Generator().manual_seed(0), 0.5)
    assert bool((steps[..., STEP_PREFIX] == 1).all())


def _small_sequence_generator(
    static_width: int, n_variables: int, **options: bool
) -> SequenceGenerator:
    """Raw times unless ``options`` say otherwise, three steps per LSTM step, twelve steps."""
    return SequenceGenerator(
        static_width=static_width,
        n_variables=n_variables,
        value_heads=[Head("numeric", j) for j in range(n_variables)],
        n_steps=12,
        steps_per_cell=3,
        noise_dim=4,
        hidden=8,
        layers=1,
        max_log_gap=3.0,
        **options,
    )


def test_a_variable_not_charted_for_a_patient_is_never_observed():
    torch.manual_seed(0)
    n_variables, static_width = 4, 2
    network = _small_sequence_generator(static_width, n_variables)
    charted_logits = slice(3 * n_variables + 2 + n_variables, None)
    with torch.no_grad():
        network.out.bias.view(3, -1)[:, 2 : 2 + n_variables] = 8.0  # observe whatever is charted
        network.scale.weight[charted_logits] = 0.0
        network.scale.bias[charted_logits] = torch.tensor([0.0, -30.0, 30.0, 0.0])
        # Variables 0 and 3 are charted when the first patient-noise dimension is positive.
        network.scale.weight[charted_logits][[0, 3], static_width] = 5.0
    steps = network(torch.zeros(400, 2), 0.1, torch.Generator().manual_seed(1), 0.5)
    mask, alive = steps[..., STEP_PREFIX : STEP_PREFIX + n_variables], steps[..., 2]
    ever = mask.sum(1) > 0
    charted = ever.float().mean(0)
    assert charted[1] == 0 and charted[2] > 0.95
    assert 0.4 < charted[0] < 0.6
    # Flags drawn from shared latents keep their dependence: 0 and 3 come together.
    assert torch.equal(ever[:, 0], ever[:, 3])
    # A charted variable is observed at (almost) every step of the stay.
    assert (mask[ever[:, 0], :, 0].sum(1) / alive[ever[:, 0]].sum(1)).mean() > 0.95


@pytest.mark.parametrize("slots", [False, True])
def test_coupled_masks_observe_variables_together(slots):
    """Two variables charted for everyone, each observed at half the steps: with their draws
    coupled they are observed at the same steps; uncoupled, at the same steps by chance only.
    The coupling is learnt: the straight-through masks pass it a gradient."""
    n_variables = 2
    network = _small_sequence_generator(
        1, n_variables, slots=slots, schedules=slots, coupled_masks=True
    )

    def differ(coupling: float) -> float:
        with torch.no_grad():
            network.out.weight.zero_()
            network.out.bias.view(3, -1)[:, 1] = 30.0 if slots else -30.0  # alive to the end
            network.out.bias.view(3, -1)[:, 2 : 2 + n_variables] = 0.0
            network.scale.weight.zero_()
            network.mask_coupling.fill_(coupling)
            steps = network(torch.zeros(400, 1), 0.01, torch.Generator().manual_seed(0), 0.5)
        mask = steps[..., STEP_PREFIX : STEP_PREFIX + n_variables]
        alive = steps[..., 2] > 0.5
        assert 0.4 < float(mask[..., 0][alive].mean()) < 0.6
        return float((mask[..., 0] != mask[..., 1])[alive].float().mean())

    assert differ(12.0) < 0.02
    assert 0.4 < differ(-12.0) < 0.6
    network.mask_coupling.data.fill_(0.0)
    steps = network(torch.zeros(50, 1), 0.01, torch.Generator().manual_seed(1), 0.5)
    steps[..., STEP_PREFIX : STEP_PREFIX + n_variables].prod(-1).sum().backward()
    assert bool((network.mask_coupling.grad != 0).all())


def test_masks_are_coupled_on_slots_without_dp_and_older_files_draw_them_independently(
    fitted, on_the_hour, tmp_path
):
    """Coupled on a time grid's slots (the DP case is in the test of declared grids); raw times
    keep independent draws. A file written before the coupling loads and draws as it did."""
    model = tiny(epochs=1).fit(on_the_hour)
    assert model.layout_.coupled_masks and model.generator_.sequence.coupled_masks
    assert not fitted.layout_.coupled_masks and not fitted.generator_.sequence.coupled_masks
    model_type, config, tensors = read_model_file(model.save(tmp_path / "cgan.synthmed"))
    del config["state"]["layout"]["coupled_masks"]
    del tensors["generator.sequence.mask_coupling"]
    save_model_file(tmp_path / "before.synthmed", model_type, config, tensors)
    before = load_synthesizer(tmp_path / "before.synthmed")
    assert not before.generator_.sequence.coupled_masks
    assert not _same(before.sample(40, seed=3), model.sample(40, seed=3))


def test_private_start_charts_each_variable_for_its_released_share_of_patients():
    torch.manual_seed(0)
    n_variables, static_width = 3, 2
    network = _small_sequence_generator(static_width, n_variables)
    rates, shares = torch.tensor([0.9, 0.35, 0.05]), torch.tensor([0.98, 0.7, 0.5])
    network.start_at_rates(rates, shares)
    with torch.no_grad():
        _, carry = network.start(
            torch.zeros(8000, static_width), torch.Generator().manual_seed(0), 0.5
        )
    charted = carry.patient.charted
    np.testing.assert_allclose(charted.mean(0).numpy(), shares.numpy(), atol=0.03)
    # Nested: a patient charted for a rarer variable is charted for the commoner ones.
    assert float((charted[:, 2] > charted[:, 1]).float().mean()) < 0.01
    assert float((charted[:, 1] > charted[:, 0]).float().mean()) < 0.01
    # Charted patients are observed at the rate that gives the released rate over everyone.
    logits = network.out.bias.view(3, -1)[:, 2 : 2 + n_variables]
    np.testing.assert_allclose(torch.sigmoid(logits[0]).detach(), rates / shares, atol=1e-5)


def test_a_long_tailed_static_column_is_generated_in_log_space_and_reloads(cohort, tmp_path):
    from synthmed.schema import ColumnSchema

    days = np.random.default_rng(1).lognormal(2.3, 1.0, cohort.n_patients).round()
    stay = ColumnSchema("Length_of_stay", "numeric", "static", "days", 0.0, 400.0, integer=True)
    schema = Schema(
        [*(cohort.schema[c] for c in cohort.schema.static_columns), stay]
        + [cohort.schema[v] for v in cohort.schema.temporal_columns],
        cohort.schema.id_column,
        cohort.schema.time_column,
        cohort.schema.time_unit,
    )
    skewed = Cohort(cohort.static.assign(Length_of_stay=days), cohort.events, schema)
    model = tiny(epochs=1).fit(skewed)
    encoder = model.layout_.encoder
    assert encoder.columns_["Length_of_stay"]["log"] and not encoder.columns_["Age"]["log"]
    # The generator's bounds are the declared ones on the log scale: nothing below 0 days.
    sampled = model.sample(200, seed=3).static["Length_of_stay"]
    assert sampled.min() >= 0 and sampled.max() <= 400
    np.testing.assert_array_equal(sampled, sampled.round())
    loaded = load_synthesizer(model.save(tmp_path / "skewed.synthmed"))
    assert loaded.layout_.encoder.columns_["Length_of_stay"]["log"]
    assert _same(loaded.sample(40, seed=4), model.sample(40, seed=4))
