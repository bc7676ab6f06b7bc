"""A training run killed with SIGKILL resumes from its checkpoint to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch

from synthmed.datasets import simulate_cohort
from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

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


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(checkpoints)], env=env)
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint.pt").exists():
        assert child.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    killed_at = torch.load(checkpoints / "checkpoint.pt", weights_only=True)["epoch"]
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

    resumed_tensors, uninterrupted_tensors = resumed._get_state()[1], uninterrupted._get_state()[1]
    assert resumed_tensors.keys() == uninterrupted_tensors.keys()
    for name, tensor in uninterrupted_tensors.items():
        assert torch.equal(resumed_tensors[name], tensor), name
    pd.testing.assert_frame_equal(
        resumed.sample(20, seed=1).events, uninterrupted.sample(20, seed=1).events
    )


def test_model_whose_tensor_shapes_disagree_with_its_config_is_refused(tmp_path):
    from synthmed.errors import ModelFileError
    from synthmed.models.persistence import load_synthesizer, read_model_file, save_model_file

    model = LSTMSynthesizer(**{**SETTINGS, "epochs": 1}).fit(simulate_cohort(30, seed=0))
    path = model.save(tmp_path / "model.synthmed")
    model_type, config, tensors = read_model_file(path)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_model_file(path, model_type, config, tensors)
    with pytest.raises(ModelFileError):
        load_synthesizer(path)
