"""The shared Synthesizer surface, exercised through a deliberately simple test model."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from synthmed import Cohort, load_synthesizer
from synthmed.errors import DataError, ModelFileError, NotFittedError, SchemaError
from synthmed.models.base import GeneratedBatch, Synthesizer, pad_steps, parse_shard
from synthmed.models.persistence import read_model_file, save_model_file


class ResampleSynthesizer(Synthesizer):
    """Draws static rows and sequence shapes from learned tensors; enough to test the base."""

    model_type = "test-resample"

    def __init__(
        self,
        *,
        epochs=1,
        batch_size=8,
        seed=0,
        device="cpu",
        verbose=False,
        epsilon=None,
        delta=None,
        max_grad_norm=1.0,
    ):
        super().__init__(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
            verbose=verbose,
            epsilon=epsilon,
            delta=delta,
            max_grad_norm=max_grad_norm,
        )

    def _fit(self, cohort, generator):
        arrays = cohort.arrays
        self.static_ = cohort.static.reset_index(drop=True)
        self.times_ = torch.tensor(arrays.times)
        self.values_ = torch.tensor(arrays.values)
        self.lengths_ = torch.tensor(arrays.lengths)
        self.history_ = pd.DataFrame({"epoch": [1], "loss": [0.0]})

    def _generate(self, conditions, generator):
        pick = torch.randint(len(self.lengths_), (len(conditions),), generator=generator).numpy()
        static = self.static_.iloc[pick].reset_index(drop=True).astype(object)
        for name in conditions.columns:
            given = conditions[name].notna().to_numpy()
            static.loc[given, name] = conditions.loc[given, name].to_numpy()
        return GeneratedBatch(
            static,
            self.times_.numpy()[pick],
            self.values_.numpy()[pick],
            self.lengths_.numpy()[pick],
        )

    def _get_state(self):
        return (
            {"static": self.static_.to_dict(orient="list")},
            {"times": self.times_, "values": self.values_, "lengths": self.lengths_},
        )

    def _set_state(self, config, tensors):
        self.static_ = pd.DataFrame(config["static"])
        self.times_, self.values_, self.lengths_ = (
            tensors[k] for k in ("times", "values", "lengths")
        )


@pytest.fixture(scope="module")
def tiny_cohort() -> Cohort:
    rng = np.random.default_rng(0)
    n = 30
    static = pd.DataFrame(
        {
            "Age": rng.uniform(20, 90, n).round(),
            "Gender": rng.integers(0, 2, n),
            "ICU": rng.choice(["med", "surg", "card"], n),
            "death": rng.integers(0, 2, n),
        },
        index=pd.Index(np.arange(100, 100 + n), name="patient_id"),
    )
    rows = []
    for pid in static.index:
        for t in np.sort(rng.uniform(0, 48, rng.integers(1, 6))):
            rows.append(
                {
                    "patient_id": pid,
                    "time": t,
                    "HR": rng.normal(80, 10),
                    "Temp": rng.normal(37, 0.5) if rng.random() < 0.5 else np.nan,
                }
            )
    return Cohort(static, pd.DataFrame(rows))


@pytest.fixture(scope="module")
def fitted(tiny_cohort):
    return ResampleSynthesizer().fit(tiny_cohort)


def test_sample_before_fit_names_the_fix():
    with pytest.raises(NotFittedError, match="fit"):
        ResampleSynthesizer().sample(3)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("epochs", 0),
        ("epochs", None),  # only a model with epochs_from_data chooses them in fit
        ("batch_size", -1),
        ("device", "tpu"),
        ("epsilon", 0),
        ("epsilon", -1.0),
        ("delta", 1.5),
        ("seed", "x"),
    ],
)
def test_bad_settings_fail_at_construction(setting, value):
    with pytest.raises(ValueError, match=setting):
        ResampleSynthesizer(**{setting: value})


def test_synthetic_ids_never_equal_real_ones(fitted, tiny_cohort):
    synthetic = fitted.sample(50)
    assert not set(synthetic.ids) & set(tiny_cohort.ids)
    assert synthetic.ids.is_unique


def test_fresh_prefix_avoids_real_ids_that_look_synthetic():
    static = pd.DataFrame({"a": [1.0, 2.0]}, index=pd.Index(["syn-00000000", "x"], name="id"))
    events = pd.DataFrame({"id": ["x"], "time": [0.0], "v": [1.0]})
    model = ResampleSynthesizer().fit(Cohort(static, events))
    assert not set(model.sample(5).ids) & {"syn-00000000", "x"}


def test_dict_and_frame_conditions_are_honoured(fitted):
    synthetic = fitted.sample(20, conditions={"ICU": "card", "death": 1})
    assert (synthetic.static["ICU"] == "card").all()
    assert (synthetic.static["death"] == 1).all()
    rows = pd.DataFrame({"Gender": [0, 1, np.nan], "Age": [30.0, np.nan, 70.0]})
    synthetic = fitted.sample(conditions=rows)
    assert synthetic.n_patients == 3
    assert synthetic.static["Gender"].iloc[:2].tolist() == [0, 1]
    assert synthetic.static["Age"].iloc[[0, 2]].tolist() == [30.0, 70.0]


def test_bad_conditions_raise_precise_errors(fitted):
    with pytest.raises(SchemaError, match="'Height'"):
        fitted.sample(3, conditions={"Height": 170})
    with pytest.raises(SchemaError, match="temporal"):
        fitted.sample(3, conditions={"HR": 80})
    with pytest.raises(DataError, match="never seen in training"):
        fitted.sample(3, conditions={"ICU": "neuro"})
    with pytest.raises(DataError, match="bounds"):
        fitted.sample(3, conditions={"Age": 500})
    with pytest.raises(ValueError, match="n=2"):
        fitted.sample(2, conditions=pd.DataFrame({"Gender": [0, 1, 0]}))
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            fitted.sample(n)


def test_seeds_reproduce_and_differ(fitted):
    a = fitted.sample(10, seed=1)
    b = fitted.sample(10, seed=1)
    c = fitted.sample(10, seed=2)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert not a.events.equals(c.events)


def test_provenance_travels_with_the_sample(fitted):
    metadata = fitted.sample(4, seed=3).metadata
    assert metadata["generator"] == "ResampleSynthesizer"
    assert metadata["seed"] == 3
    assert metadata["n_train_patients"] == 30
    assert metadata["epochs"] == fitted.epochs_ == 1
    assert "epsilon" not in metadata


def test_save_load_round_trip_samples_identically(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.synthmed")
    loaded = load_synthesizer(path)
    assert isinstance(loaded, ResampleSynthesizer)
    pd.testing.assert_frame_equal(
        loaded.sample(15, seed=9).events, fitted.sample(15, seed=9).events
    )
    assert loaded.schema_ == fitted.schema_


def test_corrupted_and_foreign_files_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.synthmed")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken = tmp_path / "broken.synthmed"
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        load_synthesizer(broken)
    truncated = tmp_path / "truncated.synthmed"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="corrupted or truncated"):
        load_synthesizer(truncated)
    with pytest.raises(ModelFileError, match="no model file"):
        load_synthesizer(tmp_path / "absent.synthmed")


def test_tampered_tensor_fails_the_checksum(tmp_path):
    path = save_model_file(tmp_path / "m", "lstm", {"a": 1}, {"w": torch.ones(3)})
    document = torch.load(path, weights_only=True)
    document["tensors"]["w"] = torch.zeros(3)
    torch.save(document, path)
    with pytest.raises(ModelFileError, match="checksum"):
        read_model_file(path)


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('/tmp/synthmed-pwned', 'w').write('x')",))


def test_pickle_bearing_file_never_runs_code(tmp_path):
    target = tmp_path / "evil.synthmed"
    torch.save({"format": "synthmed-model", "payload": _Exploit()}, target)
    with pytest.raises(ModelFileError, match="refusing"):
        load_synthesizer(target)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ModelFileError):
        load_synthesizer(plain)
    import os

    assert not os.path.exists("/tmp/synthmed-pwned")


def test_newer_format_is_refused(tmp_path):
    path = save_model_file(tmp_path / "m", "lstm", {}, {})
    document = torch.load(path, weights_only=True)
    document["format_version"] = 99
    torch.save(document, path)
    with pytest.raises(ModelFileError, match="newer"):
        read_model_file(path)


def test_sample_to_shards_union_equals_unsharded_run(fitted, tmp_path):
    whole = fitted.sample_to(tmp_path / "whole", n=25, chunk_size=4, seed=5)
    for i in range(3):
        fitted.sample_to(tmp_path / "sharded", n=25, chunk_size=4, seed=5, shard=f"{i}/3")
    full = Cohort.read_parquet(whole)
    union = Cohort.read_parquet(tmp_path / "sharded")
    assert full.n_patients == 25
    assert sorted(union.ids) == sorted(full.ids)
    pd.testing.assert_frame_equal(
        union.to_long().sort_values(["patient_id", "time"]).reset_index(drop=True),
        full.to_long().sort_values(["patient_id", "time"]).reset_index(drop=True),
    )
    assert (tmp_path / "whole" / "_manifest.json").exists()
    assert len(list((tmp_path / "sharded").glob("_manifest-*-of-3.json"))) == 3


def test_parse_shard():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "a/b", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_static_encoder_reloads_in_schema_order_whatever_the_json_key_order(tiny_cohort):
    import json

    from synthmed.models.transforms import StaticEncoder

    encoder = StaticEncoder().fit(tiny_cohort.static, tiny_cohort.schema)
    stored = json.loads(json.dumps(encoder.to_dict(), sort_keys=True))
    reloaded = StaticEncoder.from_dict(stored, tiny_cohort.schema)
    assert [b.name for b in reloaded.blocks_] == tiny_cohort.schema.static_columns
    np.testing.assert_array_equal(
        reloaded.transform(tiny_cohort.static), encoder.transform(tiny_cohort.static)
    )


def test_history_columns_keep_their_order_through_save(fitted, tmp_path):
    fitted.history_ = pd.DataFrame({"loss": [1.0], "epoch": [1]})
    loaded = load_synthesizer(fitted.save(tmp_path / "m.synthmed"))
    assert list(loaded.history_.columns) == ["loss", "epoch"]


def test_pad_steps_pads_the_step_axis_with_the_fill():
    values = np.arange(24, dtype=float).reshape(2, 3, 4)
    padded = pad_steps(values, 5, np.nan)
    assert padded.shape == (2, 5, 4)
    np.testing.assert_array_equal(padded[:, :3], values)
    assert np.isnan(padded[:, 3:]).all()
    times = pad_steps(np.ones((2, 3)), 4, 0.0)
    np.testing.assert_array_equal(times, [[1, 1, 1, 0], [1, 1, 1, 0]])
    assert pad_steps(values, 3, np.nan) is values
    assert pad_steps(values, 2, np.nan) is values


def test_static_encoder_logs_a_skewed_column_only_when_asked_and_decodes_it_back(tiny_cohort):
    from synthmed.models.transforms import StaticEncoder

    schema = tiny_cohort.schema.with_column("Age", lower=0.0, upper=1e6)
    static = tiny_cohort.static.copy()
    # A long right tail, as survival days have: most small, a few in the thousands.
    static["Age"] = np.random.default_rng(0).lognormal(3.0, 1.5, len(static)).round()
    plain = StaticEncoder().fit(static, schema)
    logged = StaticEncoder().fit(static, schema, log_skewed=True)
    private = StaticEncoder().fit(static, schema, from_bounds=True, log_skewed=True)
    assert not plain.columns_["Age"]["log"] and not private.columns_["Age"]["log"]
    assert logged.columns_["Age"]["log"]
    encoded = logged.encode_number("Age", static["Age"].to_numpy())
    assert abs(encoded.mean()) < 1e-6 and abs(encoded.std() - 1) < 1e-6
    # Decoded numbers stay inside the range the training values span.
    np.testing.assert_allclose(
        logged.inverse(logged.transform(static))["Age"], static["Age"].clip(*logged.bounds("Age"))
    )
    # A file written before the log option decodes as before.
    old = {
        "columns": {
            k: {f: v for f, v in info.items() if f != "log"}
            for k, info in plain.to_dict()["columns"].items()
        }
    }
    reloaded = StaticEncoder.from_dict(old, schema)
    np.testing.assert_array_equal(reloaded.transform(static), plain.transform(static))


def test_static_encoder_bounds_are_the_training_range_inside_the_declared_one(tiny_cohort):
    from synthmed.models.transforms import RANGE_RANK, StaticEncoder

    schema = tiny_cohort.schema.with_column("Age", lower=0.0, upper=120.0)
    static = tiny_cohort.static.copy()
    static["Age"] = np.arange(len(static), dtype=float) + 30.0
    ages = np.sort(static["Age"].to_numpy())
    fitted = StaticEncoder().fit(static, schema)
    assert fitted.bounds("Age") == (ages[RANGE_RANK - 1], ages[-RANGE_RANK])
    far = fitted.transform(static.assign(Age=[-50.0, 500.0] * (len(static) // 2)))
    decoded = fitted.inverse(far)["Age"]
    assert set(decoded) == {ages[RANGE_RANK - 1], ages[-RANGE_RANK]}
    # From the declared bounds alone (DP), and from files written before the range was kept,
    # the declared bounds.
    private = StaticEncoder().fit(static, schema, from_bounds=True)
    assert private.bounds("Age") == (0.0, 120.0)
    old = {
        "columns": {
            k: {f: v for f, v in info.items() if f not in ("low", "high")}
            for k, info in fitted.to_dict()["columns"].items()
        }
    }
    assert StaticEncoder.from_dict(old, schema).bounds("Age") == (0.0, 120.0)
