"""The shareable bundle: a synthetic cohort with its schema, evaluation and datasheet.

``synthmed.share(model, n, train, holdout, out)`` (and ``synthmed share`` on the command line)
writes one folder that can go to a privacy officer as it is:

- ``synthetic.parquet`` and ``synthetic.csv``: the synthetic cohort as a long table (one row per
  patient and time, static columns repeated); the Parquet file carries the schema and provenance.
- ``schema.json``: kinds, roles, units and bounds of every column.
- ``report.html`` and ``report.json``: the evaluation against the holdout and training patients.
- ``README.md``: a datasheet written from facts (generator, settings, seed, training size,
  (epsilon, delta) when trained with DP, summary scores with their real-vs-real ceilings,
  intended use and known limits).

The folder is written under a temporary name beside ``out`` and renamed when complete, so it
is there whole or not at all.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import synthmed
from synthmed.cohort import Cohort
from synthmed.errors import DataError

#: Files of a bundle, with what each holds (also the datasheet's file table).
BUNDLE_FILES = {
    "README.md": "this datasheet",
    "synthetic.parquet": "the synthetic cohort, long table with schema and provenance inside",
    "synthetic.csv": "the same table as CSV",
    "schema.json": "column kinds, roles, units and bounds (synthmed.Schema.from_json)",
    "report.html": "the evaluation report with its plots (one self-contained file)",
    "report.json": "every score of the evaluation, machine-readable",
}

#: Metrics listed in the datasheet, with a plain-words reading.
KEY_METRICS = {
    "KSComplement": "marginals of numeric variables (1 = identical)",
    "TVComplement": "marginals of categorical columns (1 = identical)",
    "MissingValueSimilarity": "share of missing values (1 = identical)",
    "CorrelationSimilarity": "pairwise correlations (1 = identical)",
    "SequenceLengthSimilarity": "number of measurements per patient (1 = identical)",
    "acf_error": "autocorrelation error of the trajectories (0 = identical)",
    "discriminative_score": "|accuracy - 0.5| of a classifier telling real from synthetic "
    "(0 = indistinguishable)",
    "discriminative_auroc": "AUROC of that classifier (0.5 = indistinguishable)",
    "tstr_auroc": "outcome prediction trained on synthetic, tested on real (AUROC)",
    "trtr_auroc": "the same trained on real patients, for reference",
    "next_value_mae_ratio": "next-measurement error, synthetic-trained over real-trained "
    "(1 = as good)",
    "dcr_ratio": "distance to closest training record, synthetic over holdout (>= 1 = no sign "
    "of copying)",
    "nndr": "nearest-neighbour distance ratio",
    "exact_copy_rate": "share of synthetic patients identical to a training patient",
    "membership_inference_auroc": "AUROC of a distance-based membership attack (0.5 = no signal)",
}


def share(
    model: Any,
    n: int,
    train: Cohort | str | Path,
    holdout: Cohort | str | Path,
    out: str | Path,
    *,
    seed: int | None = None,
    conditions: Mapping[str, Any] | pd.DataFrame | None = None,
    overwrite: bool = False,
    gru: bool = True,
    model_path: str | Path | None = None,
) -> Path:
    """Sample ``n`` patients and write the shareable bundle to the new folder ``out``.

    Args:
        model: A fitted :class:`~synthmed.Synthesizer`, or the path of a saved one.
        n: Number of synthetic patients.
        train: The real patients the model was fitted on (a Cohort or a Parquet path written by
            synthmed); needed for the privacy metrics and the real-vs-real ceilings.
        holdout: Real patients the model never saw.
        out: The folder to create.
        seed: Sampling seed (default: the model's stream, starting from its training seed).
        conditions: Passed to ``model.sample`` (fixed static values or a table of rows).
        overwrite: Replace ``out`` when it exists (otherwise that is an error).
        gru: Also run the recurrent discriminator in the evaluation (slower).
        model_path: Shown in the datasheet (set automatically when ``model`` is a path).

    Returns:
        The bundle folder.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        SynthmedError: an unfitted model, cohorts that do not match the model's schema.
    """
    from synthmed.evaluation import evaluate
    from synthmed.models.base import Synthesizer
    from synthmed.models.persistence import load_synthesizer

    if isinstance(model, str | Path):
        model_path = model_path or model
        model = load_synthesizer(model)
    if not isinstance(model, Synthesizer):
        raise DataError(f"model must be a synthmed Synthesizer or a path, got {type(model)}")
    train = _as_cohort(train, "train")
    holdout = _as_cohort(holdout, "holdout")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists already; pass overwrite=True to replace it")
    synthetic = model.sample(
        n if not isinstance(conditions, pd.DataFrame) else None, conditions=conditions, seed=seed
    )
    report = evaluate(holdout, synthetic, train, gru=gru)

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        synthetic.to_parquet(temporary / "synthetic.parquet")
        synthetic.to_long().to_csv(temporary / "synthetic.csv", index=False)
        synthetic.schema.to_json(temporary / "schema.json")
        report.to_html(temporary / "report.html")
        report.to_json(temporary / "report.json")
        datasheet = _datasheet(model, synthetic, train, holdout, report, model_path)
        (temporary / "README.md").write_text(datasheet, encoding="utf-8")
        _replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out


def _as_cohort(value: Cohort | str | Path, label: str) -> Cohort:
    if isinstance(value, Cohort):
        return value
    if isinstance(value, str | Path):
        return Cohort.read_parquet(value)
    raise DataError(f"{label} must be a Cohort or a Parquet path, got {type(value).__name__}")


def _replace(temporary: Path, out: Path) -> None:
    """Move the finished folder into place; an old ``out`` is removed only after that."""
    if not out.exists():
        os.replace(temporary, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(temporary, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- the datasheet ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _ceiling_summary(report: Any) -> dict[str, float]:
    """The report's summary computed on the real-vs-real ceilings (NaN where there are none)."""
    from synthmed.evaluation import Report

    scores = report.scores.copy()
    scores["value"] = scores["ceiling"]
    return Report(scores).summary()


def _metric_rows(scores: pd.DataFrame) -> list[tuple[str, float, float, str, str]]:
    rows = []
    for metric, reading in KEY_METRICS.items():
        found = scores[scores["metric"] == metric]
        if found.empty:
            continue
        overall = found[found["variable"].isna()]
        found = overall if len(overall) else found
        rows.append(
            (
                metric,
                float(found["value"].mean()),
                float(found["ceiling"].mean()),
                str(found["goal"].iloc[0]),
                reading,
            )
        )
    return rows


def _datasheet(
    model: Any,
    synthetic: Cohort,
    train: Cohort,
    holdout: Cohort,
    report: Any,
    model_path: str | Path | None,
) -> str:
    schema = synthetic.schema
    params = model.get_params()
    spent = model.privacy_spent
    summary, ceiling = report.summary(), _ceiling_summary(report)
    lengths = synthetic.events.groupby(synthetic.id_column).size()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Synthetic cohort — datasheet",
        "",
        f"Generated {now} by synthmed {synthmed.__version__}. Every patient in this folder is "
        "synthetic: drawn from a generative model, not copied from a record. This datasheet "
        "was written automatically from the facts below; the numbers come from "
        "`report.json`.",
        "",
        "## Files",
        "",
        "| file | content |",
        "|---|---|",
        *[f"| `{name}` | {text} |" for name, text in BUNDLE_FILES.items()],
        "",
        "## The synthetic cohort",
        "",
        f"- Patients: {synthetic.n_patients}; event rows: {len(synthetic.events)}; "
        f"measurements per patient: median {_fmt(float(lengths.median()) if len(lengths) else 0.0)}"
        f", max {int(lengths.max()) if len(lengths) else 0}.",
        f"- Static columns: {', '.join(schema.static_columns) or '—'}"
        f" (outcomes: {', '.join(schema.outcome_columns) or '—'}).",
        f"- Temporal variables ({len(schema.temporal_columns)}): "
        f"{', '.join(schema.temporal_columns) or '—'}; time in {schema.time_unit} since "
        "the start of each stay.",
        f"- Patient ids start with `{getattr(model, 'id_prefix_', 'syn-')}` and never equal a "
        'real id. `NaN` means "not measured at that time".',
        "",
        "## How it was made",
        "",
        f"- Generator: `{type(model).__name__}` (model type `{model.model_type}`)"
        + (f", file `{Path(model_path).name}`" if model_path else "")
        + ".",
        f"- Trained on {model.n_train_patients_} real patients "
        f"(training cohort given here: {train.n_patients}; holdout never seen by the model: "
        f"{holdout.n_patients}) in {_fmt(getattr(model, 'fit_seconds_', math.nan))} s.",
        f"- Training seed: {model.seed_}; sampling seed: {synthetic.metadata.get('seed', '—')}.",
        f"- Settings: `{json.dumps(params, default=str, sort_keys=True)}`",
    ]
    if model.epochs is None:
        lines.append(f"- Epochs: {model.epochs_}, chosen by `fit` from the training cohort.")
    if model.n_train_patients_ != train.n_patients:
        lines.append(
            f"- **Warning:** the model was trained on {model.n_train_patients_} patients but the "
            f"training cohort given for the evaluation has {train.n_patients}; the privacy "
            "metrics compare against the given cohort only."
        )
    lines += ["", "## Privacy", ""]
    if spent:
        lines.append(
            f"- Trained with differential privacy (DP-SGD, per-patient clipping and noise): "
            f"**epsilon = {_fmt(spent[0])}, delta = {_fmt(spent[1], 2)}**, one patient being the "
            "privacy unit. This bound covers everything released here, whatever is sampled."
        )
    else:
        lines.append(
            "- **Not trained with differential privacy**: no formal privacy guarantee. The "
            "empirical checks below look for signs of memorisation; they are evidence, not a "
            "proof, and a privacy officer should weigh them accordingly."
        )
    lines += [
        "",
        "## Evaluation",
        "",
        "Scores against the real holdout; the ceiling is the same score for the holdout "
        "against the training patients (what real data achieves). Summary numbers are in "
        "[0, 1], higher is better.",
        "",
        "| summary | synthetic | real-vs-real ceiling |",
        "|---|---|---|",
        *[
            f"| {name} | {_fmt(summary.get(name))} | {_fmt(ceiling.get(name))} |"
            for name in ("fidelity", "utility", "privacy")
        ],
        "",
        "| metric | synthetic | ceiling | goal | reading |",
        "|---|---|---|---|---|",
        *[
            f"| `{metric}` | {_fmt(value)} | {_fmt(ceil)} | {goal} | {_cell(reading)} |"
            for metric, value, ceil, goal, reading in _metric_rows(report.scores)
        ],
        "",
    ]
    if report.notes:
        lines += ["Notes from the evaluation:", "", *[f"- {note}" for note in report.notes], ""]
    lines += [
        "## Intended use",
        "",
        "- Developing and testing code, pipelines and analyses before they are run on the real "
        "data; teaching; method development; sharing a realistic example of the data's shape.",
        "- Exploratory statistics whose conclusions will be confirmed on real data.",
        "",
        "Not intended for: clinical decisions about any person, publishing clinical findings "
        "without confirmation on real data, or linking with other datasets to learn about real "
        "patients.",
        "",
        "## Known limits",
        "",
        "- The generator learns the training cohort's distribution: its biases, coding "
        "conventions and selection effects are reproduced, and rare subgroups, rare values and "
        "long-range dependencies are reproduced less faithfully than common ones.",
        "- Relations the evaluation does not measure (e.g. between a variable and a far-later "
        "outcome, or among more than two variables) may be weaker or absent.",
        "- Values are kept inside the schema's bounds and rounded like the source; "
        "implausible combinations can still occur.",
        "- The scores above are estimates on "
        f"{holdout.n_patients} holdout patients and vary with the sample.",
    ]
    if not spent:
        lines.append(
            "- Without differential privacy, outlying training patients may be more exposed "
            "than the average membership-inference score suggests."
        )
    lines.append("")
    return "\n".join(lines)


__all__ = ["BUNDLE_FILES", "share"]
