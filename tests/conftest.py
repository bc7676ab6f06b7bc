"""Shared fixtures: the real PhysioNet 2012 files, when this machine has them."""

from __future__ import annotations

import os

# Small models and small data run fastest on one thread, and several OpenMP pools (torch,
# scikit-learn) competing for two cores slow each other down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

if TYPE_CHECKING:
    from synthmed import Cohort

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def physionet_dir() -> Path:
    """The folder of the raw PhysioNet 2012 files: ``$SYNTHMED_PHYSIONET_DIR`` or
    ``../shared/data/physionet2012`` beside the repository. Skips the test when absent."""
    configured = os.environ.get("SYNTHMED_PHYSIONET_DIR")
    directory = Path(configured) if configured else REPO_ROOT.parent / "shared/data/physionet2012"
    needed = [directory / "set-a.tar.gz", directory / "Outcomes-a.txt"]
    absent = [str(path) for path in needed if not path.is_file()]
    if absent:
        pytest.skip(
            f"PhysioNet 2012 files not found ({', '.join(absent)}); set SYNTHMED_PHYSIONET_DIR "
            "to the folder holding set-a.tar.gz and Outcomes-a.txt"
        )
    return directory


@pytest.fixture(scope="session")
def physionet_a(physionet_dir: Path) -> Cohort:
    """Set A of the challenge (4,000 stays with outcomes), loaded once per test session."""
    from synthmed.datasets import load_physionet2012

    return load_physionet2012(physionet_dir / "set-a.tar.gz")


@pytest.fixture
def adam_iterates(monkeypatch) -> list[tuple[torch.optim.Optimizer, list[torch.Tensor]]]:
    """Every Adam step taken during the test, in order: the optimizer and a copy of its first
    parameter group's weights after the step."""
    iterates: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]] = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        iterates.append((self, [p.detach().clone() for p in self.param_groups[0]["params"]]))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return iterates
