"""Benchmark of CGANSynthesizer on PhysioNet/CinC 2012: fit on set-a, compare with set-b.

Panel: HR, MAP, SysABP, DiasABP, RespRate, Temp, SaO2, Glucose, raw irregular times (and,
with ``--grid 1h``, the hourly grid). For each grid it fits the model with its default settings,
samples as many patients as the holdout has and reports:

- fit time (wall clock and process CPU time) and the per-epoch history;
- discriminative score ``|accuracy - 0.5|`` and AUROC of gradient boosting on per-patient
  summaries with patient-level 5-fold CV (synthmed.evaluation's ``DiscriminativeScore`` when
  available, else the same classifier here), for synthetic vs holdout and, as the ceiling,
  training vs holdout;
- per-variable ``KSComplement`` (SDMetrics) of observed values, observation-rate errors,
  diversity ratio (mean pairwise distance between standardised per-patient summaries,
  synthetic over real), minimum blood pressures and a check of every schema bound;
- sampling throughput in patients per second, end to end (``sample``: generation plus the
  validated Cohort) and generation alone (``_generate``).

Reference figures from the issue: SDV PARSynthesizer at defaults scored 0.497; gretel's DGAN
sampled ~13,700 patients/s on the hourly grid, with negative blood pressures (AUROC 1.0).

Run (the machine is shared: be nice, one thread avoids oversubscription)::

    nice -n 10 python benchmarks/bench_cgan.py --threads 1 --grid raw --grid 1h \\
        --out benchmarks/out/cgan.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _arguments import add_sampling_arguments

from synthmed import Cohort
from synthmed.datasets import load_physionet2012
from synthmed.models.cgan import CGANConfig, CGANSynthesizer

PANEL = ["HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose"]
BLOOD_PRESSURES = ["MAP", "SysABP", "DiasABP"]
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/physionet2012"


# -- metrics ---------------------------------------------------------------------------------------


def patient_summaries(cohort: Cohort) -> pd.DataFrame:
    """Per-patient features: synthmed.evaluation's when it exists, else a local equivalent."""
    try:
        from synthmed.evaluation.features import patient_features
    except ImportError:
        return _local_summaries(cohort)
    return patient_features(cohort)


def _local_summaries(cohort: Cohort) -> pd.DataFrame:
    arrays = cohort.arrays
    inside = arrays.step_mask
    columns = {
        "n_steps": arrays.lengths.astype(float),
        "duration": np.where(inside, arrays.times, np.nan).max(1, initial=0.0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, name in enumerate(arrays.variables):
            values = np.where(arrays.mask[..., j], arrays.values[..., j], np.nan)
            columns[f"{name}__n_obs"] = arrays.mask[..., j].sum(1)
            for stat, function in (
                ("mean", np.nanmean),
                ("std", np.nanstd),
                ("min", np.nanmin),
                ("max", np.nanmax),
            ):
                columns[f"{name}__{stat}"] = function(values, axis=1)
    static = cohort.static.apply(pd.to_numeric, errors="coerce")
    return pd.DataFrame(columns, index=cohort.ids).join(static)


def discriminative(real: pd.DataFrame, synthetic: pd.DataFrame, seed: int = 0) -> dict:
    """``|accuracy - 0.5|`` and AUROC of gradient boosting, 5 patient-level folds."""
    try:
        from synthmed.evaluation.discrimination import DiscriminativeScore
    except ImportError:
        return _local_discriminative(real, synthetic, seed)
    return DiscriminativeScore.compute_breakdown(real, synthetic, seed)


def _local_discriminative(real: pd.DataFrame, synthetic: pd.DataFrame, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    size = min(len(real), len(synthetic))
    rng = np.random.default_rng(seed)
    x = np.vstack(
        [
            real.to_numpy(float)[rng.choice(len(real), size, replace=False)],
            synthetic[real.columns].to_numpy(float)[
                rng.choice(len(synthetic), size, replace=False)
            ],
        ]
    )
    y = np.repeat([0, 1], size)
    p = np.zeros(len(y))
    for fit, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        model = HistGradientBoostingClassifier(max_iter=200, max_leaf_nodes=15, random_state=seed)
        p[test] = model.fit(x[fit], y[fit]).predict_proba(x[test])[:, 1]
    accuracy = float(np.mean((p > 0.5) == y))
    return {"score": abs(accuracy - 0.5), "accuracy": accuracy, "auroc": roc_auc_score(y, p)}


def ks_complements(real: Cohort, synthetic: Cohort) -> dict[str, float]:
    from sdmetrics.single_column import KSComplement

    out = {}
    for j, name in enumerate(real.variables):
        r = real.arrays.values[..., j][real.arrays.mask[..., j]]
        s = synthetic.arrays.values[..., j][synthetic.arrays.mask[..., j]]
        out[name] = float(KSComplement.compute(pd.Series(r), pd.Series(s))) if len(s) else 0.0
    return out


def observation_rates(cohort: Cohort) -> np.ndarray:
    arrays = cohort.arrays
    return arrays.mask[arrays.step_mask].mean(axis=0)


def mean_pairwise_distance(x: np.ndarray, n: int = 1500, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    y = x[rng.choice(len(x), min(n, len(x)), replace=False)]
    squared = (y**2).sum(1)
    d = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * y @ y.T, 0.0))
    return float(d[np.triu_indices(len(y), 1)].mean())


def diversity_ratio(real: pd.DataFrame, synthetic: pd.DataFrame) -> float:
    """Mean pairwise distance of synthetic patients over that of real ones, both standardised
    by the real features' mean and spread (missing features at the mean)."""
    mean = real.mean()
    scale = real.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
    x_real, x_synthetic = (
        ((t[real.columns] - mean) / scale).fillna(0.0).to_numpy(float) for t in (real, synthetic)
    )
    return mean_pairwise_distance(x_synthetic) / mean_pairwise_distance(x_real)


def bounds_report(cohort: Cohort) -> dict:
    schema, outside = cohort.schema, {}
    for name in cohort.variables:
        values = cohort.events[name].dropna()
        lower = -np.inf if schema[name].lower is None else schema[name].lower
        upper = np.inf if schema[name].upper is None else schema[name].upper
        outside[name] = int(((values < lower) | (values > upper)).sum())
    return {
        "values_outside_bounds": outside,
        "min_blood_pressure": {n: float(cohort.events[n].min()) for n in BLOOD_PRESSURES},
    }


def fidelity(real: Cohort, synthetic: Cohort, real_features: pd.DataFrame) -> dict:
    features = patient_summaries(synthetic)
    ks = ks_complements(real, synthetic)
    rate_error = np.abs(observation_rates(synthetic) - observation_rates(real))
    return {
        "discriminative": discriminative(real_features, features),
        "ks_complement": ks,
        "ks_complement_mean": float(np.mean(list(ks.values()))),
        "observation_rate_error": dict(
            zip(real.variables, rate_error.round(4).tolist(), strict=True)
        ),
        "observation_rate_error_max": float(rate_error.max()),
        "diversity_ratio": diversity_ratio(real_features, features),
        "mean_length": {
            "real": float(real.arrays.lengths.mean()),
            "synthetic": float(synthetic.arrays.lengths.mean()),
        },
        **bounds_report(synthetic),
    }


def conditional_check(model: CGANSynthesizer, holdout: Cohort, n: int = 2000) -> dict:
    """Patients drawn with ``{"In-hospital_death": 1}`` against the holdout's deaths and
    survivors: means of a few static columns and per-patient summaries."""
    outcome = "In-hospital_death"
    if outcome not in holdout.static_columns:
        return {}
    drawn = model.sample(n, conditions={outcome: 1}, seed=7)
    features = patient_summaries(drawn)
    real = patient_summaries(holdout)
    died = holdout.static[outcome].to_numpy() == 1
    columns = [
        c for c in ("SAPS-I", "SOFA", "Age", "n_steps", "HR__mean", "MAP__mean") if c in real
    ]
    return {
        "all_conditions_met": bool((drawn.static[outcome] == 1).all()),
        "means": {
            c: {
                "synthetic_died": float(features[c].mean()),
                "real_died": float(real[c][died].mean()),
                "real_survived": float(real[c][~died].mean()),
            }
            for c in columns
        },
    }


def throughput(model: CGANSynthesizer, n: int, repeats: int = 2) -> dict:
    end_to_end, generation = [], []
    for r in range(repeats):
        started = time.perf_counter()
        model.sample(n, seed=100 + r)
        end_to_end.append(n / (time.perf_counter() - started))
        frame = model._conditions_frame(n, None)
        started = time.perf_counter()
        with torch.no_grad():
            model._generate(frame, torch.Generator().manual_seed(200 + r))
        generation.append(n / (time.perf_counter() - started))
    return {
        "n": n,
        "sample_patients_per_s": max(end_to_end),
        "generate_patients_per_s": max(generation),
    }


def throughput_with_threads(model: CGANSynthesizer, n: int, threads: int) -> dict:
    """:func:`throughput` with ``threads`` torch threads (sampling gets the whole machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {**throughput(model, n), "threads": threads}
    finally:
        torch.set_num_threads(before)


# -- driver ----------------------------------------------------------------------------------------


def run_grid(data: Path, grid: str, args: argparse.Namespace) -> dict:
    resample = None if grid == "raw" else grid
    train = load_physionet2012(data / "set-a.tar.gz", variables=PANEL, resample=resample)
    holdout = load_physionet2012(data / "set-b.tar.gz", variables=PANEL, resample=resample)
    settings = {} if args.epochs is None else {"epochs": args.epochs}
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    if args.rejection_sampling is not None:
        settings["rejection_sampling"] = args.rejection_sampling
        settings["rejection_stages"] = args.rejection_stages
    if args.config:
        settings["config"] = CGANConfig(**json.loads(args.config))
    model = CGANSynthesizer(seed=args.seed, verbose=args.verbose, **settings)
    cpu_started, started = time.process_time(), time.perf_counter()
    model.fit(train)
    fit = {
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "epochs": model.epochs_,
        "batch_size": model.batch_size,
    }
    print(f"[{grid}] fitted in {fit['wall_s']:.0f} s wall, {fit['cpu_s']:.0f} s CPU", flush=True)
    if args.save:
        model.save(Path(args.save).with_suffix(f".{grid}.synthmed"))
    synthetic = model.sample(holdout.n_patients, seed=args.seed + 1)
    holdout_features = patient_summaries(holdout)
    result = {
        "grid": grid,
        "fit": fit,
        "history_tail": model.history_.tail(3).to_dict(orient="list"),
        "synthetic_vs_holdout": fidelity(holdout, synthetic, holdout_features),
        "ceiling_train_vs_holdout": {
            "discriminative": discriminative(holdout_features, patient_summaries(train)),
            "ks_complement_mean": float(np.mean(list(ks_complements(holdout, train).values()))),
        },
        "conditional_death": conditional_check(model, holdout),
        "throughput": throughput_with_threads(model, args.throughput_n, args.sample_threads),
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("SYNTHMED_PHYSIONET_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--grid", action="append", help="raw or a resample width such as 1h")
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config", default=None, help="CGANConfig settings as JSON, e.g. '{\"steps_per_cell\": 5}'"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--throughput-n", type=int, default=20_000)
    parser.add_argument("--save", default=None, help="save fitted models beside this path")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--verbose", action="store_true")
    add_sampling_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "conditions": {
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__,
        },
        "grids": [run_grid(args.data, grid, args) for grid in (args.grid or ["raw"])],
    }
    results["conditions"]["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
