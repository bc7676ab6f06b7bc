"""Data-parallel training under torchrun: 2 CPU processes (gloo) train one model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from synthmed import load_synthesizer
from synthmed.datasets import simulate_cohort
from synthmed.models import distributed

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from synthmed.datasets import simulate_cohort
    from synthmed.models import distributed
    from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

    out, strategy = sys.argv[1], sys.argv[2]
    LSTMSynthesizer.distributed_strategy = strategy
    seen = {}
    original = distributed.parallelize

    def spy(module, loader, device, seed, **kwargs):
        module, loader = original(module, loader, device, seed, **kwargs)
        seen["ddp"] = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        batches = [[int(i) for i in rows] for (rows,) in loader]  # one epoch (collective)
        seen["first_epoch_patients"] = [i for rows in batches for i in rows]
        seen["batch_size"] = max(len(rows) for rows in batches)
        return module, loader

    distributed.parallelize = spy
    config = LSTMConfig(hidden_size=16, head_hidden=8, static_hidden=16, gap_components=2,
                        mask_components=2, value_components=2, static_components=2)
    model = LSTMSynthesizer(config, epochs=3, batch_size=8, device="cpu", verbose=False)
    model.fit(simulate_cohort(40, seed=0))
    rank = dist.get_rank()
    torch.save(model._get_state()[1], f"{out}/weights-{rank}.pt")
    seen.update(world_size=dist.get_world_size(), backend=dist.get_backend(),
                epochs=len(model.history_))
    with open(f"{out}/rank-{rank}.json", "w") as handle:
        json.dump(seen, handle)
    model.save(f"{out}/model.synthmed")  # rank 0 only
    model.sample_to(f"{out}/sampled", n=6, chunk_size=3)  # rank 0 only
    dist.barrier()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *map(str, args),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.mark.parametrize("strategy", ["ddp", "allreduce"])
def test_two_gloo_ranks_train_one_model(tmp_path, strategy):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = torchrun(script, tmp_path, strategy)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["ddp"] == (strategy == "ddp")
        assert seen["world_size"] == 2 and seen["backend"] == "gloo"
        assert seen["batch_size"] == 4  # the global batch of 8 split over 2 ranks
    # Each rank trained on its own half of the patients...
    first, second = (set(seen["first_epoch_patients"]) for seen in ranks)
    assert first and second and not first & second
    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    # ...and yet both ended with the same weights: the gradients were averaged.
    weights = [torch.load(tmp_path / f"weights-{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
    # Only rank 0 wrote; the model it wrote loads and samples.
    model = load_synthesizer(tmp_path / "model.synthmed")
    assert model.sample(4, seed=1).n_patients == 4
    assert len(list((tmp_path / "sampled").glob("part-*.parquet"))) == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_fit_runs_under_torchrun(tmp_path):
    simulate_cohort(30, seed=2).to_long().to_csv(tmp_path / "cohort.csv", index=False)
    result = torchrun(
        "-m", "synthmed.cli", "fit", tmp_path / "cohort.csv", "--model", "lstm",
        "--out", tmp_path / "model.synthmed", "--epochs", "1", "--batch-size", "8",
        "--id", "patient_id", "--time", "time", "--static", "Age", "Gender", "ICUType",
        "--outcomes", "In-hospital_death",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("model:") == 1  # rank 0 alone reports
    assert load_synthesizer(tmp_path / "model.synthmed").sample(3).n_patients == 3


def test_outside_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched_by_torchrun()
    assert distributed.is_main_process() and distributed.get_world_size() == 1
    device = torch.device("cpu")
    assert distributed.setup(device) == device
    module = torch.nn.Linear(2, 1)
    loader = torch.utils.data.DataLoader(torch.arange(4), batch_size=2)
    assert distributed.parallelize(module, loader, device, seed=0) == (module, loader)


def test_only_rank_0_writes(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main_process()
    from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

    config = LSTMConfig(hidden_size=8, head_hidden=0, static_hidden=8)
    monkeypatch.delenv("RANK")
    model = LSTMSynthesizer(config, epochs=1, device="cpu", verbose=False)
    model.fit(simulate_cohort(12, seed=0))
    monkeypatch.setenv("RANK", "1")
    assert model.save(tmp_path / "m.synthmed") == tmp_path / "m.synthmed"
    model.sample_to(tmp_path / "data", n=3)
    assert not (tmp_path / "m.synthmed").exists() and not (tmp_path / "data").exists()
    pd.testing.assert_frame_equal(model.sample(3, seed=0).events, model.sample(3, seed=0).events)
