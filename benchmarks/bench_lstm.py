"""Benchmark LSTMSynthesizer on PhysioNet 2012: fit on set-a, compare with set-b (holdout).

Prints a markdown table row (and appends it to ``--table`` when given) with the fit time, the
discriminative score, per-variable KSComplement, observation-rate errors, mean sequence length
and the sampling throughput, each against its target::

    nice -n 10 python benchmarks/bench_lstm.py                    # raw irregular times
    nice -n 10 python benchmarks/bench_lstm.py --resample 1h      # hourly grid

Targets (issue 3): fit <= 600 s on 2 cores; |acc - 0.5| <= 0.15; mean KSComplement >= 0.85;
observation rates within 0.05; mean length within 10%; sampling >= 2,000 patients/s (raw) and
>= 13,700 patients/s (hourly, DGAN's figure).

The data folder is ``--data`` or ``$SYNTHMED_PHYSIONET_DIR`` (default
``/work/shared/data/physionet2012``). Metrics come from ``synthmed.evaluation`` when it provides
them and are otherwise computed here (SDMetrics KSComplement; a histogram gradient-boosting
classifier on per-patient summaries with 5-fold patient-level cross-validation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _arguments import add_sampling_arguments

PANEL = ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose"]
TARGETS = {
    "fit_seconds": 600.0,
    "discriminative": 0.15,
    "ks": 0.85,
    "obs_rate_error": 0.05,
    "length_error": 0.10,
    "throughput_raw": 2000.0,
    "throughput_hourly": 13700.0,
}


def summaries(cohort) -> pd.DataFrame:
    """Per-patient features: length, duration, and mean/std/min/max/last/count of each variable,
    plus the static columns (category codes)."""
    arrays = cohort.arrays
    lengths = arrays.lengths
    inside = arrays.step_mask
    columns: dict[str, np.ndarray] = {"length": lengths.astype(float)}
    last_step = np.maximum(lengths - 1, 0)
    rows = np.arange(len(lengths))
    columns["duration"] = np.where(lengths > 0, arrays.times[rows, last_step], np.nan)
    columns["first_time"] = np.where(lengths > 0, arrays.times[:, 0], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, name in enumerate(arrays.variables):
            values = np.where(arrays.mask[:, :, j] & inside, arrays.values[:, :, j], np.nan)
            count = np.sum(~np.isnan(values), axis=1)
            columns[f"{name}_count"] = count.astype(float)
            columns[f"{name}_mean"] = np.nanmean(values, axis=1)
            columns[f"{name}_std"] = np.nanstd(values, axis=1)
            columns[f"{name}_min"] = np.nanmin(values, axis=1)
            columns[f"{name}_max"] = np.nanmax(values, axis=1)
            last_index = np.where(~np.isnan(values), np.arange(values.shape[1])[None, :], -1).max(
                axis=1
            )
            columns[f"{name}_last"] = np.where(
                last_index >= 0, values[rows, np.maximum(last_index, 0)], np.nan
            )
    frame = pd.DataFrame(columns)
    static = cohort.static_arrays
    for k, name in enumerate(static.numeric_columns):
        frame[name] = static.numeric[:, k]
    for k, name in enumerate(static.categorical_columns):
        frame[name] = np.where(static.codes[:, k] < 0, np.nan, static.codes[:, k])
    return frame


def discriminative_score(real, synthetic, seed: int = 0) -> float:
    """|accuracy - 0.5| of a gradient-boosting classifier telling real from synthetic patients,
    5-fold cross-validated (each row is one patient, so folds split patients)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = pd.concat([summaries(real), summaries(synthetic)], ignore_index=True)
    y = np.r_[np.ones(real.n_patients), np.zeros(synthetic.n_patients)]
    classifier = HistGradientBoostingClassifier(random_state=seed)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    accuracy = cross_val_score(classifier, x.to_numpy(float), y, cv=folds, scoring="accuracy")
    return abs(float(accuracy.mean()) - 0.5)


def ks_complement(real, synthetic) -> dict[str, float]:
    """SDMetrics KSComplement of each numeric variable's pooled observations."""
    from sdmetrics.single_column import KSComplement

    out = {}
    for name in real.variables:
        if real.schema[name].kind != "numeric":
            continue
        a = real.events[name].dropna()
        b = synthetic.events[name].dropna()
        out[name] = float(KSComplement.compute(a, b)) if len(b) else 0.0
    return out


def observation_rates(cohort) -> np.ndarray:
    arrays = cohort.arrays
    return arrays.mask[arrays.step_mask].mean(axis=0)


def throughput(synth, n: int, repeats: int = 2) -> tuple[float, float]:
    """Best patients/s (wall clock and process CPU time) over ``repeats`` calls of sample(n)."""
    best_wall, best_cpu = 0.0, 0.0
    for repeat in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        synth.sample(n, seed=1000 + repeat)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best_wall, best_cpu = max(best_wall, n / wall), max(best_cpu, n / cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("SYNTHMED_PHYSIONET_DIR", "/work/shared/data/physionet2012"),
    )
    parser.add_argument("--resample", default=None, help="e.g. 1h (default: raw times)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--n-sample", type=int, default=20_000, help="patients for throughput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save the fitted model here")
    parser.add_argument("--load", default=None, help="skip fitting: load this saved model")
    parser.add_argument("--table", default=None, help="append the markdown row to this file")
    parser.add_argument("--config", default=None, help="JSON dict of LSTMConfig fields")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--verbose", action="store_true", help="show the training progress bar")
    add_sampling_arguments(parser)
    args = parser.parse_args()

    from synthmed.datasets import load_physionet2012
    from synthmed.evaluation.discrimination import GRUDiscriminativeScore
    from synthmed.models.lstm import LSTMSynthesizer
    from synthmed.models.persistence import load_synthesizer

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    train = load_physionet2012(data / "set-a.tar.gz", variables=PANEL, resample=args.resample)
    holdout = load_physionet2012(data / "set-b.tar.gz", variables=PANEL, resample=args.resample)

    if args.load:
        synth = load_synthesizer(args.load)
        fit_wall, fit_cpu = synth.fit_seconds_, float("nan")
    else:
        settings = {"seed": args.seed, "verbose": args.verbose}
        if args.epochs is not None:
            settings["epochs"] = args.epochs
        if args.learning_rate is not None:
            settings["learning_rate"] = args.learning_rate
        if args.batch_size is not None:
            settings["batch_size"] = args.batch_size
        if args.config:
            settings["config"] = json.loads(args.config)
        if args.rejection_sampling is not None:
            settings["rejection_sampling"] = args.rejection_sampling
            settings["rejection_stages"] = args.rejection_stages
        synth = LSTMSynthesizer(**settings)
        fit_wall, fit_cpu = time.perf_counter(), time.process_time()
        synth.fit(train)
        fit_wall, fit_cpu = time.perf_counter() - fit_wall, time.process_time() - fit_cpu
        if args.save:
            synth.save(args.save)

    synthetic = synth.sample(holdout.n_patients, seed=args.seed)
    disc = discriminative_score(holdout, synthetic, args.seed)
    disc_ceiling = discriminative_score(holdout, train, args.seed)
    # A discriminator of another kind (a GRU over the sequences), for a second opinion.
    disc_gru = GRUDiscriminativeScore.compute(holdout, synthetic, args.seed)
    ks = ks_complement(holdout, synthetic)
    ks_ceiling = ks_complement(holdout, train)
    rate_real, rate_syn = observation_rates(holdout), observation_rates(synthetic)
    rate_error = np.abs(rate_syn - rate_real)
    length_real = holdout.arrays.lengths.mean()
    length_syn = synthetic.arrays.lengths.mean()
    length_error = length_syn / length_real - 1
    torch.set_num_threads(args.sample_threads)
    wall_rate, cpu_rate = throughput(synth, args.n_sample)
    target_rate = TARGETS["throughput_hourly" if args.resample else "throughput_raw"]

    history = synth.history_
    report = {
        "fit_wall_s": fit_wall,
        "fit_cpu_s": fit_cpu,
        "epochs_run": len(history),
        "best_epoch": synth.best_epoch_,
        "discriminative": disc,
        "discriminative_real_vs_real": disc_ceiling,
        "discriminative_gru": disc_gru,
        "rejection_sampling": synthetic.metadata.get("rejection_sampling"),
        "ks": ks,
        "ks_mean": float(np.mean(list(ks.values()))),
        "ks_mean_real_vs_real": float(np.mean(list(ks_ceiling.values()))),
        "obs_rate_real": dict(zip(holdout.variables, rate_real.round(4).tolist(), strict=True)),
        "obs_rate_synthetic": dict(zip(holdout.variables, rate_syn.round(4).tolist(), strict=True)),
        "obs_rate_max_error": float(rate_error.max()),
        "length_real": float(length_real),
        "length_synthetic": float(length_syn),
        "samples_per_s_wall": wall_rate,
        "samples_per_s_cpu": cpu_rate,
        "throughput_ratio": wall_rate / target_rate,
        "threads": args.threads,
        "sample_threads": args.sample_threads,
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=2))

    row = (
        f"| {datetime.date.today()} | {args.resample or 'raw'} | {platform.node()} "
        f"{args.threads} thr, load {report['load_average']:.1f} "
        f"| {fit_wall:.0f} s ({fit_wall / TARGETS['fit_seconds']:.2f}x budget), "
        f"{len(history)} ep, best {synth.best_epoch_} "
        f"| {disc:.3f} (real {disc_ceiling:.3f}) "
        f"| {report['ks_mean']:.3f} (real {report['ks_mean_real_vs_real']:.3f}) "
        f"| {rate_error.max():.3f} "
        f"| {length_syn:.1f} / {length_real:.1f} ({length_error:+.1%}) "
        f"| {wall_rate:,.0f} ({wall_rate / target_rate:.2f}x target; {cpu_rate:,.0f}/CPU-s) |"
    )
    header = (
        "| date | times | machine | fit | disc. score (real) | KS mean (real) "
        "| obs-rate max err | length syn / real | patients/s |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    print(header)
    print(row)
    if args.table:
        path = Path(args.table)
        new = not path.exists()
        with path.open("a") as handle:
            if new:
                handle.write(header + "\n")
            handle.write(row + "\n")


if __name__ == "__main__":
    main()
