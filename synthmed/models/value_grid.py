"""Where recorded values lie, and putting generated values there.

Charted values sit on a grid (whole beats per minute, 0.1 °C, whole minutes) or on a small set
of frequent values (heights converted from whole inches, hourly means that are whole beats or
halves). :func:`detect_resolution` and :func:`frequent_values` find these in training data;
:func:`snap` and :func:`cell_boundaries` move generated values onto the frequent values, each
in proportion to how often it was seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Candidate resolutions (grid steps) of recorded values, tried from the coarsest.
_RESOLUTIONS = tuple(m * 10.0**e for e in range(3, -5, -1) for m in (5, 2, 1))
#: Share of values that must lie on a grid for it to count as the variable's resolution.
ON_GRID = 0.995
#: Frequent values (seen at least _MIN_COUNT times, together covering _COVERAGE of a variable's
#: values; the most frequent of them up to _TARGET_SHARE, at most _MAX_SUPPORT) are where
#: generated values are snapped, each with the probability of the share they cover. A coverage
#: of one half also catches heaped values, such as weights recorded mostly in whole or round
#: kilograms among others to 0.1 kg.
_MIN_COUNT = 5
_COVERAGE = 0.5
_TARGET_SHARE = 0.95
_MAX_SUPPORT = 2048
#: Most bins :func:`cell_index` lays over the bounds before it falls back to a binary search.
_MAX_BINS = 1 << 16
#: Farthest a generated value is moved onto a frequent value, in median spacings of the
#: frequent values: a gap in them is a range the training values seldom took, not one value's
#: cell. Without it, generated diastolic pressures anywhere from 1 to 15 mmHg became 0 (a
#: frequent artefact value, with the next frequent value at 31): 3.0 % of generated values
#: against 0.34 % of recorded ones.
REACH = 2.0


def detect_resolution(values: np.ndarray) -> float:
    """The coarsest grid step (5, 2 or 1 times a power of ten) on which at least 99.5% of the
    finite ``values`` lie, or 0.0 when they look continuous (or are fewer than 20)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 20:
        return 0.0
    sample = values[:: max(1, len(values) // 20_000)]
    spread = float(sample.max() - sample.min())
    for step in _RESOLUTIONS:
        if step > spread / 2:
            continue  # a grid coarser than the data's range says nothing
        ratio = sample / step
        if np.mean(np.abs(ratio - np.round(ratio)) < 1e-3) >= ON_GRID:
            return step
    return 0.0


def _parts_per_unit(step: float) -> int | None:
    """``n`` when ``step`` is ``1/n`` of the time unit up to float error (a minute of an hour
    measured as 0.016666666666666607, or ``1/49``, whose inverse is 49.00000000000001), else
    None."""
    inverse = 1.0 / step
    n = round(inverse)
    return n if n >= 1 and abs(inverse - n) < 1e-6 * inverse else None


def exact_step(step: float) -> float:
    """``step`` as the exact fraction of the unit it stands for, when it is one (0.0166...
    measured between two times becomes 1/60), so that :func:`grid_times` recognises it."""
    n = _parts_per_unit(step)
    return 1.0 / n if n else step


def grid_times(multiples: np.ndarray, step: float) -> np.ndarray:
    """Times at whole ``multiples`` of a grid ``step``, as the float nearest each: ``k / n``
    when the step is ``1/n`` of the time unit (minutes of an hour: ``k / 60``), else
    ``k * step``. Loaders and generators that both write times this way write the same
    floats for the same minute (``k * (1/60)`` differs from ``k / 60`` for one minute in ten),
    not neighbours of them that a classifier (or a reader of the CSV) tells apart."""
    multiples = np.asarray(multiples, dtype=np.float64)
    n = _parts_per_unit(step)
    return multiples / n if n else multiples * step


def frequent_values(
    values: np.ndarray, min_count: int = _MIN_COUNT, coverage: float = _COVERAGE
) -> tuple[list[float], float, list[float]] | None:
    """``(support, share, weights)`` for a variable recorded on a small set of values (such as
    heights converted from whole inches): the most frequent values, each seen at least
    ``min_count`` times, taken by decreasing frequency until they hold ``_TARGET_SHARE`` of the
    finite ``values`` (sorted), the share they hold, and each one's share of them. None when the
    values seen ``min_count`` times hold less than ``coverage``. Values rarer than ``min_count``
    are never returned, so no single patient's unusual value is reproduced."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    unique, counts = np.unique(values, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    unique, counts = unique[order], counts[order]
    frequent = counts >= min_count
    unique, counts = unique[frequent], counts[frequent]
    shares = np.cumsum(counts) / len(values)
    if len(unique) == 0 or shares[-1] < coverage:
        return None
    size = int(np.searchsorted(shares, _TARGET_SHARE)) + 1
    size = min(size, len(unique))
    if size > _MAX_SUPPORT:
        return None
    order = np.argsort(unique[:size])
    kept = counts[:size][order]
    return (
        [float(v) for v in unique[:size][order]],
        float(shares[size - 1]),
        [float(c) for c in kept / kept.sum()],
    )


def cell_boundaries(support: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """The ``len(support) - 1`` boundaries between the snapping cells of sorted ``support``
    values: a value snaps to the support value whose cell holds it.

    Without ``weights`` the cells meet half-way (nearest value). With them, the boundary between
    neighbours ``a < b`` lies at ``a + (b - a) w_a / (w_a + w_b)``, so under a smooth density
    each value receives mass in proportion to its weight: hourly means of a heart rate are
    whole beats 90 % of the time and halves 6 %, not one half each.
    """
    support = np.asarray(support, dtype=np.float64)
    if weights is None:
        share = np.full(len(support) - 1, 0.5)
    else:
        w = np.asarray(weights, dtype=np.float64)
        share = w[:-1] / (w[:-1] + w[1:])
    return support[:-1] + np.diff(support) * share


def cell_index(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``np.searchsorted(bounds, values)`` (sorted ``bounds``) in linear time: a million values
    against a few hundred bounds took 16 ms of binary search per variable, a sixth of the CGAN's
    hourly sampling.

    Bins of at most half the smallest spacing of ``bounds`` hold at most one bound each, so a
    value's index is the count of bounds below its bin's start plus at most two comparisons
    (two, so that a bin misjudged by rounding at its edge costs nothing). Falls back to the
    binary search when the bins would be too many.
    """
    bounds = np.asarray(bounds, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if len(bounds) < 2:
        return np.searchsorted(bounds, values)
    width = float(np.diff(bounds).min()) / 2
    span = float(bounds[-1] - bounds[0])
    if not width > 0 or span / width > _MAX_BINS:
        return np.searchsorted(bounds, values)
    n_bins = int(span / width) + 1
    starts = bounds[0] + width * np.arange(n_bins)
    below = np.searchsorted(bounds, starts)
    padded = np.r_[bounds, np.inf, np.inf]
    with np.errstate(invalid="ignore"):
        position = np.nan_to_num((values - bounds[0]) / width, nan=0.0)
        bins = np.clip(position, 0, n_bins - 1).astype(np.int64)
        count = below[bins]
        index = count + (padded[count] < values) + (padded[count + 1] < values)
    # NaN sorts after every bound, as in np.searchsorted.
    return np.where(np.isnan(values), len(bounds), index)


def snap(
    values: np.ndarray,
    support: list[float],
    tolerance: float | None = None,
    weights: list[float] | None = None,
) -> np.ndarray:
    """Numpy twin of :meth:`~synthmed.models.lstm_network.ValueCodec._snap`: the support value
    whose cell holds each value (the nearest one, or by ``weights`` as :func:`cell_boundaries`
    says), when it is at most ``REACH`` median spacings of the support away; other values keep
    their own value. With a relative ``tolerance``, only values that close to a support value
    are replaced (to undo float32 rounding of values already snapped)."""
    table = np.asarray(support, dtype=np.float64)
    margin = float(np.median(np.diff(table))) if len(table) > 1 else 0.0
    nearest = table[cell_index(values, cell_boundaries(table, weights))]
    with np.errstate(invalid="ignore"):
        distance = np.abs(values - nearest)
        inside = distance <= REACH * margin
        if tolerance is not None:
            inside &= distance <= tolerance * np.maximum(1.0, np.abs(values))
    return np.where(inside, nearest, values)


def put_on_grid(
    values: np.ndarray,
    grid: dict,
    lower: float | None,
    upper: float | None,
    generator: torch.Generator,
) -> np.ndarray:
    """Generated ``values`` of one column recorded like the training data's: rounded to
    ``grid["resolution"]`` (when positive), then snapped to ``grid["support"]`` (when present)
    with probability ``grid["share"]``, cells weighted by ``grid.get("weights")`` (one draw of
    ``generator`` per finite value), then clipped to ``[lower, upper]`` (None: unbounded).
    NaN stays NaN; only the finite entries are worked on."""
    finite = np.isfinite(values)
    x = np.asarray(values, dtype=np.float64)[finite]
    step = grid.get("resolution", 0.0)
    if step > 0:
        x = np.round(x / step) * step
    if "support" in grid:
        u = torch.rand(x.shape, generator=generator, device=generator.device)
        snapped = snap(x, grid["support"], weights=grid.get("weights"))
        x = np.where(u.cpu().numpy() < grid.get("share", 1.0), snapped, x)
    out = np.array(values, dtype=np.float64)
    low = -np.inf if lower is None else lower
    high = np.inf if upper is None else upper
    out[finite] = np.clip(x, low, high)
    return out
