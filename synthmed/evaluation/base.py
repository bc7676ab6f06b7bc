"""The shape every synthmed metric shares with SDMetrics, and the rows metrics produce."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

from sdmetrics.base import BaseMetric
from sdmetrics.goal import Goal
from threadpoolctl import threadpool_limits


class Metric(BaseMetric):
    """A metric SDMetrics lacks, written in SDMetrics' shape.

    Subclasses set ``name`` (the stable identifier used in :attr:`Report.scores`), ``goal``
    (:class:`sdmetrics.goal.Goal`), ``min_value`` and ``max_value``, and implement ``compute``;
    those that produce several numbers also implement ``compute_breakdown`` returning a dict with
    at least the key ``"score"``.
    """

    @classmethod
    def compute_breakdown(cls, *args, **kwargs) -> dict[str, float]:
        """The metric's value and the numbers behind it (``{"score": ...}`` at least)."""
        return {"score": cls.compute(*args, **kwargs)}


@dataclasses.dataclass(frozen=True)
class Score:
    """One row of :attr:`Report.scores`."""

    section: str
    metric: str
    variable: str | None
    value: float
    goal: str
    ceiling: float = math.nan


def goal_of(metric: type[BaseMetric]) -> str:
    """``"maximize"``, ``"minimize"`` or ``"ignore"`` for an SDMetrics or synthmed metric."""
    goal = metric.goal
    return goal.value if isinstance(goal, Goal) else str(goal)


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Limit OpenMP/BLAS and torch intra-op threads inside the block, then restore them.

    The metrics fit many small models; on a busy machine multithreaded OpenMP (scikit-learn's
    gradient boosting) and torch slow down by an order of magnitude, so :func:`evaluate` runs
    them single-threaded by default. ``None`` leaves the settings alone.
    """
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)
