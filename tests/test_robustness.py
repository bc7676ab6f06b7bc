"""A training run killed with SIGKILL resumes from its checkpoint to the same weights (LSTM and
CGAN, with and without DP), through the API and the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_cgan import TINY as TINY_CGAN

from synthmed import load_synthesizer
from synthmed.datasets import simulate_cohort
from synthmed.errors import ModelFileError
from synthmed.models.cgan import CGANConfig, CGANSynthesizer
from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer
from synthmed.models.privacy import privacy_details

SETTINGS = dict(
    config=LSTMConfig(hidden_size=16, head_hidden=16, static_hidden=16, static_layers=1),
    epochs=25,
    batch_size=16,
    patience=1000,
    seed=4,
    device="cpu",
    verbose=False,
)

CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from synthmed.datasets import simulate_cohort
    from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer
    settings = dict(
        config=LSTMConfig(hidden_size=16, head_hidden=16, static_hidden=16, static_layers=1),
        epochs=25, batch_size=16, patience=1000, seed=4, device="cpu", verbose=False,
    )
    LSTMSynthesizer(**settings).fit(simulate_cohort(60, seed=3), checkpoint_dir=sys.argv[1])
    """
)


def _kill_after_first_checkpoint(command: list[str], checkpoints: Path) -> int:
    """Start ``command`` (a training process writing to ``checkpoints``), SIGKILL it as soon as
    its first checkpoint exists, and return the (0-based) epoch that checkpoint was saved after.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    try:
        while not (checkpoints / "checkpoint.pt").exists():
            assert child.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return int(torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"])


def _assert_same_weights(first, second) -> None:
    first_tensors, second_tensors = first._get_state()[1], second._get_state()[1]
    assert first_tensors.keys() == second_tensors.keys()
    for name, tensor in second_tensors.items():
        assert torch.equal(first_tensors[name], tensor), name


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    killed_at = _kill_after_first_checkpoint(
        [sys.executable, "-c", CHILD, str(checkpoints)], checkpoints
    )
    assert killed_at < SETTINGS["epochs"] - 1, "the kill came after the last epoch"

    cohort = simulate_cohort(60, seed=3)
    epochs_run = []
    validation_loss = LSTMSynthesizer._validation_loss

    def counting(self, *args):
        epochs_run.append(1)
        return validation_loss(self, *args)

    monkeypatch.setattr(LSTMSynthesizer, "_validation_loss", counting)
    resumed = LSTMSynthesizer(**SETTINGS).fit(cohort, checkpoint_dir=checkpoints, resume=True)
    monkeypatch.setattr(LSTMSynthesizer, "_validation_loss", validation_loss)
    assert len(epochs_run) == SETTINGS["epochs"] - (killed_at + 1), "it did not resume"
    uninterrupted = LSTMSynthesizer(**SETTINGS).fit(cohort)

    _assert_same_weights(resumed, uninterrupted)
    pd.testing.assert_frame_equal(
        resumed.sample(20, seed=1).events, uninterrupted.sample(20, seed=1).events
    )


#: A tiny CGAN (the one of test_cgan.py, on 48 steps): about 0.1 s per epoch on one core.
CGAN_CONFIG = dataclasses.asdict(dataclasses.replace(TINY_CGAN, max_steps=48))
CGAN_SETTINGS = dict(epochs=30, batch_size=16, seed=4, device="cpu", verbose=False)

CGAN_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from synthmed.datasets import simulate_cohort
    from synthmed.models.cgan import CGANConfig, CGANSynthesizer
    config, settings = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    model = CGANSynthesizer(config=CGANConfig(**config), **settings)
    model.fit(simulate_cohort(60, seed=3), checkpoint_dir=sys.argv[1])
    """
)


def _cgan(**settings) -> CGANSynthesizer:
    return CGANSynthesizer(config=CGANConfig(**CGAN_CONFIG), **{**CGAN_SETTINGS, **settings})


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("epsilon", [None, 8.0], ids=["plain", "private"])
def test_sigkilled_cgan_resumes_to_the_uninterrupted_weights_and_epsilon(
    tmp_path, monkeypatch, epsilon
):
    checkpoints = tmp_path / "checkpoints"
    settings = {**CGAN_SETTINGS, "epsilon": epsilon}
    command = [sys.executable, "-c", CGAN_CHILD, str(checkpoints)]
    killed_at = _kill_after_first_checkpoint(
        [*command, json.dumps(CGAN_CONFIG), json.dumps(settings)], checkpoints
    )
    assert killed_at < CGAN_SETTINGS["epochs"] - 1, "the kill came after the last epoch"

    cohort = simulate_cohort(60, seed=3)
    epochs_run = []
    checkpoint_due = CGANSynthesizer._checkpoint_due  # asked once at the end of every epoch

    def counting(self, epoch):
        epochs_run.append(epoch)
        return checkpoint_due(self, epoch)

    monkeypatch.setattr(CGANSynthesizer, "_checkpoint_due", counting)
    resumed = _cgan(epsilon=epsilon).fit(cohort, checkpoint_dir=checkpoints, resume=True)
    monkeypatch.setattr(CGANSynthesizer, "_checkpoint_due", checkpoint_due)
    assert epochs_run == list(range(killed_at + 1, CGAN_SETTINGS["epochs"])), "it did not resume"
    uninterrupted = _cgan(epsilon=epsilon).fit(cohort)

    if epsilon is None:
        assert resumed.privacy_spent is None
    else:
        assert uninterrupted.privacy_spent is not None
        assert resumed.privacy_spent == uninterrupted.privacy_spent
        assert 0 < resumed.privacy_spent[0] <= epsilon * (1 + 1e-3)
        assert privacy_details(resumed)["steps"] == privacy_details(uninterrupted)["steps"]
    _assert_same_weights(resumed, uninterrupted)
    columns = [c for c in uninterrupted.history_.columns if c != "seconds"]
    pd.testing.assert_frame_equal(resumed.history_[columns], uninterrupted.history_[columns])
    pd.testing.assert_frame_equal(
        resumed.sample(20, seed=1).events, uninterrupted.sample(20, seed=1).events
    )


def test_cgan_checkpoint_of_another_run_is_refused(tmp_path):
    cohort = simulate_cohort(30, seed=0)
    _cgan(epochs=2).fit(cohort, checkpoint_dir=tmp_path, checkpoint_every=2)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and set(saved["generators"]) == {"noise", "order"}
    assert {"generator", "critics", "generator_optimizer", "critic_optimizer"} <= set(
        saved["state"]
    )
    with pytest.raises(ModelFileError, match="other settings or data"):
        _cgan(epochs=2, seed=5).fit(cohort, checkpoint_dir=tmp_path, resume=True)


def test_cli_fits_a_cgan_with_checkpoints_and_resumes_it(tmp_path):
    simulate_cohort(30, seed=1).to_long().to_csv(tmp_path / "cohort.csv", index=False)
    checkpoints = tmp_path / "checkpoints"
    common = [
        sys.executable, "-m", "synthmed.cli", "fit", str(tmp_path / "cohort.csv"),
        "--model", "cgan", "--epochs", "2", "--seed", "3", "--batch-size", "16",
        "--id", "patient_id", "--time", "time", "--static", "Age", "Gender", "ICUType",
        "--outcomes", "In-hospital_death", "--quiet", "--checkpoint-dir", str(checkpoints),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for out, extra in (("first.synthmed", []), ("resumed.synthmed", ["--resume"])):
        done = subprocess.run(
            [*common, "--out", str(tmp_path / out), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"] == 1
    first = load_synthesizer(tmp_path / "first.synthmed")
    resumed = load_synthesizer(tmp_path / "resumed.synthmed")
    _assert_same_weights(first, resumed)
    pd.testing.assert_frame_equal(first.sample(5, seed=0).events, resumed.sample(5, seed=0).events)


def test_model_whose_tensor_shapes_disagree_with_its_config_is_refused(tmp_path):
    from synthmed.models.persistence import load_synthesizer, read_model_file, save_model_file

    model = LSTMSynthesizer(**{**SETTINGS, "epochs": 1}).fit(simulate_cohort(30, seed=0))
    path = model.save(tmp_path / "model.synthmed")
    model_type, config, tensors = read_model_file(path)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_model_file(path, model_type, config, tensors)
    with pytest.raises(ModelFileError):
        load_synthesizer(path)


class _Interrupted(Exception):
    pass


def test_interrupted_private_lstm_resumes_to_the_same_weights_and_epsilon(tmp_path, monkeypatch):
    """Under DP the LSTM runs six private phases (summary, static model, sequences, outcome
    labeller, its calibration slope, prevalence): a resumed run must restore every phase's
    accounting and the weights."""
    cohort = simulate_cohort(60, seed=3)
    settings = {**SETTINGS, "epochs": 4, "epsilon": 8.0, "max_length": 48}
    save = LSTMSynthesizer._save_checkpoint

    def save_then_stop(self, epoch, *args, **kwargs):
        save(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise _Interrupted

    monkeypatch.setattr(LSTMSynthesizer, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Interrupted):
        LSTMSynthesizer(**settings).fit(cohort, checkpoint_dir=tmp_path)
    saved_epochs = []

    def save_and_count(self, epoch, *args, **kwargs):
        saved_epochs.append(epoch)
        save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(LSTMSynthesizer, "_save_checkpoint", save_and_count)
    resumed = LSTMSynthesizer(**settings).fit(cohort, checkpoint_dir=tmp_path, resume=True)
    assert saved_epochs == [2, 3], "it did not resume after the interrupted epoch"
    monkeypatch.setattr(LSTMSynthesizer, "_save_checkpoint", save)
    uninterrupted = LSTMSynthesizer(**settings).fit(cohort)

    _assert_same_weights(resumed, uninterrupted)
    assert resumed.privacy_spent == uninterrupted.privacy_spent
    phases = [privacy_details(m)["phases"] for m in (resumed, uninterrupted)]
    assert phases[0] == phases[1] and len(phases[0]) == 6
