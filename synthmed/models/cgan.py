"""A conditional recurrent GAN for longitudinal patient records (RCGAN / DoppelGANger line).

Generation: a static MLP draws the static attributes (outcome included), conditioned on any
subset of given columns; an LSTM then draws the patient's sequence conditioned on that static
vector, ``steps_per_cell`` steps per LSTM step (DoppelGANger's batch generation). Every step
carries a time gap, an observation mask, the values and an end flag, so irregular times,
missingness and sequence lengths are generated rather than imputed. What RCGAN and DoppelGANger
lack, added here (details in :mod:`synthmed.models.cgan_networks`):

- the elapsed time, each variable's last observed value and which variables were seen are fed
  back into the LSTM at every LSTM step (the state is carried forward, never recomputed);
- per-patient latents drawn with the initial state: each variable's centre and half-range
  (DoppelGANger's per-sample auto-normalisation, values are ``centre + half_range * tanh``),
  a persistence with which values follow their targets (a latent trajectory that the
  observations sample, so consecutive observations are as close as in real records) and the
  end of the observation window (steps past it are cut: stays end where the window ends);
- values and gaps go through soft bounds in the encoded space and hard clipping at decoding,
  so every value honours the schema's bounds (no negative blood pressure); steps in which
  nothing was observed are dropped;
- numeric values are recorded like the training data's (:mod:`synthmed.models.value_grid`):
  rounded to its resolution (whole beats, 0.1 degree; whole numbers for integer columns) and,
  where it has frequent values (hourly means that are whole beats or halves), snapped to them as
  often as real values lay on them, each in proportion to how often it was seen.

Objective: WGAN-GP (Gulrajani et al., 2017) with two critics, one on the static vector (and
which of its columns were given) and one on the whole patient: the static vector,
differentiable per-patient summaries (counts, rates, mean, spread, extremes, first and last
values, step-to-step change, length, duration) and the flattened steps, each embedded by a
shared linear layer. The penalty is taken in the critics' input space; a small drift term keeps
scores near zero. Binary and categorical outputs are straight-through Gumbel samples: critics
see exactly discrete masks, end flags and categories, the generator gets relaxed gradients.
The static part, an MLP that needs several critic updates per generator update to settle,
gets extra cheap updates per batch (``static_critic_steps`` critic updates, then one generator
update; then these are its only updates, keeping that ratio), and it learns from the static
critic alone. Without DP the generators kept are an exponential moving average of their
iterates over about the last ten epochs (Yazici et al., 2019), not the last step against a
moving critic.

Conditioning: the static generator is trained with random condition masks (CTGAN-style). The
given values are the generator's own first, unconditional draw: the critic compares
``(given, drawn)`` with real rows under the same random masks, which teaches every conditional
``p(rest | given)`` while only the critics ever see real data (the property DP training needs).
At sampling, given cells are copied into the vector the sequence generator sees and into the
output exactly.

Differential privacy: only the critics touch real patients, through one DataLoader of patient
indices, so only they are trained with DP-SGD (``Synthesizer._make_private``); the generators learn
from the critics' outputs on generated data and are covered by post-processing. Under DP the
gradient penalty is taken between pairs of generated patients with the per-sample hooks off (no
real data, so its gradient is added after per-patient clipping and noise at no privacy cost), the
extra static critic updates (which would reuse a batch) are off, the critics are narrower
(``CGANConfig.critic_hidden``), and the layout (encoder, gap scale, number of steps) comes from the
schema's bounds and ``config.max_steps`` (256 when None), not the data; the value scaler is fitted
on private value histograms (``private_summary``, 10 % of the budget), and values are rounded only
where the schema marks a column ``integer``.
Losses on real patients are dropped from ``history_`` (``privacy.releasable_history``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from synthmed.cohort import Cohort
from synthmed.encoding import category_codes, decode_codes
from synthmed.errors import DataError, ModelFileError
from synthmed.models.base import GeneratedBatch, Synthesizer, moving_average, pad_steps
from synthmed.models.cgan_networks import (
    STEP_PREFIX,
    Critic,
    Generator,
    Head,
    SequenceGenerator,
    StaticGenerator,
    SummaryParts,
    summaries,
    summary_parts,
)
from synthmed.models.outcome_labeller import OutcomeLabelling, labelled_columns
from synthmed.models.private_summary import (
    PRIVATE_MAX_STEPS,
    PrivateSummary,
    release_summary,
    warn_unset_steps,
)
from synthmed.models.transforms import StaticEncoder, ValueScaler
from synthmed.models.value_grid import (
    detect_resolution,
    exact_step,
    frequent_values,
    grid_times,
    put_on_grid,
)
from synthmed.schema import ColumnSchema, Schema

HISTORY_COLUMNS = (
    "epoch",
    "generator_loss",
    "critic_loss",
    "gradient_penalty",
    "wasserstein_static",
    "wasserstein_patient",
    "seconds",
)
#: History columns that depend on no real patient outside the private critic (kept under DP).
PUBLIC_HISTORY_COLUMNS = ("epoch", "generator_loss", "seconds")


@dataclasses.dataclass
class CGANConfig:
    """Architecture and objective settings of :class:`CGANSynthesizer`.

    Attributes:
        static_noise_dim: Noise dimensions of the static generator.
        static_hidden, static_layers: Width and depth of the static generator.
        sequence_noise_dim: Noise dimensions per patient and per LSTM step.
        lstm_hidden, lstm_layers: Size of the sequence generator's LSTM.
        steps_per_cell: Steps emitted per LSTM step (DoppelGANger's ``sample_len``); larger is
            faster, smaller follows step-to-step dynamics more closely.
        step_embedding: Width of the per-step embedding the patient critic flattens.
        critic_hidden: Width of both critics. None: 256, or 64 under DP, where DP-SGD adds
            noise to every weight and clips every patient's gradient: at epsilon 10 on
            PhysioNet 2012 critics 64 wide gave the generators the same TSTR AUROC and fitted
            in a third of the time.
        critic_layers: Depth of both critics.
        generator_lr, critic_lr: Adam learning rates.
        betas: Adam betas (WGAN-GP's (0.5, 0.9)).
        critic_steps: Critic updates per generator update.
        static_critic_steps: Extra updates of the static critic per batch, followed by one
            extra update of the static generator; 0 disables them. Off under DP, where every
            use of a batch must be accounted for.
        gradient_penalty: Weight of the WGAN-GP gradient penalty.
        drift_penalty: Weight of ``E[critic(real)**2]``, keeping scores near zero.
        static_weight: Weight of the static critic relative to the patient critic.
        condition_rate: Share of training rows whose static draw is conditioned on a random
            subset of columns (so that any subset can be given at sampling).
        temperature: Temperature of the straight-through Gumbel relaxations.
        max_steps: Longest sequence modelled; longer training sequences are truncated. None:
            the longest training sequence, at most 512. Under DP the number of steps is not
            read from the data (it would leak): every stay is modelled over ``max_steps``
            steps, 256 when None; set it near your stays' length, as training time and
            quality follow it (PhysioNet 2012 on the hourly grid: 64).
        max_time: End of the observation window, in the cohort's time unit (PhysioNet 2012:
            48 hours); later steps are dropped. None: the last training time, or under DP,
            where that would leak, ``max_steps`` time units.
        time_grid: The grid the times lie on (1.0 for an hourly grid). None: detected from the
            training times, or under DP none. When the window holds at most ``max_steps`` grid
            slots (and, without DP, at most four times the longest stay's steps), every slot
            is a step and the generator says which slots hold observations: stays then fill
            the window as real ones do (PhysioNet 2012 on the hourly grid: 49 slots). Otherwise
            steps are observations and generated gaps are rounded to the grid.
        sample_batch_size: Patients generated per forward pass when sampling.
    """

    static_noise_dim: int = 32
    static_hidden: int = 128
    static_layers: int = 2
    sequence_noise_dim: int = 16
    lstm_hidden: int = 100
    lstm_layers: int = 1
    steps_per_cell: int = 10
    step_embedding: int = 8
    critic_hidden: int | None = None
    critic_layers: int = 2
    generator_lr: float = 1e-3
    critic_lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)
    critic_steps: int = 1
    static_critic_steps: int = 5
    gradient_penalty: float = 10.0
    drift_penalty: float = 1e-3
    static_weight: float = 1.0
    condition_rate: float = 0.5
    temperature: float = 0.5
    max_steps: int | None = None
    max_time: float | None = None
    time_grid: float | None = None
    sample_batch_size: int = 4096

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive_ints = (
            "static_noise_dim",
            "static_hidden",
            "static_layers",
            "sequence_noise_dim",
            "lstm_hidden",
            "lstm_layers",
            "steps_per_cell",
            "step_embedding",
            "critic_hidden",
            "critic_layers",
            "critic_steps",
            "max_steps",
            "sample_batch_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if value is None and name in ("critic_hidden", "max_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CGANConfig.{name} must be a positive integer, got {value!r}")
        for name in ("generator_lr", "critic_lr", "temperature", "max_time", "time_grid"):
            value = getattr(self, name)
            if value is None and name in ("max_time", "time_grid"):
                continue
            if not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value > 0
            ):
                raise ValueError(f"CGANConfig.{name} must be a positive number, got {value!r}")
        steps = self.static_critic_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"CGANConfig.static_critic_steps must be an integer >= 0, got {steps!r}"
            )
        for name in ("gradient_penalty", "drift_penalty", "static_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CGANConfig.{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.condition_rate <= 1:
            raise ValueError(
                f"CGANConfig.condition_rate must be in [0, 1], got {self.condition_rate!r}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"CGANConfig.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclasses.dataclass
class _Layout:
    """How a cohort maps to tensors; fitted from data, saved with the model."""

    encoder: StaticEncoder
    scaler: ValueScaler
    n_steps: int
    gap_scale: float
    time_max: float
    time_resolution: float | None = None
    #: Per numeric column, where its recorded values lie (see :func:`_fit_grid`).
    grids: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: Steps are the slots of the time grid, ``gap_scale`` (the grid step) apart from time 0.
    slots: bool = False
    #: A step's observation draws share one factor (``SequenceGenerator``'s ``coupled_masks``);
    #: models saved before the coupling drew them independently.
    coupled_masks: bool = False

    @property
    def schema(self) -> Schema:
        return self.encoder.schema_

    @property
    def variables(self) -> list[str]:
        return self.schema.temporal_columns

    @property
    def max_log_gap(self) -> float:
        return float(np.log1p(self.time_max / self.gap_scale))

    def static_heads(self) -> tuple[list[Head], list[tuple[int, int]]]:
        heads, pairs = [], []
        for block in self.encoder.blocks_:
            if block.kind == "numeric":
                column = self.schema[block.name]
                lower, upper = (
                    None if bound is None else float(self.encoder.encode_number(block.name, bound))
                    for bound in (column.lower, column.upper)
                )
                heads.append(Head("numeric", block.start, 1, lower, upper))
                if block.has_missing:
                    heads.append(Head("binary", block.start + 1))
                    pairs.append((block.start, block.start + 1))
            else:
                heads.append(Head("categorical", block.start, block.width))
        return heads, pairs

    def value_heads(self) -> list[Head]:
        schema, heads, start = self.schema, [], 0
        lower = np.array([_bound(schema[v].lower, -np.inf) for v in self.variables])
        upper = np.array([_bound(schema[v].upper, np.inf) for v in self.variables])
        with np.errstate(invalid="ignore", divide="ignore"):
            lower, upper = self.scaler.transform(lower), self.scaler.transform(upper)
        for j, name in enumerate(self.variables):
            column = schema[name]
            if column.kind == "numeric":
                low = float(lower[j]) if np.isfinite(lower[j]) else None
                high = float(upper[j]) if np.isfinite(upper[j]) else None
                heads.append(Head("numeric", start, 1, low, high))
                start += 1
            else:
                heads.append(Head("categorical", start, len(column.categories)))
                start += len(column.categories)
        return heads

    def column_dims(self) -> torch.Tensor:
        """``[n_columns, width]`` 0/1: which encoded dimensions belong to each static column."""
        dims = torch.zeros(len(self.encoder.blocks_), self.encoder.width_)
        for i, block in enumerate(self.encoder.blocks_):
            dims[i, block.start : block.start + block.width] = 1.0
        return dims

    def missing_dims(self) -> torch.Tensor:
        """``[n_columns, width]`` 0/1: each static column's missing-indicator dimension."""
        dims = torch.zeros(len(self.encoder.blocks_), self.encoder.width_)
        for i, block in enumerate(self.encoder.blocks_):
            if block.has_missing:
                dims[i, block.start + block.width - 1] = 1.0
        return dims

    def encode_steps(self, cohort: Cohort) -> torch.Tensor:
        """The cohort's sequences in the critic's step layout, ``[N, n_steps, F]``; steps after
        ``time_max`` are dropped."""
        arrays, t = cohort.arrays, self.n_steps
        n, v = arrays.n_patients, len(self.variables)
        inside = arrays.step_mask & (arrays.times <= self.time_max + 1e-9)
        if self.slots:
            gaps, alive, times, mask, raw = self._slot_arrays(cohort, inside)
        else:
            lengths = np.minimum(inside.sum(1), t)
            width = arrays.values.shape[1]
            alive = np.arange(t)[None, :] < lengths[:, None]
            steps_present = min(width, t)
            gaps = np.zeros((n, t))
            times = np.zeros((n, t))
            mask = np.zeros((n, t, v), dtype=bool)
            raw = np.full((n, t, v), np.nan, dtype=np.float32)
            gaps[:, :steps_present] = arrays.gaps[:, :steps_present]
            times[:, :steps_present] = arrays.times[:, :steps_present]
            mask[:, :steps_present] = arrays.mask[:, :steps_present]
            raw[:, :steps_present] = arrays.values[:, :steps_present]
            mask &= alive[..., None]
        scaled = np.nan_to_num(self.scaler.transform(raw), nan=0.0)
        columns = []
        for j, head in enumerate(self.value_heads()):
            if head.kind == "numeric":
                columns.append(scaled[..., j : j + 1])
            else:
                codes = np.where(mask[..., j], np.nan_to_num(raw[..., j], nan=0), -1).astype(int)
                columns.append(np.eye(head.width + 1, dtype=np.float32)[codes][..., : head.width])
        values = np.concatenate(columns, axis=-1) if columns else np.zeros((n, t, 0))
        values = values * _expand(mask, self.value_heads())
        steps = np.concatenate(
            [
                (np.log1p(gaps / self.gap_scale) * alive)[..., None],
                (times / self.time_max * alive)[..., None],
                alive[..., None],
                mask,
                values,
            ],
            axis=-1,
        )
        return torch.as_tensor(steps, dtype=torch.float32)

    def _slot_arrays(
        self, cohort: Cohort, inside: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(gaps, alive, times, mask, raw values)`` of the steps ``inside`` placed on the grid's
        slots; every time lies on the grid (see ``_fit_layout``), so no two steps share one."""
        arrays, t = cohort.arrays, self.n_steps
        n, v = arrays.n_patients, len(self.variables)
        slot = np.rint(arrays.times / self.gap_scale).astype(np.int64)
        rows, cols = np.nonzero(inside & (slot < t))
        where = (rows, slot[rows, cols])
        alive = np.zeros((n, t), dtype=bool)
        mask = np.zeros((n, t, v), dtype=bool)
        raw = np.full((n, t, v), np.nan, dtype=np.float32)
        alive[where] = True
        mask[where] = arrays.mask[rows, cols]
        raw[where] = arrays.values[rows, cols]
        times = np.broadcast_to(np.arange(t) * self.gap_scale, (n, t))
        return np.zeros((n, t)), alive, times, mask, raw

    def decode_steps(self, steps: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Generated steps → ``(times, values, lengths)``.

        Steps without any observation are dropped, values are put back in schema units inside
        the bounds, and where the training data have a time resolution (whole minutes, an
        hourly grid) the first time and each gap are rounded to it, steps that then share a
        time being merged into one. Rounding the times themselves let the gaps' rounding errors
        add up: on PhysioNet's hourly grid, generated gaps of 0.7-1.5 hours left hours empty and
        doubled others, and stays had 39.8 steps against 43.6 (41.9 with the gaps rounded).
        """
        steps = steps.detach().cpu().numpy()
        v = len(self.variables)
        times = steps[..., 1].astype(np.float64) * self.time_max
        alive = (steps[..., 2] > 0.5) & (steps[..., 1] <= 1.0 + 1e-6)
        if self.slots:
            slots = grid_times(np.arange(steps.shape[1]), self.gap_scale)
            times = np.broadcast_to(slots, times.shape)
        elif self.time_resolution:
            step = self.time_resolution
            # Whole multiples of the grid summed exactly, then scaled: a sum of rounded gaps in
            # floats drifts off the values the data hold (47.6 became 47.600000000002).
            multiples = np.rint(np.diff(times, axis=1, prepend=0.0) / step)
            times = grid_times(np.cumsum(multiples, axis=1), step)
            alive &= times <= self.time_max + 1e-9
        mask = (steps[..., STEP_PREFIX : STEP_PREFIX + v] > 0.5) & alive[..., None]
        raw = steps[..., STEP_PREFIX + v :]
        codes = np.zeros(mask.shape, dtype=np.float32)
        for j, head in enumerate(self.value_heads()):
            part = raw[..., head.start : head.start + head.width]
            codes[..., j] = part[..., 0] if head.kind == "numeric" else part.argmax(-1)
        values = self.scaler.inverse(codes)
        values[~mask] = np.nan
        keep = mask.any(-1)
        # Move kept steps to the front of each row, in order (a stable sort on "not kept").
        order = np.argsort(~keep, axis=1, kind="stable")
        lengths = keep.sum(1)
        width = int(lengths.max()) if len(lengths) else 0
        order = order[:, :width]
        times = np.maximum.accumulate(np.maximum(np.take_along_axis(times, order, 1), 0), axis=1)
        values = np.take_along_axis(values, order[..., None], 1)
        inside = np.arange(width)[None, :] < lengths[:, None]
        return _merge_equal_times(np.where(inside, times, 0.0), values, lengths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.to_dict(),
            "scaler": self.scaler.to_dict(),
            "n_steps": self.n_steps,
            "gap_scale": self.gap_scale,
            "time_max": self.time_max,
            "time_resolution": self.time_resolution,
            "grids": self.grids,
            "slots": self.slots,
            "coupled_masks": self.coupled_masks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: Schema) -> _Layout:
        # Model files store JSON with sorted keys: restore the schema's column order, which
        # fixes each column's slice of the encoded vector.
        columns = data["encoder"]["columns"]
        ordered = {"columns": {name: columns[name] for name in schema.static_columns}}
        # Files written before exact steps hold the grid as measured (0.0166666666666666).
        resolution = data.get("time_resolution")
        return cls(
            StaticEncoder.from_dict(ordered, schema),
            ValueScaler.from_dict(data["scaler"], schema),
            int(data["n_steps"]),
            float(data["gap_scale"]),
            float(data["time_max"]),
            exact_step(resolution) if resolution else resolution,
            _saved_grids(data.get("grids", {})),
            bool(data.get("slots", False)),
            bool(data.get("coupled_masks", False)),
        )

    def to_grid(self, name: str, values: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Generated ``values`` of numeric column ``name`` recorded like the training data's
        (see :func:`~synthmed.models.value_grid.put_on_grid`)."""
        grid, column = self.grids.get(name), self.schema[name]
        if grid is None:
            return values
        return put_on_grid(values, grid, column.lower, column.upper, generator)


def _fit_grid(observed: np.ndarray | None, column: ColumnSchema) -> dict[str, Any]:
    """Where a numeric column's recorded values lie: ``{"resolution": step}`` (0.0 for none;
    at least 1 for ``integer`` columns) and, when the column has frequent values, their
    ``support``, the ``share`` of values on it and each one's ``weights`` (see
    :func:`~synthmed.models.value_grid.frequent_values`). With ``observed`` None (under DP)
    nothing is learnt from data: only the schema's ``integer`` flag counts."""
    step = 0.0 if observed is None else detect_resolution(observed)
    grid: dict[str, Any] = {"resolution": max(step, 1.0) if column.integer else step}
    found = None if observed is None else frequent_values(observed)
    if found is not None:
        grid["support"], grid["share"], grid["weights"] = found
    return grid


def _saved_grids(grids: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The grids of a model file, refused when written before they recorded a resolution."""
    for name, grid in grids.items():
        if "resolution" not in grid:
            raise ModelFileError(
                f"the model file records the value grid of {name!r} in an older format "
                f"({sorted(grid)}) that this synthmed no longer reads; refit the CGAN"
            )
    return grids


def _time_resolution(times: np.ndarray) -> float | None:
    """The lattice the times lie on (the smallest positive gap between distinct times, when
    every time is a whole multiple of it: whole minutes, an hourly grid), else None."""
    distinct = np.unique(times)
    if len(distinct) < 2:
        return None
    unit = float(np.diff(distinct).min())
    multiples = distinct / unit
    on_grid = np.allclose(multiples, np.round(multiples), rtol=0, atol=1e-6)
    return exact_step(unit) if on_grid else None


def _check_on_grid(cohort: Cohort, resolution: float, time_max: float) -> None:
    """Refuse a cohort with a step time (inside the window) off the grid of ``resolution``."""
    arrays = cohort.arrays
    multiples = arrays.times / resolution
    off = (
        arrays.step_mask
        & (arrays.times <= time_max)
        & (np.abs(multiples - np.rint(multiples)) > 1e-6)
    )
    if off.any():
        row, step = np.argwhere(off)[0]
        raise DataError(
            f"patient {cohort.ids[row]!r} has a step at time {arrays.times[row, step]:g}, off "
            f"the time grid of {resolution:g} (CGANConfig.time_grid); {int(off.sum())} steps "
            "are off it: resample the cohort onto the grid or set another time_grid"
        )


def _merge_equal_times(
    times: np.ndarray, values: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge consecutive steps of a patient that share a time into one step (a later step's
    value wins where both observed a variable)."""
    width = times.shape[1]
    inside = np.arange(width)[None, :] < lengths[:, None]
    repeated = np.zeros_like(inside)
    repeated[:, 1:] = (times[:, 1:] == times[:, :-1]) & inside[:, 1:]
    if not repeated.any():
        return times, values, lengths
    group = np.cumsum(~repeated, axis=1) - 1
    new_lengths = np.where(
        lengths > 0, np.take_along_axis(group, np.maximum(lengths - 1, 0)[:, None], 1)[:, 0] + 1, 0
    )
    new_width = int(new_lengths.max())
    rows = np.broadcast_to(np.arange(len(times))[:, None], group.shape)
    merged_times = np.zeros((len(times), new_width))
    merged_times[rows[inside], group[inside]] = times[inside]
    merged = np.full((len(times), new_width, values.shape[2]), np.nan)
    for j in range(values.shape[2]):
        row, step = np.nonzero(inside & ~np.isnan(values[..., j]))
        key = row * new_width + group[row, step]
        # Entries come in (row, step) order, so the last of each run of equal keys is the
        # last observation of the variable among the merged steps.
        last = np.append(key[1:] != key[:-1], True) if len(key) else np.zeros(0, dtype=bool)
        merged[row[last], group[row[last], step[last]], j] = values[row[last], step[last], j]
    return merged_times, merged, new_lengths


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator))


def _bound(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def _expand(mask: np.ndarray, heads: list[Head]) -> np.ndarray:
    return np.repeat(mask, [h.width for h in heads], axis=-1).astype(np.float32)


#: ``epochs`` when None: on a time grid's slots and without DP more epochs paid off (PhysioNet
#: 2012 hourly: discriminative score 0.40 at 120, 0.35 at 240); event by event they gained
#: little (0.47 to 0.46) and doubled a 10-minute fit (results.md, nineteenth session).
_SLOT_EPOCHS = 240
_EPOCHS = 120
#: ``epochs`` when None under DP, where more epochs mean more noise per step: on PhysioNet 2012
#: (4,000 patients, batch 64, epsilon 10) 15 epochs gave TSTR 0.727 / 0.756 (seeds 0 / 1) in
#: 55 s, 120 epochs 0.725 / 0.672 in 385 s (results.md, twenty-first session).
_PRIVATE_EPOCHS = 15
#: ``CGANConfig.max_steps`` and ``critic_hidden`` when None (see there).
_MAX_STEPS = 512
_CRITIC_HIDDEN = 256
_PRIVATE_CRITIC_HIDDEN = 64
#: Without DP, grid slots are the steps only while a window holds at most this many slots per
#: step of the longest stay (sparse stays on a fine grid stay event by event).
_SLOTS_PER_STEP = 4

#: Shares of epsilon under DP: the value histograms (``private_summary``), the static and the
#: patient moments (``_MomentTargets``), the critics, and, when the schema has a binary outcome,
#: the outcome labeller, its calibration slope and its prevalence count (see
#: ``outcome_labeller``); without one the critics get the rest.
_PRIVATE_SUMMARY_BUDGET = 0.1
_PRIVATE_STATIC_BUDGET = 0.05
_PRIVATE_PATIENT_BUDGET = 0.05
_PRIVATE_CRITIC_BUDGET = 0.4
_PRIVATE_LABELLER_BUDGET = 0.3
_PRIVATE_RECALIBRATION_BUDGET = 0.05
_PRIVATE_PREVALENCE_BUDGET = 0.05
#: Weight of the distance between generated moments and the private ones (``_MomentTargets``).
_MOMENT_WEIGHT = 10.0
#: Epochs that the generator's moving average spans without DP (decay per batch
#: 1 - 1 / (this * batches per epoch): 0.9975 on PhysioNet 2012's set A at batch 100).
_AVERAGE_EPOCHS = 10.0


@dataclasses.dataclass
class _MomentTargets:
    """Moments of the real patients released under DP, which the generators match besides the
    critics' scores (post-processing: no privacy cost). A critic trained with DP-SGD gives noisy
    scores, and a generator that follows them alone drifts: at epsilon 10 one fit put every
    patient's GCS near its maximum, another ended stays after a quarter of the real duration.

    ``static`` and ``patient``: the means of ``CGANSynthesizer._static_moments`` and
    ``_patient_moments`` (between-patient spread); ``mean_length``: steps per
    stay; ``rates``: observations per step of each variable; ``value_mean`` and
    ``value_square``: per value column, the mean over the patients observing it of their mean
    (and mean square) scaled value, where ``value_known``.
    """

    static: torch.Tensor
    patient: torch.Tensor
    mean_length: float
    rates: torch.Tensor
    value_mean: torch.Tensor
    value_square: torch.Tensor
    value_known: torch.Tensor


class CGANSynthesizer(OutcomeLabelling, Synthesizer):
    """Conditional recurrent GAN: static generator, LSTM sequence generator, WGAN-GP critics.

    Args:
        epochs: Passes of the critic over the training patients. None (default) lets ``fit``
            choose, and record in ``epochs_``: 240 when the steps are a time grid's slots
            (``CGANConfig.time_grid``), 120 otherwise, and 15 under DP. On PhysioNet 2012's
            set-a (4,000 stays, 8 variables) binned hourly, 240 epochs lowered the
            discriminative score from 0.40 to 0.35-0.36 in 10-12 minutes of one CPU core; on
            raw times 120 epochs take about 10 minutes, and 240 gained little (0.47 to 0.46) in
            19 minutes of two. Under DP the epochs set the noise: at epsilon 10, 120 epochs
            gave no better outcome utility than 15 (TSTR 0.725 / 0.672 against 0.727 / 0.756
            for two seeds) and took seven times as long (``benchmarks/results.md``).
        batch_size: Patients per step (real and generated alike).
        seed, device, verbose, epsilon, delta, max_grad_norm, rejection_sampling,
            rejection_stages: See :class:`~synthmed.models.base.Synthesizer`.
        config: Architecture and objective settings (:class:`CGANConfig`); defaults if None.

    After ``fit``, ``history_`` holds one row per epoch: ``generator_loss``, ``critic_loss``,
    ``gradient_penalty``, ``wasserstein_static`` and ``wasserstein_patient`` (the critics'
    estimates of the Wasserstein distance, which should shrink and settle) and ``seconds``.

    ``fit(cohort, checkpoint_dir=DIR)`` checkpoints the generators and their moving average,
    both critics, both optimizers, every random generator, the epoch and, under DP, the
    accountant; ``fit(..., resume=True)`` continues a killed run to the weights (and spent
    epsilon) of an uninterrupted one on CPU.

    Example:
        >>> synth = CGANSynthesizer(seed=0).fit(train)  # doctest: +SKIP
        >>> synth.sample(100, conditions={"In-hospital_death": 1})  # doctest: +SKIP
        >>> synth.history_.plot(x="epoch", y=["wasserstein_static", "wasserstein_patient"])  # doctest: +SKIP
    """

    model_type: ClassVar[str] = "cgan"
    supports_checkpoints: ClassVar[bool] = True
    epochs_from_data: ClassVar[bool] = True
    config_class: ClassVar[type] = CGANConfig
    # The gradient penalty and several critic passes per step trip DDP's hooks: average
    # gradients just before each optimizer step instead.
    distributed_strategy: ClassVar[str] = "allreduce"

    def __init__(
        self,
        *,
        epochs: int | None = None,
        batch_size: int = 100,
        seed: int | None = 0,
        device: str = "auto",
        verbose: bool = True,
        epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        rejection_sampling: float | None = None,
        rejection_stages: int = 1,
        config: CGANConfig | None = None,
    ) -> None:
        super().__init__(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
            verbose=verbose,
            epsilon=epsilon,
            delta=delta,
            max_grad_norm=max_grad_norm,
            rejection_sampling=rejection_sampling,
            rejection_stages=rejection_stages,
        )
        if config is not None and not isinstance(config, CGANConfig):
            raise ValueError(f"config must be a CGANConfig, got {type(config).__name__}")
        self.config = config if config is not None else CGANConfig()

    def _step_cap(self) -> int:
        """``config.max_steps``, or (None) 512, under DP ``PRIVATE_MAX_STEPS``."""
        private = self.epsilon is not None
        return self.config.max_steps or (PRIVATE_MAX_STEPS if private else _MAX_STEPS)

    def _max_steps(self, cohort: Cohort) -> int:
        """Steps modelled per stay: the :meth:`_step_cap`, without DP at most the longest stay
        in ``cohort``."""
        if self.epsilon is not None:
            return self._step_cap()
        return min(max(1, int(cohort.arrays.lengths.max(initial=0))), self._step_cap())

    def _critic_hidden(self) -> int:
        private = _PRIVATE_CRITIC_HIDDEN if self.epsilon is not None else _CRITIC_HIDDEN
        return self.config.critic_hidden or private

    # -- building ---------------------------------------------------------------------------------

    def _build(self, layout: _Layout) -> None:
        config = self.config
        static_heads, pairs = layout.static_heads()
        value_heads = layout.value_heads()
        width, n_columns = layout.encoder.width_, len(layout.encoder.blocks_)
        static = StaticGenerator(
            width,
            n_columns,
            static_heads,
            pairs,
            config.static_noise_dim,
            config.static_hidden,
            config.static_layers,
        )
        sequence = SequenceGenerator(
            width,
            len(layout.variables),
            value_heads,
            layout.n_steps,
            config.steps_per_cell,
            config.sequence_noise_dim,
            config.lstm_hidden,
            config.lstm_layers,
            layout.max_log_gap,
            layout.slots,
            schedules=layout.slots and self.epsilon is None,
            coupled_masks=layout.coupled_masks,
        )
        self.layout_ = layout
        self.generator_ = Generator(static, sequence).to(self.device_)
        self._column_dims = layout.column_dims().to(self.device_)
        self._missing_dims = layout.missing_dims().to(self.device_)

    def _fit_layout(self, cohort: Cohort, summary: PrivateSummary | None) -> _Layout:
        """The encoding of patients; under DP (``summary`` given) from the schema, the settings
        and the private summary alone."""
        arrays = cohort.arrays
        from_bounds = summary is not None
        encoder = StaticEncoder().fit(
            cohort.static, cohort.schema, from_bounds=from_bounds, log_skewed=True
        )
        if summary is None:
            scaler = ValueScaler().fit(arrays.values, cohort.schema)
        else:
            scaler = summary.value_scaler(cohort.schema)
        grids = self._fit_grids(cohort, learn=not from_bounds)
        n_steps, config = self._max_steps(cohort), self.config
        if from_bounds:
            # Under DP nothing is read from the data outside the private critic: the steps,
            # window and grid are the settings, gaps are in the cohort's time unit.
            time_max = self._private_window(cohort)
            resolution, gap_scale = config.time_grid, 1.0
        else:
            inside = arrays.step_mask
            if config.max_time is not None:
                inside = inside & (arrays.times <= config.max_time)
            gaps = arrays.gaps[inside]
            positive = gaps[gaps > 0]
            gap_scale = float(np.median(positive)) if len(positive) else 1.0
            last = float(arrays.times[inside].max()) if inside.any() else 0.0
            time_max = max(config.max_time or last, gap_scale)
            resolution = config.time_grid or _time_resolution(arrays.times[inside])
        slots = self._slots(cohort, time_max, resolution)
        if slots is not None:
            if config.time_grid is not None:  # a detected grid holds every time by definition
                _check_on_grid(cohort, resolution, time_max)
            # Coupled masks as observation schedules: on slots without DP (see SequenceGenerator).
            coupled = not from_bounds
            return _Layout(
                encoder, scaler, slots, resolution, time_max, resolution, grids, True, coupled
            )
        return _Layout(encoder, scaler, n_steps, gap_scale, time_max, resolution, grids)

    def _private_window(self, cohort: Cohort) -> float:
        """The observation window under DP: ``config.max_time``, else ``max_steps`` units."""
        return self.config.max_time or float(self._max_steps(cohort))

    def _slots(self, cohort: Cohort, time_max: float, resolution: float | None) -> int | None:
        """The number of grid slots in the window, when they are to be the steps (see
        ``CGANConfig.time_grid``), else None."""
        if not resolution:
            return None
        slots = int(math.floor(time_max / resolution + 1e-9)) + 1
        if slots > self._step_cap():
            return None
        if self.epsilon is None and slots > _SLOTS_PER_STEP * self._max_steps(cohort):
            return None
        return slots

    @staticmethod
    def _fit_grids(cohort: Cohort, learn: bool) -> dict[str, dict[str, Any]]:
        """:func:`_fit_grid` of every numeric column; from the data only with ``learn``."""
        arrays, grids = cohort.arrays, {}
        for name in cohort.schema.columns:
            column = cohort.schema[name]
            if column.kind != "numeric":
                continue
            observed = None
            if learn and column.is_static:
                observed = cohort.static[name].to_numpy(dtype=np.float64)
            elif learn:
                j = arrays.variables.index(name)
                observed = arrays.values[..., j][arrays.mask[..., j]].astype(np.float64)
            grids[name] = _fit_grid(observed, column)
        return grids

    # -- training ---------------------------------------------------------------------------------

    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        if not cohort.schema.temporal_columns:
            raise DataError("CGANSynthesizer needs at least one temporal variable")
        config, device = self.config, self.device_
        summary = None
        if self.epsilon is not None:
            from synthmed.models.privacy import check_public_schema

            check_public_schema(cohort)
            window = self._private_window(cohort)
            slots = self._slots(cohort, window, config.time_grid)
            if slots is None and config.max_steps is None:
                warn_unset_steps("CGANConfig.max_steps")
            arrays = cohort.arrays
            inside = arrays.step_mask & (arrays.times <= window + 1e-9)
            max_steps = slots or self._max_steps(cohort)
            inside = inside & (np.arange(inside.shape[1])[None, :] < max_steps)
            summary = release_summary(
                self,
                cohort,
                inside,
                max_steps,
                generator,
                budget_fraction=_PRIVATE_SUMMARY_BUDGET,
                charted=True,
            )
        layout = self._fit_layout(cohort, summary)
        if self.epochs is None:
            if self.epsilon is not None:
                self.epochs_ = _PRIVATE_EPOCHS
            else:
                self.epochs_ = _SLOT_EPOCHS if layout.slots else _EPOCHS
        self._build(layout)
        if summary is not None:
            self.generator_.sequence.start_at_rates(
                torch.tensor([summary.observation_rates[v] for v in layout.variables]),
                torch.tensor([summary.charted_shares[v] for v in layout.variables]),
            )
        self.labeller_ = None
        labelled = labelled_columns(cohort.schema) if self.epsilon is not None else []
        real_static = torch.as_tensor(layout.encoder.transform(cohort.static)).to(device)
        real_steps = layout.encode_steps(cohort).to(device)
        value_variable = self.generator_.sequence.value_variable
        real_summaries = summaries(real_steps, value_variable)
        targets = None
        if summary is not None:
            released = {
                "static": self._private_mean(
                    self._static_moments(real_static.cpu()),
                    self._static_bound(),
                    _PRIVATE_STATIC_BUDGET,
                    generator,
                ),
                "patient": self._private_mean(
                    self._patient_moments(
                        torch.cat([real_static, real_summaries], 1).cpu(), real_steps.cpu()
                    ),
                    self._patient_bound(),
                    _PRIVATE_PATIENT_BUDGET,
                    generator,
                ),
            }
            targets = self._moment_targets(summary, released, device)
            if not layout.slots:
                end_time, log_gap = self._released_stay(targets)
                window = end_time + math.expm1(log_gap) * layout.gap_scale / layout.time_max
                self.generator_.sequence.start_at_stay(window, log_gap)
        n_patients = real_static.shape[0]
        noise = torch.Generator(device=device).manual_seed(_draw_seed(generator))

        static_inputs = layout.encoder.width_ + len(layout.encoder.blocks_)
        critic = Critic(
            static_inputs,
            layout.encoder.width_ + real_summaries.shape[1],
            layout.n_steps,
            real_steps.shape[2],
            config.step_embedding,
            self._critic_hidden(),
            config.critic_layers,
        ).to(device)
        generator_optimizer = torch.optim.Adam(
            self.generator_.parameters(), lr=config.generator_lr, betas=config.betas, foreach=True
        )
        critic_optimizer = torch.optim.Adam(
            critic.parameters(), lr=config.critic_lr, betas=config.betas, foreach=True
        )
        # Shuffles the patients (and, under DP, draws Opacus' Poisson batches).
        order = torch.Generator().manual_seed(_draw_seed(generator))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(n_patients)),
            batch_size=min(self.batch_size, n_patients),
            shuffle=True,
            generator=order,
        )
        critics = critic  # the plain module: Opacus wraps it, its parameters stay the same
        static_critic = critic.static_critic
        # Extra static updates reuse each batch: not accounted for by DP-SGD, so off under DP.
        static_rounds = config.static_critic_steps > 0 and self.epsilon is None
        critic_budget = 1.0
        if self.epsilon is not None:
            spent_before = (
                _PRIVATE_SUMMARY_BUDGET + _PRIVATE_STATIC_BUDGET + _PRIVATE_PATIENT_BUDGET
            )
            critic_budget = _PRIVATE_CRITIC_BUDGET if labelled else 1.0 - spent_before
        critic, critic_optimizer, loader = self._make_private(
            critic,
            critic_optimizer,
            loader,
            self.epochs_,
            budget_fraction=critic_budget,
        )

        rows: list[dict[str, Any]] = []
        first_epoch = 1
        # After _make_private: restores RNGs, history and, under DP, the accountant.
        resumed = self._load_checkpoint(generator, {"noise": noise, "order": order})
        saved: dict[str, Any] = {}
        if resumed is not None:
            first_epoch, saved = resumed[0] + 1, resumed[1]
            self.generator_.load_state_dict(saved["generator"])
            critics.load_state_dict(saved["critics"])
            generator_optimizer.load_state_dict(saved["generator_optimizer"])
            critic_optimizer.load_state_dict(saved["critic_optimizer"])
            rows = self.history_.to_dict(orient="records")
        # Without DP the generator kept is a moving average of its iterates (Yazici et al.,
        # 2019), not the last of its steps against a moving critic. Under DP it would be
        # post-processing, but it left the private TSTR where it was (results.md), so it is off.
        # Made after a resumed generator is loaded, so that a checkpoint written before the
        # average was kept starts it from the generator it saved.
        averaged = (
            moving_average(self.generator_, _AVERAGE_EPOCHS, len(loader), saved.get("averaged"))
            if self.epsilon is None
            else None
        )
        bar = tqdm(
            range(first_epoch, self.epochs_ + 1),
            desc="CGAN",
            unit="epoch",
            disable=not self.verbose,
        )
        for epoch in bar:
            started = time.perf_counter()
            totals = dict.fromkeys(HISTORY_COLUMNS[1:-1], 0.0)
            n_batches = n_generator_steps = 0
            for step, (index,) in enumerate(loader):
                if len(index) == 0:  # Poisson sampling under DP can draw an empty batch
                    continue
                index = index.to(device)
                train_generator = step % config.critic_steps == 0
                with torch.set_grad_enabled(train_generator):
                    fake = self._fake(len(index), noise, train_static=not static_rounds)
                real_given = self._condition_masks(real_static[index], noise)
                real = self._critic_inputs(
                    real_static[index], real_given, real_steps[index], real_summaries[index]
                )
                losses = self._critic_step(
                    critic, critic_optimizer, real, [x.detach() for x in fake], noise
                )
                for key, value in losses.items():
                    totals[key] += value
                n_batches += 1
                if train_generator:
                    totals["generator_loss"] += self._generator_step(
                        critic, generator_optimizer, fake, targets
                    )
                    n_generator_steps += 1
                if static_rounds:
                    self._static_round(
                        static_critic,
                        critic_optimizer,
                        generator_optimizer,
                        real_static[index],
                        noise,
                    )
                if averaged is not None:
                    averaged.update_parameters(self.generator_)
            row = {
                "epoch": epoch,
                "generator_loss": totals["generator_loss"] / max(n_generator_steps, 1),
                **{k: totals[k] / max(n_batches, 1) for k in HISTORY_COLUMNS[2:-1]},
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            bar.set_postfix(
                g=f"{row['generator_loss']:.3f}",
                d=f"{row['critic_loss']:.3f}",
                w_static=f"{row['wasserstein_static']:.3f}",
                w_patient=f"{row['wasserstein_patient']:.3f}",
                gp=f"{row['gradient_penalty']:.3f}",
            )
            if self._checkpoint_due(epoch - 1):  # the base counts epochs from 0
                history = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
                # Under DP the critics' losses on real patients stay out of checkpoints too.
                self.history_ = (
                    history if self.epsilon is None else history[list(PUBLIC_HISTORY_COLUMNS)]
                )
                state = {
                    "generator": self.generator_.state_dict(),
                    "critics": critics.state_dict(),
                    "generator_optimizer": generator_optimizer.state_dict(),
                    "critic_optimizer": critic_optimizer.state_dict(),
                    "averaged": averaged.state_dict() if averaged is not None else None,
                }
                self._save_checkpoint(epoch - 1, state, generator, {"noise": noise, "order": order})
        from synthmed.models.privacy import record_spent, releasable_history

        if averaged is not None:
            self.generator_.load_state_dict(averaged.module.state_dict())
        if labelled:
            labeller = self._fit_outcome_labeller(
                cohort,
                np.arange(n_patients),
                generator,
                labeller_budget=_PRIVATE_LABELLER_BUDGET,
                recalibration_budget=_PRIVATE_RECALIBRATION_BUDGET,
                prevalence_budget=_PRIVATE_PREVALENCE_BUDGET,
            )
        record_spent(self)  # (epsilon, delta) into privacy_spent_; detaches Opacus (no-op w/o DP)
        # Under DP the critic's losses on real patients stay out of the fitted model; the
        # generator's loss (critic scores of generated patients) is post-processing.
        self.history_ = releasable_history(
            self,
            pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)),
            public=PUBLIC_HISTORY_COLUMNS,
        )
        self.generator_.eval()
        if labelled:
            self._install_outcome_labeller(labeller.state_dict(), labelled)
            self._calibrate_outcome_labeller(noise)

    def _static_moments(self, static: torch.Tensor) -> torch.Tensor:
        """Per patient: the encoded static vector and the squares of its numeric entries."""
        numeric = [b.start for b in self.layout_.encoder.blocks_ if b.kind == "numeric"]
        return torch.cat([static, static[:, numeric] ** 2], dim=1)

    def _static_bound(self) -> float:
        """A bound on a row of :meth:`_static_moments`: encoded from bounds, a number is within
        +-2 (its square within 4), a one-hot block or a missing flag has norm 1."""
        blocks = self.layout_.encoder.blocks_
        n_numeric = sum(b.kind == "numeric" for b in blocks)
        return math.sqrt(len(blocks) - n_numeric + 21 * n_numeric)

    def _patient_moments(self, patient_inputs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Per patient (critic inputs ``[static, summaries]`` and ``steps``): the mean and last
        observed scaled value of each value column (0 if never observed) clipped to +-2; the
        stay's steps, end time, mean log-gap, mean squared log-gap and largest log-gap as shares
        of their maxima; the squares of all these; and the products of every two columns' means
        over 2.

        The squared and largest gaps are there because the mean alone was matched by stays of
        four steps, one gap of 38 hours among gaps of zero (real stays: 44 steps an hour apart).
        The products tie the levels together (a sick patient's lactate, creatinine and GCS are
        all off): at epsilon 10 on PhysioNet 2012 the Spearman correlations between generated
        patients' mean levels were 0.41 off the real ones on average without them and 0.13
        with them, and TSTR rose from 0.744 to 0.764 (twenty seeds; results.md).
        """
        layout = self.layout_
        parts = self._summary_parts(patient_inputs)
        values = torch.cat([parts.mean, parts.last], dim=1).clamp(-2.0, 2.0)
        gap_share = steps[..., 0] / max(layout.max_log_gap, 1e-6)  # 0 after the stay's end
        length = steps[..., 2].sum(1).clamp_min(1.0)
        stay = torch.stack(
            [
                parts.log_length / math.log1p(layout.n_steps),
                parts.end_time,
                parts.mean_log_gap / max(layout.max_log_gap, 1e-6),
                gap_share.pow(2).sum(1) / length,
                gap_share.amax(1),
            ],
            dim=1,
        ).clamp(0.0, 1.0)
        stats = torch.cat([values, stay], dim=1)
        w = self.generator_.sequence.value_width
        first, second = torch.triu_indices(w, w, offset=1)
        products = values[:, first] * values[:, second] / 2
        return torch.cat([stats, stats**2, products], dim=1)

    def _summary_parts(self, patient_inputs: torch.Tensor) -> SummaryParts:
        """The named summary columns of critic inputs ``[static, summaries]``."""
        sequence = self.generator_.sequence
        summary = patient_inputs[:, self.layout_.encoder.width_ :]
        return summary_parts(summary, sequence.n_variables, sequence.value_width)

    def _released_stay(self, targets: _MomentTargets) -> tuple[float, float]:
        """The released mean end time (share of the horizon) and mean log-gap of a stay, read
        from ``targets.patient`` (laid out by :meth:`_patient_moments`)."""
        at = 2 * self.generator_.sequence.value_width
        end_time, gap_share = targets.patient[at + 1 : at + 3].tolist()
        return end_time, gap_share * self.layout_.max_log_gap

    def _patient_bound(self) -> float:
        """A bound on a row of :meth:`_patient_moments`: ``sqrt(2**2 + 4**2)`` per value
        statistic, ``sqrt(2)`` per stay statistic, 2 per product of two means."""
        w = self.generator_.sequence.value_width
        return math.sqrt(2 * w * 20 + 5 * 2 + 2 * w * (w - 1))

    def _private_mean(
        self, rows: torch.Tensor, bound: float, budget_fraction: float, generator: torch.Generator
    ) -> torch.Tensor:
        """The mean of per-patient ``rows`` (each of norm at most ``bound``) by one Gaussian
        mechanism (``privacy.private_sum``) on ``budget_fraction`` of the budget.

        The static moments give the marginals of the categorical columns and missing flags and
        the mean and spread of the numeric ones: a private static critic alone collapsed ICUType
        onto one category (90 % of generated patients against 37 % real).
        """
        from synthmed.models.privacy import private_sum

        sums, _ = private_sum(
            self, rows.double().numpy() / bound, generator, budget_fraction=budget_fraction
        )
        return torch.as_tensor(sums * bound / len(rows), dtype=torch.float32)

    def _moment_targets(
        self, summary: PrivateSummary, released: dict[str, torch.Tensor], device: torch.device
    ) -> _MomentTargets:
        """The private releases as :class:`_MomentTargets`; a variable's value moments come from
        its histogram (bin centres in the scaler's space), none where noise drowned it."""
        layout, sequence = self.layout_, self.generator_.sequence
        variables = layout.variables
        value_mean = torch.zeros(sequence.value_width)
        value_square = torch.zeros(sequence.value_width)
        known = torch.zeros(sequence.value_width, dtype=torch.bool)
        for column, j in enumerate(sequence.value_variable.tolist()):
            histogram = summary.histograms.get(variables[j])
            if not sequence.numeric_value[column] or histogram is None:
                continue
            edges, weights = histogram
            weights = np.clip(weights, 0.0, None)
            if weights.sum() < 1.0:
                continue
            centres = np.zeros((len(weights), len(variables)), dtype=np.float32)
            centres[:, j] = (edges[:-1] + edges[1:]) / 2
            scaled = layout.scaler.transform(centres)[:, j].astype(np.float64)
            value_mean[column] = float(np.average(scaled, weights=weights))
            value_square[column] = float(np.average(scaled**2, weights=weights))
            known[column] = True
        rates = torch.tensor([summary.observation_rates[v] for v in variables], dtype=torch.float32)
        return _MomentTargets(
            released["static"].to(device),
            released["patient"].to(device),
            summary.mean_length,
            rates.to(device),
            value_mean.to(device),
            value_square.to(device),
            known.to(device),
        )

    def _moment_distance(
        self, fake: tuple[torch.Tensor, ...], targets: _MomentTargets
    ) -> torch.Tensor:
        """Squared distance between the moments of generated patients (critic inputs ``fake``)
        and ``targets``; lengths as shares of ``n_steps``."""
        layout, sequence = self.layout_, self.generator_.sequence
        static = fake[0][:, : layout.encoder.width_]
        distance = (self._static_moments(static).mean(0) - targets.static).pow(2).sum()
        patient = self._patient_moments(fake[1], fake[2]).mean(0)
        distance = distance + (patient - targets.patient).pow(2).sum()
        steps, v = fake[2], sequence.n_variables
        length = steps[..., 2].sum(1)
        mask = steps[..., STEP_PREFIX : STEP_PREFIX + v]
        rates = (mask.sum(1) / length.clamp_min(1.0)[:, None]).mean(0)
        distance = distance + ((length.mean() - targets.mean_length) / layout.n_steps) ** 2
        distance = distance + (rates - targets.rates).pow(2).sum()
        column_mask = mask[..., sequence.value_variable]
        values = steps[..., STEP_PREFIX + v :]
        count = column_mask.sum(1)
        seen = (count > 0.5).to(values.dtype)
        n_seen = seen.sum(0).clamp_min(1.0)
        mean = (seen * (column_mask * values).sum(1) / count.clamp_min(1.0)).sum(0) / n_seen
        square = (seen * (column_mask * values**2).sum(1) / count.clamp_min(1.0)).sum(0) / n_seen
        known = targets.value_known
        distance = distance + (mean - targets.value_mean)[known].pow(2).sum()
        return distance + (square - targets.value_square)[known].pow(2).sum()

    @staticmethod
    def _critic_inputs(
        static: torch.Tensor, given: torch.Tensor, steps: torch.Tensor, summary: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(static critic input, patient critic input, steps)``: the critics' feature space."""
        return torch.cat([static, given], 1), torch.cat([static, summary], 1), steps

    def _fake_static(self, n: int, noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` generated static vectors and their given-column masks.

        A share of rows is conditioned on a random subset of the columns of the generator's own
        first draw; the critic sees which columns were given.
        """
        layout, temperature = self.layout_, self.config.temperature
        static_generator = self.generator_.static
        width, n_columns = layout.encoder.width_, len(layout.encoder.blocks_)
        nothing = torch.zeros(n, width, device=self.device_)
        with torch.no_grad():
            first = static_generator(nothing, nothing, nothing[:, :n_columns], noise, temperature)
        given = self._condition_masks(first, noise)
        given_dims = (given @ self._column_dims).clamp_max(1.0)
        return static_generator(first, given_dims, given, noise, temperature), given

    def _fake(
        self, n: int, noise: torch.Generator, train_static: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Critic inputs of ``n`` generated patients; gradients reach the static generator only
        with ``train_static`` (when it has no updates of its own)."""
        layout, sequence = self.layout_, self.generator_.sequence
        static, given = self._fake_static(n, noise)
        # The static generator learns from the static critic alone: the patient critic, slower
        # to settle, would otherwise pull it around. Sequences learn to fit the static vector.
        fixed = static.detach()
        if not train_static:
            static = fixed
        steps = sequence(fixed, layout.gap_scale / layout.time_max, noise, self.config.temperature)
        summary = summaries(steps, sequence.value_variable)
        return torch.cat([static, given], 1), torch.cat([fixed, summary], 1), steps

    def _condition_masks(self, static: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        """Random given-column masks ``[n, n_columns]``: none for a share of rows, else a random
        subset; missing cells are never given (a condition cannot ask for a missing value)."""
        n, n_columns = static.shape[0], self._column_dims.shape[0]
        device = static.device
        conditioned = torch.rand(n, 1, generator=noise, device=device) < self.config.condition_rate
        share = torch.rand(n, 1, generator=noise, device=device)
        given = (torch.rand(n, n_columns, generator=noise, device=device) < share) & conditioned
        missing = (static @ self._missing_dims.T) > 0.5
        return (given & ~missing).float()

    def _critic_step(
        self,
        critic: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        real: tuple[torch.Tensor, ...],
        fake: list[torch.Tensor],
        noise: torch.Generator,
    ) -> dict[str, float]:
        config = self.config
        optimizer.zero_grad(set_to_none=True)
        real_s, real_p = critic(*real)
        fake_s, fake_p = critic(*fake)
        w_static = real_s.mean() - fake_s.mean()
        w_patient = real_p.mean() - fake_p.mean()
        drift = (config.static_weight * real_s**2 + real_p**2).mean()
        loss = -(config.static_weight * w_static + w_patient) + config.drift_penalty * drift
        if self.epsilon is None:
            penalty = self._gradient_penalty(critic, real, fake, noise)
            loss = loss + config.gradient_penalty * penalty
            loss.backward()
            optimizer.step()
        else:
            penalty = self._private_step(critic, optimizer, loss, fake, noise)
            loss = loss + config.gradient_penalty * penalty
        return {
            "critic_loss": float(loss.detach()),
            "gradient_penalty": float(penalty.detach()),
            "wasserstein_static": float(w_static.detach()),
            "wasserstein_patient": float(w_patient.detach()),
        }

    def _private_step(
        self,
        critic: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: torch.Tensor,
        fake: list[torch.Tensor],
        noise: torch.Generator,
    ) -> torch.Tensor:
        """One DP-SGD critic step; returns the gradient penalty.

        Opacus clips and noises the per-patient gradient of the real-data terms (``loss``).
        The gradient penalty is taken between pairs of generated patients only, with Opacus'
        hooks off (they do not support its double backward); it involves no real data, so
        its gradient is added after the clipping and noise at no privacy cost.
        """
        loss.backward()
        critic.disable_hooks()
        try:
            pairs = [x.roll(1, dims=0) for x in fake]
            penalty = self._gradient_penalty(critic, fake, pairs, noise)
            parameters = [p for p in critic.parameters() if p.requires_grad]
            grads = torch.autograd.grad(
                self.config.gradient_penalty * penalty, parameters, allow_unused=True
            )
        finally:
            critic.enable_hooks()
        if optimizer.pre_step():  # clip, noise, account
            for parameter, grad in zip(parameters, grads, strict=True):
                if grad is not None:
                    parameter.grad.add_(grad)
            optimizer.original_optimizer.step()
        return penalty

    def _gradient_penalty(
        self,
        critic: torch.nn.Module,
        real: tuple[torch.Tensor, ...],
        fake: list[torch.Tensor],
        noise: torch.Generator,
    ) -> torch.Tensor:
        """WGAN-GP: ``(|grad critic(x)| - 1)^2`` at random points between real and generated
        patients in the critics' input space, for each critic over its own inputs."""
        n = real[0].shape[0]
        weight = torch.rand(n, 1, generator=noise, device=real[0].device)
        static, patient, steps = (
            torch.lerp(f, r, weight.view(n, *[1] * (r.dim() - 1))).requires_grad_(True)
            for r, f in zip(real, fake, strict=True)
        )
        score_s, score_p = critic(static, patient, steps)
        (grad_s,) = torch.autograd.grad(score_s.sum(), [static], create_graph=True)
        grads_p = torch.autograd.grad(score_p.sum(), [patient, steps], create_graph=True)
        norm_s = grad_s.norm(dim=1)
        norm_p = torch.cat([g.flatten(1) for g in grads_p], 1).norm(dim=1)
        return (self.config.static_weight * (norm_s - 1) ** 2 + (norm_p - 1) ** 2).mean()

    def _static_round(
        self,
        static_critic: torch.nn.Module,
        critic_optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer,
        real_static: torch.Tensor,
        noise: torch.Generator,
    ) -> None:
        """Extra updates of the static part alone: ``static_critic_steps`` critic updates, then
        one generator update. Cheap (MLPs), and the static GAN settles only with several critic
        updates per generator update, more than the sequences can afford."""
        config, n = self.config, real_static.shape[0]
        for _ in range(config.static_critic_steps):
            with torch.no_grad():
                fake, fake_given = self._fake_static(n, noise)
            fake = torch.cat([fake, fake_given], 1)
            real = torch.cat([real_static, self._condition_masks(real_static, noise)], 1)
            critic_optimizer.zero_grad(set_to_none=True)
            real_score = static_critic(real)
            weight = torch.rand(n, 1, generator=noise, device=real.device)
            between = torch.lerp(fake, real, weight).requires_grad_(True)
            (grad,) = torch.autograd.grad(
                static_critic(between).sum(), [between], create_graph=True
            )
            loss = (
                static_critic(fake).mean()
                - real_score.mean()
                + config.gradient_penalty * ((grad.norm(dim=1) - 1) ** 2).mean()
                + config.drift_penalty * (real_score**2).mean()
            )
            loss.backward()
            critic_optimizer.step()
        for parameter in static_critic.parameters():
            parameter.requires_grad_(False)
        generator_optimizer.zero_grad(set_to_none=True)
        fake, fake_given = self._fake_static(n, noise)
        (-static_critic(torch.cat([fake, fake_given], 1)).mean()).backward()
        generator_optimizer.step()
        for parameter in static_critic.parameters():
            parameter.requires_grad_(True)

    def _generator_step(
        self,
        critic: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        fake: tuple[torch.Tensor, ...],
        targets: _MomentTargets | None,
    ) -> float:
        """One generator update; under DP the generated moments are also pulled towards the
        private ones (``targets``)."""
        for parameter in critic.parameters():
            parameter.requires_grad_(False)
        private = self.epsilon is not None
        if private:  # the critic's per-patient hooks are for real data only
            critic.disable_hooks()
        optimizer.zero_grad(set_to_none=True)
        score_s, score_p = critic(*fake)
        loss = -(self.config.static_weight * score_s.mean() + score_p.mean())
        if targets is not None:
            loss = loss + _MOMENT_WEIGHT * self._moment_distance(fake, targets)
        loss.backward()
        optimizer.step()
        if private:
            critic.enable_hooks()
        for parameter in critic.parameters():
            parameter.requires_grad_(True)
        return float(loss.detach())

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        batch = self._generate_patients(conditions, generator)
        if self.labeller_ is None:
            return batch
        return self._label_outcomes(batch, conditions, generator)

    def _labeller_horizon(self) -> tuple[int, float]:
        return self.layout_.n_steps, float(self.layout_.time_max)

    def _redraw_static(
        self, static: pd.DataFrame, columns: list[str], generator: torch.Generator
    ) -> pd.DataFrame:
        drawn, _ = self._draw(static, generator, with_sequences=False)
        return drawn[columns]

    def _generate_patients(
        self, conditions: pd.DataFrame, generator: torch.Generator
    ) -> GeneratedBatch:
        static, sequences = self._draw(conditions, generator, with_sequences=True)
        layout, schema = self.layout_, self.layout_.schema
        width = max(times.shape[1] for times, _, _ in sequences)
        times = np.concatenate([pad_steps(t, width, 0.0) for t, _, _ in sequences])
        values = np.concatenate([pad_steps(v, width, np.nan) for _, v, _ in sequences])
        lengths = np.concatenate([n for _, _, n in sequences])
        for j, name in enumerate(layout.variables):
            if schema[name].kind == "numeric":
                values[..., j] = layout.to_grid(name, values[..., j], generator)
        return GeneratedBatch(static, times, values, lengths)

    def _draw(
        self, conditions: pd.DataFrame, generator: torch.Generator, with_sequences: bool
    ) -> tuple[pd.DataFrame, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Static rows for ``conditions`` (given cells kept) and, if asked, their sequences."""
        layout, config, device = self.layout_, self.config, self.device_
        schema = layout.schema
        names = [block.name for block in layout.encoder.blocks_]
        given_columns = conditions[names].notna().to_numpy()
        encoded = layout.encoder.transform(conditions[names])
        statics, sequences = [], []
        self.generator_.eval()
        for start in range(0, len(conditions), config.sample_batch_size):
            rows = slice(start, start + config.sample_batch_size)
            given = torch.as_tensor(given_columns[rows], dtype=torch.float32, device=device)
            condition = torch.as_tensor(encoded[rows], device=device)
            given_dims = (given @ self._column_dims).clamp_max(1.0)
            static = self.generator_.static(
                condition, given_dims, given, generator, config.temperature
            )
            statics.append(static.cpu().numpy())
            if with_sequences:
                sequences.append(layout.decode_steps(self._sample_steps(static, generator)))
        static = layout.encoder.inverse(np.concatenate(statics))
        for name in names:
            if schema[name].kind == "numeric":
                drawn = static[name].to_numpy(dtype=np.float64)
                static[name] = layout.to_grid(name, drawn, generator)
        for name in names:
            given = conditions[name].notna().to_numpy()
            if given.any():
                static[name] = _with_given(static[name], conditions[name], given, schema[name])
        return static, sequences

    def _sample_steps(self, static: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Steps for a batch, state carried forward, stopping once every sequence has ended."""
        layout, sequence = self.layout_, self.generator_.sequence
        patient_noise, carry = sequence.start(static, generator, self.config.temperature)
        chunks, cells_per_chunk = [], max(1, 40 // sequence.steps_per_cell)
        for first in range(0, sequence.n_cells, cells_per_chunk):
            steps, carry = sequence.cells(
                static,
                patient_noise,
                carry,
                first,
                min(cells_per_chunk, sequence.n_cells - first),
                layout.gap_scale / layout.time_max,
                generator,
                self.config.temperature,
            )
            chunks.append(steps)
            if not sequence.slots and not bool(carry.alive.any()):
                break
        return torch.cat(chunks, dim=1)[:, : layout.n_steps]

    # -- persistence ------------------------------------------------------------------------------

    def _get_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"generator.{k}": v.cpu() for k, v in self.generator_.state_dict().items()}
        state = {"layout": self.layout_.to_dict()}
        self._save_outcome_labeller(state, tensors)
        return state, tensors

    def _set_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self._build(_Layout.from_dict(config["layout"], self.schema_))
        tensors = self._load_outcome_labeller(config, tensors)
        prefix = "generator."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.generator_.load_state_dict(state, strict=True)
        self.generator_.eval()


def _with_given(produced: pd.Series, given: pd.Series, rows: np.ndarray, column: Any) -> pd.Series:
    """``produced`` with the given cells replaced exactly (categories in their schema form)."""
    if column.kind == "numeric":
        out = produced.to_numpy(dtype=np.float64).copy()
        out[rows] = given.to_numpy(dtype=np.float64)[rows]
        return pd.Series(out, index=produced.index)
    out = produced.to_numpy(dtype=object).copy()
    codes = category_codes(given[rows].reset_index(drop=True), column.categories)
    out[rows] = decode_codes(codes, column.categories)
    return pd.Series(out, index=produced.index)
