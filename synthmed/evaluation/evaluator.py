"""``synthmed.evaluate``: fidelity, utility and privacy of a synthetic cohort in one call."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from synthmed.cohort import Cohort
from synthmed.errors import DataError, SchemaError
from synthmed.evaluation.base import Score, limit_threads
from synthmed.evaluation.fidelity import fidelity_scores
from synthmed.evaluation.privacy import privacy_scores, spent_budget
from synthmed.evaluation.report import SCORE_COLUMNS, SECTIONS, Report
from synthmed.evaluation.utility import utility_scores

logger = logging.getLogger("synthmed")

#: Fewest patients a cohort needs to be evaluated (the discriminators use 5 folds per class).
MIN_PATIENTS = 10


def _check_cohort(cohort: object, label: str) -> None:
    if not isinstance(cohort, Cohort):
        raise DataError(f"{label} must be a synthmed.Cohort, got {type(cohort).__name__}")
    if cohort.n_patients < MIN_PATIENTS:
        raise DataError(
            f"the {label} cohort has {cohort.n_patients} patients; evaluation needs at least "
            f"{MIN_PATIENTS}"
        )
    if len(cohort.events) == 0:
        raise DataError(f"the {label} cohort has no event rows: nothing to evaluate")


def _check_same_schema(real: Cohort, other: Cohort, label: str) -> None:
    """Raise SchemaError naming the first column in which ``other`` differs from ``real``."""
    for kind, expected, got in (
        ("temporal", real.variables, other.variables),
        ("static", real.static_columns, other.static_columns),
    ):
        missing = [c for c in expected if c not in got]
        extra = [c for c in got if c not in expected]
        if missing or extra:
            what = (
                f"lacks {kind} column {missing[0]!r}"
                if missing
                else (f"has {kind} column {extra[0]!r} that the real cohort lacks")
            )
            raise SchemaError(f"the {label} cohort {what}; both must have the same schema")
    for name in (*real.variables, *real.static_columns):
        a, b = real.schema[name], other.schema[name]
        if (a.kind, a.role, a.categories) != (b.kind, b.role, b.categories):
            raise SchemaError(
                f"column {name!r} is {a.kind}/{a.role} with categories {a.categories} in the real "
                f"cohort but {b.kind}/{b.role} with categories {b.categories} in the {label} one"
            )


def _with_ceiling(scores: list[Score], ceiling: list[Score]) -> list[Score]:
    reference = {(s.metric, s.variable): s.value for s in ceiling}
    return [
        Score(
            s.section,
            s.metric,
            s.variable,
            s.value,
            s.goal,
            reference.get((s.metric, s.variable), np.nan),
        )
        for s in scores
    ]


def evaluate(
    real: Cohort,
    synthetic: Cohort,
    train: Cohort | None = None,
    *,
    history: pd.DataFrame | None = None,
    seed: int = 0,
    gru: bool = True,
    threads: int | None = 1,
) -> Report:
    """Score how faithful, useful and private ``synthetic`` is.

    Args:
        real: Real patients the generator never saw (a holdout).
        synthetic: The synthetic cohort, with the same schema as ``real``.
        train: The real patients the generator was fitted on. Enables the privacy metrics, TRTR
            on it, and the "real vs real" ceiling of every fidelity metric (``real`` against
            ``train``).
        history: Training-loss history for the report's loss curves (one row per epoch or
            step, one column per loss, optionally an ``epoch`` or ``step`` column); by default
            ``synthetic.metadata["history"]`` when present.
        seed: Seed of every subsample, fold split and model, for reproducible reports.
        gru: Also run the recurrent discriminator (``discriminative_score_gru``), the slowest
            metric.
        threads: Threads the models may use (OpenMP, BLAS, torch). 1 by default: these small
            models gain little from more, and multithreaded OpenMP slows down badly on a busy,
            shared machine. None keeps the libraries' own settings.

    Returns:
        A :class:`Report`: ``report.scores`` (one row per metric and variable; the metrics are
        described in :mod:`synthmed.evaluation.fidelity`, ``.utility`` and ``.privacy`` and
        listed with the damage each catches in :mod:`synthmed.evaluation`),
        ``report.summary()``, ``report.to_html(path)`` and ``report.to_json(path)``.

    Raises:
        DataError: an argument is not a Cohort, has fewer than :data:`MIN_PATIENTS` patients or
            no event rows.
        SchemaError: ``synthetic`` or ``train`` does not have the schema of ``real``.
    """
    _check_cohort(real, "real")
    _check_cohort(synthetic, "synthetic")
    _check_same_schema(real, synthetic, "synthetic")
    if train is not None:
        _check_cohort(train, "train")
        _check_same_schema(real, train, "train")
    started = time.perf_counter()
    with limit_threads(threads):
        scores = fidelity_scores(real, synthetic, seed=seed, gru=gru)
        if train is not None:
            scores = _with_ceiling(scores, fidelity_scores(real, train, seed=seed, gru=gru))
        logger.debug("fidelity scored in %.1f s", time.perf_counter() - started)
        utility, notes = utility_scores(real, synthetic, train, seed=seed)
        scores += utility
        distances = None
        if train is None:
            notes.append("Privacy metrics and fidelity ceilings need the training cohort (train=).")
        else:
            privacy, distances = privacy_scores(real, synthetic, train, seed=seed)
            scores += privacy
    scores += spent_budget(synthetic)
    logger.debug("evaluation done in %.1f s", time.perf_counter() - started)
    table = pd.DataFrame([dataclasses.asdict(s) for s in scores], columns=list(SCORE_COLUMNS))
    metric_order = {m: i for i, m in enumerate(dict.fromkeys(table["metric"]))}
    section_order = {s: i for i, s in enumerate(SECTIONS)}
    table = table.iloc[
        np.lexsort((table["metric"].map(metric_order), table["section"].map(section_order)))
    ]
    if history is None and synthetic.metadata.get("history") is not None:
        history = pd.DataFrame(synthetic.metadata["history"])
    return Report(
        table,
        notes,
        real=real,
        synthetic=synthetic,
        distances=distances,
        history=history,
    )
