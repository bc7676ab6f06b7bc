"""The report's figures, drawn with matplotlib's Agg renderer and returned as base64 PNG.

Every function takes cohorts (or the report's data) and returns the PNG as a base64 string, or
None when the figure does not apply (for example, correlations of fewer than two variables).
Figures are built with :class:`matplotlib.figure.Figure` directly, so pyplot's global state and
the user's backend are never touched.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from synthmed.cohort import Cohort
from synthmed.evaluation.features import numeric_variables, observation_gaps
from synthmed.evaluation.privacy import NearestRecords

REAL = "#1f6fb4"
SYNTHETIC = "#e8711a"
OTHER = "#7a7a7a"
#: Most variables drawn in the sample-patient figure (those observed most often).
SAMPLE_VARIABLES = 6
#: Time bins of the mean-trajectory figure.
TRAJECTORY_BINS = 24


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(n_panels: int, columns: int = 4, size: tuple[float, float] = (3.4, 2.5)):
    columns = max(1, min(columns, n_panels))
    rows = math.ceil(n_panels / columns)
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes[:n_panels]


def _label(cohort: Cohort, name: str) -> str:
    unit = cohort.schema[name].unit
    return f"{name} ({unit})" if unit else name


def _legend(figure: Figure, labels=("real", "synthetic"), colours=(REAL, SYNTHETIC)) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=label) for c, label in zip(colours, labels, strict=True)]
    figure.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)


def _bins(values: np.ndarray, count: int = 40) -> np.ndarray:
    """About ``count`` bins over the central 99% of ``values``; for whole numbers, bins of a
    whole width centred on them (no empty comb teeth)."""
    if not len(values):
        return np.linspace(0.0, 1.0, count + 1)
    low, high = np.percentile(values, [0.5, 99.5])
    if np.all(values == np.round(values)):
        width = max(1.0, np.ceil((high - low + 1) / count))
        return np.arange(np.floor(low) - 0.5, np.ceil(high) + width, width)
    return np.linspace(low, high if high > low else low + 1.0, count + 1)


def marginals(real: Cohort, synthetic: Cohort) -> str:
    """Histograms (numeric) and frequency bars (categorical) of every temporal variable's
    observed values and every static column, real against synthetic."""
    names = [*real.variables, *real.static_columns]
    figure, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        table = "events" if name in real.variables else "static"
        r = getattr(real, table)[name].dropna()
        s = getattr(synthetic, table)[name].dropna()
        if real.schema[name].kind == "numeric":
            bins = _bins(np.concatenate([r.to_numpy(float), s.to_numpy(float)]))
            for values, colour in ((r, REAL), (s, SYNTHETIC)):
                if len(values):
                    ax.hist(
                        values,
                        bins=bins,
                        density=True,
                        histtype="stepfilled",
                        alpha=0.45,
                        color=colour,
                    )
        else:
            categories = list(real.schema[name].categories)
            width = 0.4
            for offset, values, colour in ((-width / 2, r, REAL), (width / 2, s, SYNTHETIC)):
                share = values.value_counts(normalize=True).reindex(categories, fill_value=0)
                ax.bar(np.arange(len(categories)) + offset, share.to_numpy(), width, color=colour)
            ax.set_xticks(np.arange(len(categories)), [str(c) for c in categories])
        ax.set_title(_label(real, name), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    _legend(figure)
    return _png(figure)


def _binned(cohort: Cohort, variable: str, edges: np.ndarray) -> pd.DataFrame:
    events = cohort.events[[cohort.time_column, variable]].dropna()
    bins = np.clip(np.digitize(events[cohort.time_column], edges) - 1, 0, len(edges) - 2)
    grouped = events[variable].groupby(bins)
    frame = pd.DataFrame(
        {"mean": grouped.mean(), "low": grouped.quantile(0.1), "high": grouped.quantile(0.9)}
    )
    frame.index = (edges[:-1] + edges[1:])[frame.index] / 2
    return frame


def trajectories(real: Cohort, synthetic: Cohort) -> str | None:
    """Mean of each numeric variable over time with its 10-90% band, real against synthetic."""
    variables = numeric_variables(real)
    if not variables:
        return None
    times = real.events[real.time_column]
    edges = np.linspace(0.0, max(float(times.quantile(0.99)), 1e-9), TRAJECTORY_BINS + 1)
    figure, axes = _grid(len(variables))
    for ax, variable in zip(axes, variables, strict=True):
        for cohort, colour in ((real, REAL), (synthetic, SYNTHETIC)):
            frame = _binned(cohort, variable, edges)
            ax.plot(frame.index, frame["mean"], color=colour, lw=1.5)
            ax.fill_between(frame.index, frame["low"], frame["high"], color=colour, alpha=0.2)
        ax.set_title(_label(real, variable), fontsize=9)
        ax.set_xlabel(f"time ({real.schema.time_unit})", fontsize=8)
        ax.tick_params(labelsize=7)
    _legend(figure, ("real: mean, 10-90%", "synthetic: mean, 10-90%"))
    return _png(figure)


def sample_patients(real: Cohort, synthetic: Cohort, n: int = 3, seed: int = 0) -> str | None:
    """``n`` random real and ``n`` random synthetic patients side by side, one row per variable
    (the :data:`SAMPLE_VARIABLES` numeric variables observed most often)."""
    variables = numeric_variables(real)
    if not variables:
        return None
    counts = real.events[variables].notna().sum().sort_values(ascending=False)
    variables = list(counts.index[:SAMPLE_VARIABLES])
    rng = np.random.default_rng(seed)
    chosen = []
    for cohort, colour, label in ((real, REAL, "real"), (synthetic, SYNTHETIC, "synthetic")):
        with_events = pd.unique(cohort.events[cohort.id_column])
        picks = rng.choice(len(with_events), min(n, len(with_events)), replace=False)
        chosen += [(cohort, with_events[i], colour, label) for i in picks]
    figure = Figure(figsize=(2.4 * len(chosen), 1.5 * len(variables) + 0.6), layout="constrained")
    axes = figure.subplots(len(variables), len(chosen), squeeze=False, sharex=True, sharey="row")
    for column, (cohort, patient, colour, label) in enumerate(chosen):
        events = cohort.events[cohort.events[cohort.id_column] == patient]
        axes[0, column].set_title(f"{label} {patient}", fontsize=8, color=colour)
        for row, variable in enumerate(variables):
            points = events[[cohort.time_column, variable]].dropna()
            ax = axes[row, column]
            ax.plot(
                points[cohort.time_column], points[variable], color=colour, lw=1, marker=".", ms=3
            )
            ax.tick_params(labelsize=7)
            if column == 0:
                ax.set_ylabel(variable, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(f"time ({real.schema.time_unit})", fontsize=8)
    return _png(figure)


def correlations(real: Cohort, synthetic: Cohort) -> str | None:
    """Pearson correlation matrices of the numeric temporal variables over event rows (pairwise
    complete), real, synthetic and their difference."""
    variables = numeric_variables(real)
    if len(variables) < 2:
        return None
    matrices = [real.events[variables].corr(), synthetic.events[variables].corr()]
    matrices.append(matrices[1] - matrices[0])
    titles = ("real", "synthetic", "synthetic - real")
    side = 1.6 + 0.38 * len(variables)
    figure = Figure(figsize=(3 * side, side), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, matrix, title in zip(axes, matrices, titles, strict=True):
        image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(variables)), variables, rotation=90, fontsize=7)
        ax.set_yticks(range(len(variables)), variables, fontsize=7)
        ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _png(figure)


def observation_rates(real: Cohort, synthetic: Cohort) -> str:
    """Share of event rows in which each temporal variable is observed."""
    variables = real.variables
    figure = Figure(figsize=(max(4.0, 0.7 * len(variables) + 1.5), 2.8), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(variables))
    for offset, cohort, colour in ((-0.2, real, REAL), (0.2, synthetic, SYNTHETIC)):
        ax.bar(x + offset, cohort.events[variables].notna().mean().to_numpy(), 0.4, color=colour)
    ax.set_xticks(x, variables, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("observed in share of rows", fontsize=8)
    ax.set_ylim(0, 1)
    _legend(figure)
    return _png(figure)


def structure(real: Cohort, synthetic: Cohort) -> str:
    """Sequence lengths and time gaps between consecutive steps (log scale)."""
    figure, axes = _grid(2, size=(4.2, 2.6))
    lengths = [c.arrays.lengths for c in (real, synthetic)]
    bins = _bins(np.concatenate(lengths))
    gaps = [observation_gaps(c.arrays) for c in (real, synthetic)]
    positive = np.concatenate(gaps)
    positive = positive[positive > 0]
    gap_bins = (
        np.geomspace(positive.min(), positive.max() * 1.01, 41)
        if len(positive)
        else np.linspace(0, 1, 41)
    )
    for values, colour in zip(lengths, (REAL, SYNTHETIC), strict=True):
        axes[0].hist(
            values, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=colour
        )
    for values, colour in zip(gaps, (REAL, SYNTHETIC), strict=True):
        axes[1].hist(
            values[values > 0],
            bins=gap_bins,
            density=True,
            histtype="stepfilled",
            alpha=0.45,
            color=colour,
        )
    axes[0].set_title("steps per patient", fontsize=9)
    axes[1].set_title(f"gap between steps ({real.schema.time_unit})", fontsize=9)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    _legend(figure)
    return _png(figure)


def privacy_distances(distances: NearestRecords) -> str:
    """Distance to the closest training patient (synthetic vs holdout) and distance to the
    closest synthetic patient (training members vs holdout: the membership attack's signal)."""
    figure, axes = _grid(2, size=(4.2, 2.6))
    panels = (
        (
            distances.synthetic_to_train[:, 0],
            distances.holdout_to_train[:, 0],
            ("synthetic → train", "holdout → train"),
            (SYNTHETIC, REAL),
            "distance to closest training patient",
        ),
        (
            distances.train_to_synthetic,
            distances.holdout_to_synthetic,
            ("train → synthetic", "holdout → synthetic"),
            (OTHER, REAL),
            "distance to closest synthetic patient",
        ),
    )
    for ax, (a, b, labels, colours, title) in zip(axes, panels, strict=True):
        high = max(float(np.percentile(np.concatenate([a, b]), 99)), 1e-9)
        bins = np.linspace(0, high, 41)
        for values, label, colour in zip((a, b), labels, colours, strict=True):
            ax.hist(
                np.minimum(values, high),
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.45,
                color=colour,
                label=label,
            )
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    return _png(figure)


def training_history(history: pd.DataFrame) -> str | None:
    """One curve per numeric column of a training history (x: ``epoch``, ``step`` or row)."""
    x_name = next((c for c in ("epoch", "step") if c in history.columns), None)
    x = history[x_name] if x_name else pd.Series(np.arange(len(history)))
    losses = [
        c for c in history.columns if c != x_name and pd.api.types.is_numeric_dtype(history[c])
    ]
    if not losses or not len(history):
        return None
    figure = Figure(figsize=(6.5, 3.0), layout="constrained")
    ax = figure.subplots()
    for name in losses:
        ax.plot(x, history[name], lw=1.5, label=name)
    ax.set_xlabel(x_name or "step", fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    ax.tick_params(labelsize=7)
    return _png(figure)


def utility_bars(scores: pd.DataFrame) -> str | None:
    """TSTR against TRTR: outcome AUROC and the next-measurement MAE ratio per variable."""
    ratios = scores[(scores["metric"] == "next_value_mae_ratio") & scores["variable"].notna()]
    auroc = scores[scores["metric"].isin(["tstr_auroc", "trtr_auroc"])]
    if ratios.empty and auroc.empty:
        return None
    figure, axes = _grid(2, size=(4.2, 2.8))
    axes[0].bar(auroc["metric"], auroc["value"], color=[SYNTHETIC, REAL][: len(auroc)])
    axes[0].set_ylim(0, 1)
    axes[0].axhline(0.5, color=OTHER, lw=1, ls="--")
    axes[0].set_title("outcome AUROC on real holdout", fontsize=9)
    axes[1].bar(ratios["variable"], ratios["value"], color=SYNTHETIC)
    axes[1].axhline(1.0, color=OTHER, lw=1, ls="--")
    axes[1].set_title("next-value MAE, TSTR / TRTR", fontsize=9)
    axes[1].tick_params(axis="x", rotation=45)
    for ax in axes:
        ax.tick_params(labelsize=7)
    return _png(figure)
