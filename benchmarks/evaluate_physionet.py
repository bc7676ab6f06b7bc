"""Time ``synthmed.evaluate`` on PhysioNet 2012: set A against set B, 4,000 patients each.

Set B plays the real holdout and set A the "synthetic" cohort (both real, so every score shows
what real data achieves), with the panel HR, MAP, SysABP, DiasABP, RespRate, Temp, SaO2 and
Glucose at their raw irregular times. Target: at most 3 minutes on 2 cores.

With ``--train``, set A is split in halves: one is the training cohort and the other the
"synthetic" cohort, which adds the privacy metrics and the real-vs-real ceilings.

Usage::

    python benchmarks/evaluate_physionet.py [--data DIR] [--train] [--report out/report.html]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from synthmed.datasets import load_physionet2012
from synthmed.evaluation import evaluate

PANEL = ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose"]
TARGET_SECONDS = 180
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/physionet2012"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SYNTHMED_PHYSIONET_DIR", DEFAULT_DATA)),
        help="folder with set-a.tar.gz, set-b.tar.gz and the Outcomes files",
    )
    parser.add_argument(
        "--train", action="store_true", help="split set A into a training and a 'synthetic' half"
    )
    parser.add_argument("--report", type=Path, help="also write the HTML report here")
    args = parser.parse_args()

    started = time.perf_counter()
    set_a = load_physionet2012(args.data / "set-a.tar.gz", variables=PANEL)
    set_b = load_physionet2012(args.data / "set-b.tar.gz", variables=PANEL)
    loaded = time.perf_counter()
    train = None
    synthetic = set_a
    if args.train:
        train, synthetic = set_a.split(test_size=0.5, seed=0)
    report = evaluate(set_b, synthetic, train)
    elapsed = time.perf_counter() - loaded

    scores = report.scores
    overall = scores.groupby(["section", "metric"], sort=False).agg(
        value=("value", "mean"), ceiling=("ceiling", "mean"), rows=("value", "size")
    )
    with pd.option_context("display.width", 120, "display.max_rows", 100):
        print(overall.round(4).to_string())
    print("summary:", {k: round(v, 4) for k, v in report.summary().items()})
    for note in report.notes:
        print("note:", note)
    print(
        f"patients: real {set_b.n_patients}, synthetic {synthetic.n_patients}, "
        f"train {train.n_patients if train is not None else 0}; "
        f"cores: {os.cpu_count()}; loading {loaded - started:.1f} s"
    )
    verdict = "within" if elapsed <= TARGET_SECONDS else "OVER"
    print(f"evaluate: {elapsed:.1f} s ({verdict} the {TARGET_SECONDS} s target)")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        report.to_html(args.report)
        print(f"report: {args.report} ({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
