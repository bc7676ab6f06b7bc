"""``synthmed.share``: one folder with the cohort, schema, report and a datasheet, atomically."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import synthmed
from synthmed import Cohort, Schema
from synthmed.datasets import simulate_cohort
from synthmed.evaluation import Report
from synthmed.models import cgan as cgan_module
from synthmed.models.cgan import CGANConfig, CGANSynthesizer
from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer
from synthmed.sharing import BUNDLE_FILES


@pytest.fixture(scope="module")
def fitted():
    train, holdout = simulate_cohort(40, seed=4).split(test_size=0.3, seed=0)
    config = LSTMConfig(hidden_size=16, head_hidden=8, static_hidden=16)
    model = LSTMSynthesizer(config, epochs=2, device="cpu", verbose=False, seed=5).fit(train)
    return model, train, holdout


def fake_report(*_args, **_kwargs) -> Report:
    """A cheap stand-in for ``evaluate`` where the scores themselves are not under test."""
    scores = pd.DataFrame(
        [
            ("fidelity", "KSComplement", "HR", 0.9, 0.95, "maximize"),
            ("fidelity", "discriminative_score", None, 0.1, 0.05, "minimize"),
            ("privacy", "dcr_ratio", None, 1.0, 1.0, "maximize"),
        ],
        columns=["section", "metric", "variable", "value", "ceiling", "goal"],
    )
    return Report(scores)


def test_share_writes_the_whole_bundle(fitted, tmp_path, monkeypatch):
    # The real evaluation runs in tests/test_cli.py (synthmed share); a stand-in is enough here.
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    model, train, holdout = fitted
    out = synthmed.share(model, 25, train, holdout, tmp_path / "bundle", seed=3, gru=False)
    assert {p.name for p in out.iterdir()} == set(BUNDLE_FILES)
    synthetic = Cohort.read_parquet(out / "synthetic.parquet")
    assert synthetic.n_patients == 25 and synthetic.metadata["seed"] == 3
    csv = pd.read_csv(out / "synthetic.csv")
    assert csv["patient_id"].nunique() == 25 and len(csv) == len(synthetic.to_long())
    assert Schema.from_json(out / "schema.json") == model.schema_
    scores = json.loads((out / "report.json").read_text())
    assert set(scores["summary"]) == {"fidelity", "utility", "privacy"}
    assert "<html" in (out / "report.html").read_text().lower()
    assert "| fidelity | 0.85 | 0.925 |" in (out / "README.md").read_text()

    datasheet = (out / "README.md").read_text()
    for fact in (
        "LSTMSynthesizer",
        f"Trained on {model.n_train_patients_} real patients",
        f"Training seed: {model.seed_}; sampling seed: 3",
        "Not trained with differential privacy",
        "real-vs-real ceiling",
        "`KSComplement`",
        "Intended use",
        "Known limits",
        '"epochs": 2',
    ):
        assert fact in datasheet, fact
    assert not list(tmp_path.glob(".bundle*")), "no temporary folder is left behind"


def test_datasheet_states_the_privacy_budget(fitted, tmp_path, monkeypatch):
    model, train, holdout = fitted
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    monkeypatch.setattr(model, "privacy_spent_", (2.5, 1e-5))
    out = synthmed.share(model, 12, train, holdout, tmp_path / "dp")
    datasheet = (out / "README.md").read_text()
    assert "epsilon = 2.5, delta = 1e-05" in datasheet
    assert "Not trained with differential privacy" not in datasheet


def test_share_from_paths_and_the_training_size_check(fitted, tmp_path, monkeypatch):
    model, train, holdout = fitted
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    model_path = model.save(tmp_path / "model.synthmed")
    smaller = train.subset(train.ids[:20])
    out = synthmed.share(
        model_path, 10, smaller.to_parquet(tmp_path / "t.parquet"),
        holdout.to_parquet(tmp_path / "h.parquet"), tmp_path / "from-paths",
    )  # fmt: skip
    datasheet = (out / "README.md").read_text()
    assert "file `model.synthmed`" in datasheet
    assert "**Warning:** the model was trained on" in datasheet


def test_share_is_atomic(fitted, tmp_path, monkeypatch):
    model, train, holdout = fitted

    def broken(*args, **kwargs):
        report = fake_report()
        report.to_html = lambda path: (_ for _ in ()).throw(OSError("disk full"))
        return report

    monkeypatch.setattr("synthmed.evaluation.evaluate", broken)
    with pytest.raises(OSError, match="disk full"):
        synthmed.share(model, 10, train, holdout, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(fitted, tmp_path, monkeypatch):
    model, train, holdout = fitted
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthmed.share(model, 10, train, holdout, out)
    synthmed.share(model, 10, train, holdout, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_conditions_reach_the_sample(fitted, tmp_path, monkeypatch):
    model, train, holdout = fitted
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    out = synthmed.share(
        model, 10, train, holdout, tmp_path / "c", conditions={"In-hospital_death": 1}
    )
    synthetic = Cohort.read_parquet(out / "synthetic.parquet")
    assert np.all(synthetic.static["In-hospital_death"] == 1)


def test_datasheet_names_the_epochs_that_fit_chose(tmp_path, monkeypatch):
    monkeypatch.setattr("synthmed.evaluation.evaluate", fake_report)
    monkeypatch.setattr(cgan_module, "_EPOCHS", 1)
    monkeypatch.setattr(cgan_module, "_SLOT_EPOCHS", 1)
    train, holdout = simulate_cohort(40, seed=4).split(test_size=0.3, seed=0)
    config = CGANConfig(lstm_hidden=8, static_hidden=8, critic_hidden=8, step_embedding=2)
    model = CGANSynthesizer(config=config, device="cpu", verbose=False).fit(train)
    out = synthmed.share(model, 10, train, holdout, tmp_path / "bundle", seed=0, gru=False)
    datasheet = (out / "README.md").read_text()
    assert '"epochs": null' in datasheet
    assert "- Epochs: 1, chosen by `fit` from the training cohort." in datasheet
