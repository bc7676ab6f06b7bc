"""The evaluation report: a tidy score table, a three-number summary, JSON and a one-file HTML."""

from __future__ import annotations

import datetime
import html
import json
import math
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort
from synthmed.evaluation import plots
from synthmed.evaluation.privacy import NearestRecords

SCORE_COLUMNS = ("section", "metric", "variable", "value", "ceiling", "goal")
SECTIONS = ("fidelity", "utility", "privacy")

#: How each fidelity metric maps to a quality in [0, 1] for :meth:`Report.summary`.
FIDELITY_QUALITY = {
    "KSComplement": lambda v: v,
    "TVComplement": lambda v: v,
    "MissingValueSimilarity": lambda v: v,
    "CorrelationSimilarity": lambda v: v,
    "SequenceLengthSimilarity": lambda v: v,
    "StatisticMSAS": lambda v: v,
    "InterRowMSAS": lambda v: v,
    "time_gap_similarity": lambda v: v,
    "acf_error": lambda v: 1 - min(v, 1.0),
    "mean_sequence_length_error": lambda v: 1 - min(v, 1.0),
    "discriminative_score": lambda v: 1 - 2 * v,
    "discriminative_score_gru": lambda v: 1 - 2 * v,
}

_CARD_TEXT = {
    "fidelity": "Resemblance of values, missingness, dynamics and sequence structure; "
    "1 is indistinguishable from the real cohort.",
    "utility": "Models trained on synthetic data, tested on real patients, relative to the same "
    "models trained on real data; 1 is as good.",
    "privacy": "Distance of synthetic patients to the training patients relative to unseen "
    "patients, copies and membership inference; 1 is no sign of leakage.",
}
_CARD_METRICS = {
    "fidelity": ("discriminative_score", "discriminative_auroc", "discriminative_score_gru"),
    "utility": ("tstr_auroc", "trtr_auroc", "next_value_mae_ratio"),
    "privacy": ("dcr_ratio", "exact_copy_rate", "membership_inference_auroc", "epsilon"),
}


def _value(scores: pd.DataFrame, metric: str, column: str = "value") -> float:
    """The metric's value (or ceiling) for the cohort as a whole: its only row, or its row
    without variable."""
    rows = scores[scores["metric"] == metric]
    overall = rows[rows["variable"].isna()]
    rows = overall if len(overall) else rows
    return float(rows[column].iloc[0]) if len(rows) else math.nan


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _clip(value: float) -> float:
    return math.nan if math.isnan(value) else min(max(value, 0.0), 1.0)


class Report:
    """Scores of one synthetic cohort against real data, with a summary, JSON and HTML.

    Built by :func:`synthmed.evaluate`. Attributes:

    - ``scores``: tidy DataFrame with columns ``section`` (fidelity, utility, privacy),
      ``metric`` (a stable identifier), ``variable`` (column, ``"a|b"`` pair, or None for the
      cohort as a whole), ``value``, ``ceiling`` (the same metric for the real holdout against
      the training cohort: what real data achieves; NaN when not computed) and ``goal``
      (``maximize``/``minimize``).
    - ``notes``: what was skipped or replaced, in plain words.
    """

    def __init__(
        self,
        scores: pd.DataFrame,
        notes: list[str] | None = None,
        *,
        real: Cohort | None = None,
        synthetic: Cohort | None = None,
        distances: NearestRecords | None = None,
        history: pd.DataFrame | None = None,
    ) -> None:
        self.scores = scores[list(SCORE_COLUMNS)].reset_index(drop=True)
        self.notes = list(notes or [])
        self._real, self._synthetic = real, synthetic
        self._distances = distances
        self._history = history

    def __repr__(self) -> str:
        summary = ", ".join(f"{k}={v:.3f}" for k, v in self.summary().items())
        return f"Report({len(self.scores)} scores; {summary})"

    def summary(self) -> dict[str, float]:
        """One number in [0, 1] per section (1 is best; NaN when the section was not computed).

        - ``fidelity``: the mean, over the fidelity metrics, of each metric's quality averaged
          over its variables. Similarity metrics in [0, 1] (KSComplement, TVComplement,
          MissingValueSimilarity, CorrelationSimilarity, SequenceLengthSimilarity, StatisticMSAS,
          InterRowMSAS, time_gap_similarity) count as they are; ``acf_error`` and
          ``mean_sequence_length_error`` as ``1 - min(value, 1)``; the discriminative scores as
          ``1 - 2 * value``. AUROCs (same classifiers as the scores) and
          ``observation_rate_error`` (``1 - MissingValueSimilarity``) are not counted twice.
        - ``utility``: the mean of the outcome part
          ``clip((tstr_auroc - 0.5) / (trtr_auroc - 0.5), 0, 1)`` and the forecasting part,
          the mean over variables of ``min(1, 1 / next_value_mae_ratio)`` (0 for a variable
          the synthetic cohort gives no training example of).
        - ``privacy``: the mean of ``min(1, dcr_ratio)``, ``min(1, nndr / its ceiling)``,
          ``1 - exact_copy_rate`` and ``clip(2 * (1 - membership_inference_auroc), 0, 1)``.
        """
        scores = self.scores
        fidelity = scores[scores["section"] == "fidelity"]
        qualities = [
            _mean([FIDELITY_QUALITY[metric](v) for v in rows["value"] if not math.isnan(v)])
            for metric, rows in fidelity.groupby("metric", sort=False)
            if metric in FIDELITY_QUALITY
        ]
        tstr, trtr = _value(scores, "tstr_auroc"), _value(scores, "trtr_auroc")
        outcome = _clip((tstr - 0.5) / (trtr - 0.5)) if trtr > 0.5 else math.nan
        forecast = _mean(self._forecast_qualities())
        nndr = scores[scores["metric"] == "nndr"]
        nndr_part = (
            _clip(float(nndr["value"].iloc[0] / nndr["ceiling"].iloc[0]))
            if len(nndr) and nndr["ceiling"].iloc[0] > 0
            else math.nan
        )
        privacy = [
            _clip(_value(scores, "dcr_ratio")),
            nndr_part,
            1 - _value(scores, "exact_copy_rate"),
            _clip(2 * (1 - _value(scores, "membership_inference_auroc"))),
        ]
        return {
            "fidelity": _mean(qualities),
            "utility": _mean([outcome, forecast]),
            "privacy": _mean(privacy),
        }

    def _forecast_qualities(self) -> list[float]:
        """``min(1, 1 / ratio)`` per variable; 0 where only TRTR could be trained."""
        rows = self.scores[
            self.scores["metric"].str.startswith("next_value_mae_")
            & self.scores["variable"].notna()
        ]
        if rows.empty:
            return []
        table = rows.pivot(index="variable", columns="metric", values="value")
        qualities = []
        for ratio, reference in zip(
            table["next_value_mae_ratio"], table["next_value_mae_trtr"], strict=True
        ):
            if not math.isnan(ratio):
                qualities.append(min(1.0, 1.0 / ratio) if ratio > 0 else 1.0)
            elif not math.isnan(reference):
                qualities.append(0.0)
        return qualities

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Summary, scores (one dict per row, NaN as None), notes and the synthetic metadata."""

        def plain(value: Any) -> Any:
            if isinstance(value, float | np.floating):
                return None if math.isnan(value) else float(value)
            return value

        records = [
            {k: plain(v) for k, v in row.items()}
            for row in self.scores.astype(object)
            .where(self.scores.notna(), None)
            .to_dict("records")
        ]
        return {
            "summary": {k: plain(v) for k, v in self.summary().items()},
            "scores": records,
            "notes": self.notes,
            "synthetic_metadata": self._synthetic.metadata if self._synthetic else {},
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` and return the path."""
        path = Path(path)
        _write_atomically(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    # -- HTML ------------------------------------------------------------------------------------

    def figures(self) -> dict[str, tuple[str, str]]:
        """The report's figures: id → (title, base64 PNG), for those that apply."""
        real, synthetic = self._real, self._synthetic
        if real is None or synthetic is None:
            return {}
        drawn = {
            "marginals": ("Marginal distributions", plots.marginals(real, synthetic)),
            "structure": ("Sequence lengths and time gaps", plots.structure(real, synthetic)),
            "trajectories": (
                "Mean trajectories with 10–90% bands",
                plots.trajectories(real, synthetic),
            ),
            "patients": ("Sample patients", plots.sample_patients(real, synthetic)),
            "correlations": ("Correlations between variables", plots.correlations(real, synthetic)),
            "observation-rates": ("Observation rates", plots.observation_rates(real, synthetic)),
            "utility": ("Train on synthetic, test on real", plots.utility_bars(self.scores)),
        }
        if self._distances is not None:
            drawn["privacy-distances"] = (
                "Nearest-record distances",
                plots.privacy_distances(self._distances),
            )
        if self._history is not None:
            drawn["training-history"] = (
                "Training losses",
                plots.training_history(pd.DataFrame(self._history)),
            )
        return {key: item for key, item in drawn.items() if item[1] is not None}

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML file (figures embedded as PNG, no network access)."""
        figures = self.figures()
        sections = {
            "fidelity": [
                "marginals",
                "structure",
                "trajectories",
                "patients",
                "correlations",
                "observation-rates",
            ],
            "utility": ["utility"],
            "privacy": ["privacy-distances"],
            "training": ["training-history"],
        }
        body = []
        for section, keys in sections.items():
            shown = [k for k in keys if k in figures]
            if not shown:
                continue
            body.append(f'<section id="{section}"><h2>{section.capitalize()}</h2>')
            body += [_figure(k, *figures[k]) for k in shown]
            body.append("</section>")
        template = Template(
            resources.files("synthmed.evaluation")
            .joinpath("templates/report.html")
            .read_text(encoding="utf-8")
        )
        page = template.substitute(
            title="synthmed evaluation report",
            generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            provenance=html.escape(_provenance(self._synthetic)),
            cards=self._cards(),
            notes="".join(f"<li>{html.escape(n)}</li>" for n in self.notes),
            figures="\n".join(body),
            table=self._table(),
        )
        path = Path(path)
        _write_atomically(path, page)
        return path

    def _cards(self) -> str:
        summary = self.summary()
        cards = []
        for section in SECTIONS:
            value = summary[section]
            shown = "n/a" if math.isnan(value) else f"{value:.2f}"
            width = 0 if math.isnan(value) else round(100 * value)
            lines = [
                f"<li>{m}: <b>{_fmt(_value(self.scores, m))}</b>"
                + (
                    f" (real vs real {_fmt(_value(self.scores, m, 'ceiling'))})"
                    if not math.isnan(_value(self.scores, m, "ceiling"))
                    else ""
                )
                + "</li>"
                for m in _CARD_METRICS[section]
                if not math.isnan(_value(self.scores, m))
            ]
            cards.append(
                f'<div class="card" id="card-{section}"><h3>{section.capitalize()}</h3>'
                f'<div class="big">{shown}</div>'
                f'<div class="bar"><span style="width:{width}%"></span></div>'
                f"<p>{_CARD_TEXT[section]}</p><ul>{''.join(lines)}</ul></div>"
            )
        return "\n".join(cards)

    def _table(self) -> str:
        rows = []
        for row in self.scores.itertuples(index=False):
            variable = "" if row.variable is None or row.variable != row.variable else row.variable
            rows.append(
                f"<tr><td>{row.section}</td><td>{html.escape(row.metric)}</td>"
                f"<td>{html.escape(str(variable))}</td><td>{_fmt(row.value)}</td>"
                f"<td>{_fmt(row.ceiling)}</td><td>{row.goal}</td></tr>"
            )
        return "\n".join(rows)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}"


def _figure(key: str, title: str, png: str) -> str:
    return (
        f'<figure id="fig-{key}"><figcaption>{html.escape(title)}</figcaption>'
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}"></figure>'
    )


def _provenance(cohort: Cohort | None) -> str:
    if cohort is None:
        return ""
    keys = ("generator", "source", "seed", "epsilon", "delta")
    parts = [f"{k}: {cohort.metadata[k]}" for k in keys if cohort.metadata.get(k) is not None]
    rejection = cohort.metadata.get("rejection_sampling")
    if rejection:
        parts.append(
            f"rejection sampling: kept {rejection['kept']:,} of {rejection['drafted']:,} drafts"
        )
    return f"Synthetic cohort: {cohort.n_patients} patients" + (
        f" ({', '.join(parts)})" if parts else ""
    )


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path``, then rename: never a half-written report."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
