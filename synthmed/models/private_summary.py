"""The noisy cohort summary a private fit starts from: value histograms, stay length, rates.

Scaled by the declared bounds alone, values such as lactate (range 0-40, typical 1-3) start far
from where an untrained generator puts them, and noisy gradients never bring them there (at
epsilon 10 a private LSTM's generated patient had a mean lactate at 39 % of the declared range
on average, a real one 3 %; the private CGAN's RespRate sat at 26 % against 5 %). Both
generators fit their value scaler on these histograms instead (:meth:`PrivateSummary.value_scaler`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from synthmed.cohort import Cohort
from synthmed.models.transforms import ValueScaler, histogram_edges, patient_histograms
from synthmed.schema import Schema

if TYPE_CHECKING:
    from synthmed.models.base import Synthesizer

#: Bins per grid of the value histograms (the union of an even and a log-even grid).
SCALER_BINS = 32

#: Steps per stay a private model learns when none is set: the data's longest stay would leak.
PRIVATE_MAX_STEPS = 256


def warn_unset_steps(setting: str) -> None:
    """Warn (``PrivacyWarning``) that a private fit learns ``PRIVATE_MAX_STEPS`` steps per stay
    because ``setting`` (the model's steps-per-stay setting) was left at None."""
    from synthmed.models.privacy import PrivacyWarning

    warnings.warn(
        f"{setting} is not set: under DP the data's longest stay is not read (it would leak), "
        f"so the model learns {PRIVATE_MAX_STEPS} steps per stay. Set {setting} near your "
        "stays' length: training time and quality follow it",
        PrivacyWarning,
        stacklevel=4,
    )


@dataclasses.dataclass
class PrivateSummary:
    """Released by :func:`release_summary`: per numeric variable ``(edges, noisy weights)``, the
    mean stay length in steps, each variable's observations per step and, when asked for, the
    share of patients with at least one observation of each variable (``charted_shares``)."""

    histograms: dict[str, tuple[np.ndarray, np.ndarray]]
    mean_length: float
    observation_rates: dict[str, float]
    charted_shares: dict[str, float] | None = None

    def value_scaler(self, schema: Schema) -> ValueScaler:
        """A value scaler fitted on the histograms (declared bounds where noise drowned one)."""
        return ValueScaler().fit_histograms(self.histograms, schema)


def release_summary(
    synth: Synthesizer,
    cohort: Cohort,
    inside: np.ndarray,
    max_length: int,
    generator: torch.Generator,
    *,
    budget_fraction: float,
    charted: bool = False,
) -> PrivateSummary:
    """One Gaussian mechanism (``privacy.private_sum``) on ``budget_fraction`` of ``synth``'s
    budget over the steps ``inside`` (``[n_patients, steps]``, those the model will learn from):
    per numeric variable a histogram of its values (each patient's share of observations per
    bin of the declared range, see ``histogram_edges``), the mean stay length, each variable's
    observations per step and, with ``charted``, the share of patients who have it at all.

    Bins below three noise deviations are dropped: kept, the noise in the many empty bins would
    add a uniform floor of false mass and inflate the scale.
    """
    from synthmed.models.privacy import private_sum

    schema, arrays = cohort.schema, cohort.arrays
    variables = list(arrays.variables)
    numeric = [v for v in variables if schema[v].kind == "numeric"]
    lengths = inside.sum(axis=1)
    mask = arrays.mask & inside[..., None]
    positions = [variables.index(v) for v in numeric]
    edges = [histogram_edges(schema[v], SCALER_BINS) for v in numeric]
    shares = patient_histograms(arrays.values[:, :, positions], mask[:, :, positions], edges)
    parts = [
        shares.reshape(len(shares), -1),
        (lengths / max_length)[:, None],
        mask.sum(axis=1) / np.maximum(lengths, 1)[:, None],
    ]
    # The charted flags together have a norm of at most 1, so that they cost the histograms
    # little noise (as much as one more histogram) for a noise on each share sqrt(V) times theirs.
    flag_weight = 1 / math.sqrt(len(variables))
    if charted:
        parts.append(mask.any(axis=1) * flag_weight)
    rows = np.concatenate(parts, axis=1)
    # Each histogram has an L2 norm of at most 1, the length and rates are in [0, 1], and the
    # charted flags (when asked for) have a norm of at most 1 together.
    scale = math.sqrt(len(numeric) + 1 + len(variables) + charted)
    sums, noise = private_sum(synth, rows / scale, generator, budget_fraction=budget_fraction)
    sums, noise = sums * scale, noise * scale
    n = len(rows)
    n_bins = 2 * SCALER_BINS - 1
    counts = sums[: len(numeric) * n_bins].reshape(len(numeric), n_bins)
    counts = np.where(counts > 3 * noise, counts, 0.0)
    tail = sums[len(numeric) * n_bins :]

    def released_shares(at: int, weight: float = 1.0) -> dict[str, float]:
        released = np.clip(tail[at : at + len(variables)] / (n * weight), 0.01, 0.99)
        return dict(zip(variables, released.tolist(), strict=True))

    return PrivateSummary(
        histograms=dict(zip(numeric, zip(edges, counts, strict=True), strict=True)),
        mean_length=float(np.clip(tail[0] / n, 1 / max_length, 1.0) * max_length),
        observation_rates=released_shares(1),
        charted_shares=released_shares(1 + len(variables), flag_weight) if charted else None,
    )
