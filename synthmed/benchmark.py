"""The PhysioNet 2012 benchmark: every generator fitted, sampled, timed and evaluated.

:func:`run_benchmark` trains each generator on PhysioNet/CinC 2012 set-a, samples as many
patients as set-b (the holdout) has, evaluates the synthetic cohort with
:func:`synthmed.evaluate` and writes a results table and one HTML report per generator.

Each generator runs in its own subprocess (``python -m synthmed.benchmark --worker ...``), so the
peak resident memory it reports (``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the worker)
is that generator's alone. The worker reads the training cohort from a Parquet file written once
by the parent and writes its synthetic cohort back to Parquet; the parent evaluates it.

Gretel's DGAN runs the same way but in its own virtual environment (``gretel-synthetics``
pins old numpy/pandas): ``benchmarks/dgan_runner.py`` under the interpreter named by
``$SYNTHMED_DGAN_PYTHON`` or ``benchmarks/.dgan-venv/bin/python``. DGAN needs fixed-length
sequences without gaps, so it gets the hourly grid (48 one-hour bins, each variable's mean per
bin, gaps forward- then backward-filled, variables never measured set to the training median)
and its output is a fully observed hourly cohort; it is still evaluated against the raw,
irregular holdout, like every other generator.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort

logger = logging.getLogger("synthmed")

#: The vitals panel of the benchmark.
PANEL = ("HR", "MAP", "SysABP", "DiasABP", "RespRate", "Temp", "SaO2", "Glucose")

#: Generator name -> (module, class). "dgan" is external (its own virtual environment).
GENERATORS: dict[str, tuple[str, str]] = {
    "lstm": ("synthmed.models.lstm", "LSTMSynthesizer"),
    "cgan": ("synthmed.models.cgan", "CGANSynthesizer"),
    "par": ("synthmed.baselines.par", "PARBaseline"),
    "gaussian-copula": ("synthmed.baselines.gaussian_copula", "GaussianCopulaBaseline"),
}
OURS = ("lstm", "cgan")
#: Started first when generators run side by side (``jobs > 1``): they take the longest.
SLOW_GENERATORS = ("par", "dgan")
DEFAULT_GENERATORS = ("lstm", "cgan", "par", "gaussian-copula", "dgan")

DGAN_STEPS = 48
DGAN_HOURS = 48.0
DGAN_SAMPLE_LEN = 4
REPO_ROOT = Path(__file__).resolve().parent.parent
DGAN_RUNNER = REPO_ROOT / "benchmarks" / "dgan_runner.py"
DGAN_VENV_PYTHON = REPO_ROOT / "benchmarks" / ".dgan-venv" / "bin" / "python"

SECTION_START = "<!-- synthmed-benchmark:start -->"
SECTION_END = "<!-- synthmed-benchmark:end -->"

#: Table columns: (key in a result row, header, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("generator", "generator", "{}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("patients_per_s", "sampled patients/s", "{:,.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("par_fit_ratio", "fit_s(PAR) / fit_s", "{:.1f}×"),
    ("par_speed_ratio", "patients/s ÷ PAR's", "{:,.0f}×"),
    ("discriminative_score", "discriminative score ↓", "{:.3f}"),
    ("ks_complement", "mean KSComplement ↑", "{:.3f}"),
    ("observation_rate_error", "observation-rate error ↓", "{:.3f}"),
    ("tstr_auroc", "TSTR AUROC ↑", "{:.3f}"),
    ("trtr_auroc", "TRTR AUROC", "{:.3f}"),
    ("next_value_mae_ratio", "next-value MAE ÷ TRTR ↓", "{:.2f}"),
    ("dcr_ratio", "DCR ratio", "{:.2f}"),
    ("membership_inference_auroc", "MIA AUROC (0.5 best)", "{:.3f}"),
)


# -- public entry point ----------------------------------------------------------------------------


def run_benchmark(
    data_dir: str | Path,
    patients: int | None = None,
    generators: Sequence[str] = DEFAULT_GENERATORS,
    out_dir: str | Path = "benchmarks/out",
    *,
    results_path: str | Path | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    timeout: float | None = None,
    command: str | None = None,
    gru: bool = True,
    jobs: int = 1,
    verbose: bool = True,
) -> pd.DataFrame:
    """Fit, sample, time and evaluate each generator on PhysioNet 2012 (set-a → set-b).

    Args:
        data_dir: Folder holding ``set-a`` / ``set-b`` (folders or ``.tar.gz``) and
            ``Outcomes-a.txt`` / ``Outcomes-b.txt``.
        patients: Take the first N patients of each of set-a and set-b (a quick run); None
            keeps all 4,000 of each.
        generators: Names among ``lstm``, ``cgan``, ``par``, ``gaussian-copula`` and ``dgan``.
            A generator whose code or dependency is missing is skipped with a note.
        out_dir: Where the data files, synthetic cohorts, ``results.json``, ``results.md`` and
            the ``report-<generator>.html`` files go.
        results_path: A Markdown file (e.g. ``benchmarks/results.md``) whose benchmark section
            (between ``SECTION_START`` and ``SECTION_END``) is replaced by this run's, the rest
            of the file kept; None writes only ``out_dir/results.md``.
        settings: Constructor settings per generator, overriding the defaults (e.g.
            ``{"par": {"epochs": 16}}``); recorded in the results. Default: every generator at
            its defaults.
        seed: Seed given to every generator and to the evaluation.
        timeout: Seconds allowed to one generator's fit + sample (None: no limit).
        command: The command line to record in the results (default: this process's).
        gru: Also run the evaluation's recurrent discriminator (its slowest metric).
        jobs: Generators fitted at the same time, each in its own subprocess with
            ``cpu_count // jobs`` torch threads (every generator gets the same share of the
            machine, so the speed ratios stay fair); evaluations run in this process as the
            generators finish.
        verbose: Progress lines on stderr.

    Returns:
        One row per generator: the timings, the metrics and ``note`` (why a generator was
        skipped or failed, or what it was given).
    """
    started = time.perf_counter()
    settings = {k: dict(v) for k, v in (settings or {}).items()}
    unknown = [g for g in generators if g not in (*GENERATORS, "dgan")]
    if unknown:
        raise ValueError(f"unknown generator {unknown[0]!r}; choose from {DEFAULT_GENERATORS}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = _say if verbose else (lambda *_: None)
    say(f"loading PhysioNet 2012 from {data_dir} ...")
    train, holdout = load_benchmark_data(data_dir, patients)
    say(f"train {train.n_patients} patients, holdout {holdout.n_patients} patients")
    train_file = train.to_parquet(out / "train.parquet")
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def produce(name: str) -> tuple[dict[str, Any], Cohort | None]:
        row: dict[str, Any] = {"generator": name, "settings": settings.get(name, {})}
        say(f"[{name}] fitting and sampling ({threads} thread(s)) ...")
        try:
            if name == "dgan":
                synthetic, timing = _run_dgan(
                    train, holdout.n_patients, out, settings.get(name, {}), seed, timeout, threads
                )
                row["note"] = (
                    "hourly grid: 48 bins, gaps filled (ffill/bfill, then median); "
                    f"sample_len={DGAN_SAMPLE_LEN}, DGAN defaults otherwise"
                )
            else:
                missing = missing_dependency(name)
                if missing:
                    raise _Skip(missing)
                synthetic, timing = _run_worker(
                    name,
                    train_file,
                    holdout.n_patients,
                    out,
                    settings.get(name, {}),
                    seed,
                    timeout,
                    threads,
                )
        except _Skip as skip:
            row["note"] = f"skipped: {skip}"
            say(f"[{name}] {row['note']}")
            return row, None
        except Exception as exc:  # a failing generator must not stop the others
            row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            say(f"[{name}] {row['note']}")
            return row, None
        row.update(timing)
        row["threads"] = threads
        say(
            f"[{name}] fit {timing['fit_s']:.1f}s, {timing['patients_per_s']:.1f} patients/s, "
            f"peak {timing['peak_rss_mb']:.0f} MB"
        )
        return row, synthetic

    rows: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # The slowest first, so the others fill the remaining slots (results keep the order asked).
        slow_first = sorted(generators, key=lambda name: name not in SLOW_GENERATORS)
        pending = [pool.submit(produce, name) for name in slow_first]
        for future in concurrent.futures.as_completed(pending):
            row, synthetic = future.result()
            if synthetic is not None:
                name = row["generator"]
                say(f"[{name}] evaluating ...")
                row.update(_evaluate(name, holdout, synthetic, train, out, seed, gru))
                say(f"[{name}] evaluated in {row['evaluate_s']:.0f}s")
            rows.append(row)
            _write_json(out / "results.json", _json_rows(rows))
    rows.sort(key=lambda r: list(generators).index(r["generator"]))
    table = pd.DataFrame(rows)
    _add_ratios(table)
    facts = machine_facts()
    facts["total_s"] = round(time.perf_counter() - started, 1)
    facts["train_patients"] = train.n_patients
    facts["holdout_patients"] = holdout.n_patients
    facts["jobs"] = jobs
    facts["threads_per_generator"] = threads
    command = command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    markdown = results_markdown(table, facts, command)
    (out / "results.md").write_text(markdown + "\n", encoding="utf-8")
    _write_json(
        out / "results.json",
        {"machine": facts, "command": command, "results": _json_rows(table.to_dict("records"))},
    )
    if results_path is not None:
        write_results_section(results_path, markdown)
    say(f"done in {facts['total_s']:.0f}s; results in {out}")
    return table


# -- data ------------------------------------------------------------------------------------------


def load_benchmark_data(data_dir: str | Path, patients: int | None = None) -> tuple[Cohort, Cohort]:
    """``(train, holdout)``: set-a and set-b with the vitals panel, optionally the first N each."""
    from synthmed.datasets import load_physionet2012

    cohorts = []
    for letter in ("a", "b"):
        path = _find_set(Path(data_dir), letter)
        cohort = load_physionet2012(path, variables=list(PANEL))
        if patients is not None:
            if patients < 1:
                raise ValueError(f"patients must be a positive integer, got {patients!r}")
            cohort = cohort.subset(cohort.ids[:patients])
        cohorts.append(cohort)
    return cohorts[0], cohorts[1]


def _find_set(data_dir: Path, letter: str) -> Path:
    for name in (f"set-{letter}", f"set-{letter}.tar.gz", f"set-{letter}.tgz", f"set-{letter}.tar"):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"no set-{letter} folder or archive in {str(data_dir)!r}")


# -- generators in subprocesses --------------------------------------------------------------------


class _Skip(Exception):
    """A generator that cannot run here (missing code or dependency)."""


def missing_dependency(name: str) -> str | None:
    """Why generator ``name`` cannot run in this environment, or None when it can."""
    module, cls = GENERATORS[name]
    try:
        getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        return f"{module}.{cls} is not importable ({exc})"
    if name in ("par", "gaussian-copula"):
        try:
            importlib.import_module("sdv")
        except ImportError:
            return "SDV is not installed (pip install synthmed[sdv])"
    return None


def _run_worker(
    name: str,
    train_file: Path,
    n: int,
    out: Path,
    settings: dict[str, Any],
    seed: int,
    timeout: float | None,
    threads: int,
) -> tuple[Cohort, dict[str, Any]]:
    synthetic_file = out / f"synthetic-{name}.parquet"
    timing_file = out / f"timing-{name}.json"
    timing_file.unlink(missing_ok=True)
    job = {
        "generator": name,
        "train": str(train_file),
        "n": n,
        "settings": settings,
        "seed": seed,
        "synthetic": str(synthetic_file),
        "timing": str(timing_file),
        "threads": threads,
    }
    command = [sys.executable, "-m", "synthmed.benchmark", "--worker", json.dumps(job)]
    _run_child(command, name, out, timeout, threads)
    timing = json.loads(timing_file.read_text())
    return Cohort.read_parquet(synthetic_file), timing


def _run_child(
    command: list[str], name: str, out: Path, timeout: float | None, threads: int
) -> None:
    log = out / f"log-{name}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as handle:
        try:
            result = subprocess.run(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} took longer than {timeout:.0f}s") from None
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{name} exited with status {result.returncode}: {tail[0]} (see {log})")


def worker(job: dict[str, Any]) -> None:
    """Run inside the subprocess: fit one generator, sample, write the cohort and the timings."""
    import torch

    module, cls = GENERATORS[job["generator"]]
    torch.set_num_threads(int(job.get("threads") or max(1, os.cpu_count() or 1)))
    train = Cohort.read_parquet(job["train"])
    synthesizer = getattr(importlib.import_module(module), cls)(
        **{"seed": job["seed"], "verbose": False, **job["settings"]}
    )
    started = time.perf_counter()
    synthesizer.fit(train)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    synthetic = synthesizer.sample(job["n"])
    sample_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    synthetic.to_parquet(job["synthetic"])
    _write_json(
        Path(job["timing"]),
        {
            "fit_s": fit_s,
            "sample_s": sample_s,
            "patients_per_s": job["n"] / sample_s,
            "peak_rss_mb": peak / 2**20,
            "epochs_run": int(len(synthesizer.history_)) if len(synthesizer.history_) else None,
        },
    )


# -- DGAN (its own virtual environment) ------------------------------------------------------------


def dgan_python() -> Path | None:
    """The DGAN environment's interpreter, or None when it is not installed."""
    configured = os.environ.get("SYNTHMED_DGAN_PYTHON")
    path = Path(configured) if configured else DGAN_VENV_PYTHON
    return path if path.exists() else None


def _run_dgan(
    train: Cohort,
    n: int,
    out: Path,
    settings: dict[str, Any],
    seed: int,
    timeout: float | None,
    threads: int,
) -> tuple[Cohort, dict[str, Any]]:
    python = dgan_python()
    if python is None:
        raise _Skip(
            "no DGAN environment (set SYNTHMED_DGAN_PYTHON or create benchmarks/.dgan-venv; "
            "see benchmarks/README-dgan.md)"
        )
    if not DGAN_RUNNER.exists():
        raise _Skip(f"{DGAN_RUNNER} is missing (run from a source checkout)")
    grid = hourly_grid(train)
    folder = out / "dgan"
    folder.mkdir(exist_ok=True)
    grid.features.to_parquet(folder / "features.parquet", index=False)
    grid.attributes.to_parquet(folder / "attributes.parquet", index=False)
    job = {
        "features": grid.variables,
        "attributes": grid.attribute_columns,
        "discrete_attributes": grid.discrete_attributes,
        "max_sequence_len": DGAN_STEPS,
        "sample_len": DGAN_SAMPLE_LEN,
        "n": n,
        "seed": seed,
        "epochs": settings.get("epochs"),
        "threads": threads,
    }
    _write_json(folder / "job.json", job)
    _run_child([str(python), str(DGAN_RUNNER), str(folder)], "dgan", out, timeout, threads)
    timing = json.loads((folder / "timing.json").read_text())
    features = pd.read_parquet(folder / "synthetic-features.parquet")
    attributes = pd.read_parquet(folder / "synthetic-attributes.parquet")
    return grid_to_cohort(features, attributes, train.schema), timing


@dataclasses.dataclass
class HourlyGrid:
    """A cohort on a fixed hourly grid without gaps, as DGAN needs it."""

    features: pd.DataFrame  # columns: patient, step, *variables (float, no NaN)
    attributes: pd.DataFrame  # columns: patient, *static columns (float codes or numbers)
    variables: list[str]
    attribute_columns: list[str]
    discrete_attributes: list[str]


def hourly_grid(cohort: Cohort, steps: int = DGAN_STEPS, hours: float = DGAN_HOURS) -> HourlyGrid:
    """Each variable's hourly mean over ``steps`` bins; gaps filled forward, then backward, then
    with the variable's median; static columns as numbers (categories as codes), NaN → median
    (numbers) or the most frequent category."""
    from synthmed.baselines.gaussian_copula import flatten, grid_column

    schema = cohort.schema
    flat, _ = flatten(cohort, n_steps=steps, horizon=hours)
    n = cohort.n_patients
    variables = list(schema.temporal_columns)
    cube = np.full((n, steps, len(variables)), np.nan)
    for j, variable in enumerate(variables):
        for b in range(steps):
            name = grid_column(variable, b)
            if name in flat:
                cube[:, b, j] = pd.to_numeric(flat[name]).to_numpy(dtype=float)
    for j in range(len(variables)):
        layer = pd.DataFrame(cube[:, :, j]).ffill(axis=1).bfill(axis=1).to_numpy()
        median = np.nanmedian(cube[:, :, j]) if np.isfinite(cube[:, :, j]).any() else 0.0
        cube[:, :, j] = np.where(np.isnan(layer), median, layer)
    features = pd.DataFrame(
        {
            "patient": np.repeat(np.arange(n), steps),
            "step": np.tile(np.arange(steps), n),
            **{v: cube[:, :, j].reshape(-1) for j, v in enumerate(variables)},
        }
    )
    attributes = pd.DataFrame({"patient": np.arange(n)})
    discrete = []
    for name in schema.static_columns:
        column = schema[name]
        if column.kind == "numeric":
            values = cohort.static[name].to_numpy(dtype=float)
            fill = np.nanmedian(values) if np.isfinite(values).any() else 0.0
            attributes[name] = np.where(np.isnan(values), fill, values)
        else:
            from synthmed.encoding import category_codes

            codes = category_codes(cohort.static[name], column.categories)
            observed = codes[codes >= 0]
            mode = int(np.bincount(observed).argmax()) if len(observed) else 0
            attributes[name] = np.where(codes < 0, mode, codes).astype(float)
            discrete.append(name)
    return HourlyGrid(features, attributes, variables, list(schema.static_columns), discrete)


def grid_to_cohort(features: pd.DataFrame, attributes: pd.DataFrame, schema: Any) -> Cohort:
    """DGAN's output (hourly grid + attributes) → a cohort with one event per hour (bin start)."""
    from synthmed.encoding import decode_codes

    features = features.sort_values(["patient", "step"])
    patients = attributes["patient"].to_numpy()
    n = len(patients)
    steps = int(features["step"].max()) + 1
    variables = schema.temporal_columns
    values = np.stack(
        [features[v].to_numpy(dtype=float).reshape(n, steps) for v in variables], axis=2
    )
    for j, variable in enumerate(variables):
        if schema[variable].integer:
            values[:, :, j] = np.round(values[:, :, j])
    times = np.tile(np.arange(steps, dtype=float), (n, 1))
    ids = pd.Index([f"dgan-{i:08d}" for i in range(n)], name=schema.id_column)
    static = pd.DataFrame(index=ids)
    for name in schema.static_columns:
        column = schema[name]
        raw = attributes[name].to_numpy(dtype=float)
        if column.kind == "numeric":
            raw = np.clip(raw, *column.bounds)
            static[name] = np.round(raw) if column.integer else raw
        else:
            codes = np.clip(np.round(raw), 0, len(column.categories) - 1).astype(np.int64)
            static[name] = decode_codes(codes, column.categories)
    lengths = np.full(n, steps, dtype=np.int64)
    metadata = {"source": "synthetic", "generator": "gretel DGAN", "grid": "hourly, gaps filled"}
    return Cohort.from_arrays(static, times, values, lengths, schema, metadata=metadata)


# -- evaluation and the table ----------------------------------------------------------------------


def _evaluate(
    name: str,
    holdout: Cohort,
    synthetic: Cohort,
    train: Cohort,
    out: Path,
    seed: int,
    gru: bool = True,
) -> dict[str, Any]:
    import synthmed

    started = time.perf_counter()
    report = synthmed.evaluate(holdout, synthetic, train=train, seed=seed, gru=gru)
    report.to_html(out / f"report-{name}.html")
    report.to_json(out / f"report-{name}.json")
    metrics = summarize_scores(report.scores, holdout.variables)
    metrics["evaluate_s"] = time.perf_counter() - started
    return metrics


def summarize_scores(
    scores: pd.DataFrame, variables: Sequence[str] | None = None
) -> dict[str, float]:
    """The table's metrics from a report's tidy scores.

    A metric's overall row (``variable`` missing) is used when the report has one; otherwise its
    per-variable rows are averaged. ``observation_rate_error`` is averaged over the temporal
    ``variables`` only (static columns are always present and would dilute it);
    ``KSComplement`` over every numeric column, static ones included.
    """

    def pick(metric: str, only: Sequence[str] | None = None) -> float:
        rows = scores.loc[scores["metric"] == metric]
        overall = rows.loc[rows["variable"].isna()]
        if len(overall):
            rows = overall
        elif only is not None:
            rows = rows.loc[rows["variable"].isin(list(only))]
        values = pd.to_numeric(rows["value"], errors="coerce")
        return float(values.mean()) if values.notna().any() else float("nan")

    return {
        "discriminative_score": pick("discriminative_score"),
        "discriminative_auroc": pick("discriminative_auroc"),
        "ks_complement": pick("KSComplement"),
        "observation_rate_error": pick("observation_rate_error", variables),
        "tstr_auroc": pick("tstr_auroc"),
        "trtr_auroc": pick("trtr_auroc"),
        "next_value_mae_ratio": pick("next_value_mae_ratio"),
        "dcr_ratio": pick("dcr_ratio"),
        "membership_inference_auroc": pick("membership_inference_auroc"),
    }


def _add_ratios(table: pd.DataFrame) -> None:
    """Speed against PAR in the same run: fit_s(PAR)/fit_s and patients_per_s/PAR's."""
    table["par_fit_ratio"] = np.nan
    table["par_speed_ratio"] = np.nan
    if "fit_s" not in table or not (table["generator"] == "par").any():
        return
    par = table.loc[table["generator"] == "par"].iloc[0]
    if pd.isna(par.get("fit_s")):
        return
    others = table["generator"] != "par"
    table.loc[others, "par_fit_ratio"] = par["fit_s"] / table.loc[others, "fit_s"]
    table.loc[others, "par_speed_ratio"] = (
        table.loc[others, "patients_per_s"] / par["patients_per_s"]
    )


def machine_facts() -> dict[str, Any]:
    """Cores, memory, library versions and the date, for the results' header."""
    facts: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("synthmed", "torch", "sdv", "sdmetrics"):
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = None
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def results_markdown(table: pd.DataFrame, facts: Mapping[str, Any], command: str) -> str:
    """The benchmark section: the command, the machine and the results table."""
    lines = [
        SECTION_START,
        "## PhysioNet 2012 benchmark",
        "",
        f"Train: set-a, {facts.get('train_patients')} patients; holdout: set-b, "
        f"{facts.get('holdout_patients')} patients; variables: {', '.join(PANEL)}. Each generator "
        "at its defaults unless noted, fitted and sampled in its own subprocess; synthetic "
        "cohorts as large as the holdout, scored with `synthmed.evaluate(holdout, synthetic, "
        "train=train)`.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {facts.get('cpu_cores')} cores ({facts.get('cpu')}), {facts.get('ram_gb')} GB "
        f"RAM; Python {facts.get('python')}, torch {facts.get('torch')}, SDV {facts.get('sdv')}, "
        f"SDMetrics {facts.get('sdmetrics')}, synthmed {facts.get('synthmed')}; "
        f"{facts.get('date_utc')} UTC; {facts.get('jobs', 1)} generator(s) at a time with "
        f"{facts.get('threads_per_generator', facts.get('cpu_cores'))} torch thread(s) each; "
        f"whole run {facts.get('total_s')} s.",
        "",
        "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in table.to_dict("records"):
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if key == "generator":
                cells.append(str(value))
            elif value is None or (isinstance(value, float) and not np.isfinite(value)):
                cells.append("—")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- **{row['generator']}**: {row['note']}"
        for row in table.to_dict("records")
        if isinstance(row.get("note"), str) and row.get("note")
    ]
    notes += [
        f"- **{row['generator']}** settings: `{json.dumps(row['settings'])}`"
        for row in table.to_dict("records")
        if isinstance(row.get("settings"), dict) and row["settings"]
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += [
        "",
        "Reading the table: discriminative score is |accuracy − 0.5| of a classifier telling "
        "real from synthetic patients (0 is best); TSTR AUROC is in-hospital death predicted by "
        "a model trained on synthetic data and tested on the holdout, TRTR the same trained on "
        "real data; next-value MAE ÷ TRTR is the forecasting error relative to training on real "
        "data (1 is as good as real); DCR ratio compares synthetic→train and holdout→train "
        "distances to the closest record (about 1 or more: no closer to training patients than "
        "new real patients are); MIA AUROC is a distance-based membership-inference attack "
        "(0.5: no better than chance). Speed ratios divide by PAR's figures of the same run. "
        "One HTML report per generator is in the output folder.",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_results_section(path: str | Path, section: str) -> Path:
    """Replace the benchmark section of a Markdown file (appending it when absent)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# synthmed benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        before = text[: text.index(SECTION_START)]
        after = text[text.index(SECTION_END) + len(SECTION_END) :]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


# -- helpers ---------------------------------------------------------------------------------------


def _say(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"{stamp} {message}", file=sys.stderr, flush=True)


def _json_rows(rows: Any) -> Any:
    return json.loads(json.dumps(rows, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _write_json(path: Path, data: Any) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(_json_rows(data)), indent=2), encoding="utf-8")


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="internal: one benchmark worker")
    parser.add_argument("--worker", required=True, help="the job, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    worker(json.loads(args.worker))


if __name__ == "__main__":
    _main()
