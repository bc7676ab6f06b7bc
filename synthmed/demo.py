"""``synthmed demo``: the whole pipeline on a simulated cohort, in about a minute.

Simulate an ICU cohort (:func:`synthmed.datasets.simulate_cohort`, written from physiology, no
real record), split it by patient, fit a small :class:`~synthmed.LSTMSynthesizer`, sample as many
synthetic patients as the holdout has, evaluate them and write the HTML report. The output
folder then holds ``model.synthmed``, ``synthetic.parquet`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: Simulated patients (70% to train, 30% held out).
DEMO_PATIENTS = 1000
#: Training epochs (early stopping on a validation split may end sooner).
DEMO_EPOCHS = 40
#: A small network: the demo should run in about a minute on a laptop's CPU.
DEMO_CONFIG = {"hidden_size": 64, "head_hidden": 32, "static_hidden": 64}


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo wrote, its summary scores and how long it took."""

    folder: Path
    model: Path
    synthetic: Path
    report: Path
    summary: dict[str, float]
    seconds: float


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One compute thread: the demo's models are small, and on a busy machine oversubscribed
    OpenMP threads (torch, scikit-learn) are many times slower than one."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    out: str | Path = "synthmed-demo",
    *,
    n_patients: int = DEMO_PATIENTS,
    epochs: int = DEMO_EPOCHS,
    seed: int = 0,
    verbose: bool = True,
    gru: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Simulate, split, fit, sample, evaluate; write the model, cohort and report to ``out``.

    Args:
        out: Output folder (created; the three files in it are replaced).
        n_patients: Simulated patients; 30% are held out for the evaluation.
        epochs: Most training epochs of the LSTM.
        seed: Seed of the simulation, the split, the model and the evaluation.
        verbose: Progress bar while training.
        gru: Also run the recurrent discriminator in the evaluation (the slowest metric).
        log: Called with one line per stage (e.g. ``print``); None is silent.

    Returns:
        The paths written and the report's summary.
    """
    from synthmed.datasets import simulate_cohort
    from synthmed.evaluation import evaluate
    from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

    say = log or (lambda _message: None)
    started = time.perf_counter()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with _single_thread():
        cohort = simulate_cohort(n_patients, seed=seed)
        train, holdout = cohort.split(test_size=0.3, seed=seed)
        say(
            f"simulated {cohort.n_patients} ICU stays ({len(cohort.events)} measurement rows, "
            f"{len(cohort.variables)} vital signs); training on {train.n_patients}, holding out "
            f"{holdout.n_patients}"
        )
        model = LSTMSynthesizer(
            LSTMConfig(**DEMO_CONFIG), epochs=epochs, seed=seed, device="cpu", verbose=verbose
        )
        model.fit(train)
        say(f"fitted an LSTMSynthesizer in {model.fit_seconds_:.0f} s")
        model_path = model.save(folder / "model.synthmed")
        synthetic = model.sample(holdout.n_patients, seed=seed)
        synthetic_path = synthetic.to_parquet(folder / "synthetic.parquet")
        say(f"sampled {synthetic.n_patients} synthetic patients; evaluating them")
        report = evaluate(holdout, synthetic, train, seed=seed, history=model.history_, gru=gru)
        report_path = report.to_html(folder / "report.html")
    summary = report.summary()
    say(
        "summary (1 is best): "
        + ", ".join(f"{name} {value:.2f}" for name, value in summary.items())
    )
    return DemoResult(
        folder, model_path, synthetic_path, report_path, summary, time.perf_counter() - started
    )
