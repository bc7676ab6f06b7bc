"""A private outcome model: binary outcomes drawn given the whole generated patient.

Under DP-SGD the LSTM's sequences carry next to no dependence on the outcome it is conditioned
on: an outcome's effect on a stay is a small share of each clipped per-patient gradient of a
network of ~10^5 parameters, and the noise drowns it (PhysioNet 2012 at epsilon 10: GCS at the
last hour, died minus survived, +0.03 standard deviations against -0.99 in the data; TSTR AUROC
0.39-0.64). A logistic model of the outcome given a fixed summary of the stay has a few hundred
parameters and learns the same dependence at a fraction of the budget (AUROC 0.80 on set B at
epsilon 2). So, under DP, each binary outcome column is drawn from such a model given the
generated patient: ``p(static, sequence) p(outcome | static, sequence)`` by the chain rule, with
the sequence model still conditioned on the static draw.

Every feature is scaled by the schema's declared bounds, never by a statistic of the data, so
nothing but the model's private training touches real values. Per-patient clipping biases the
intercept (positive patients have the larger gradients), so the model also keeps a private
estimate of each outcome's prevalence (a Gaussian-mechanism count from the same budget) and,
after training, shifts its intercepts so that the generated cohort has that prevalence. DP noise
spreads the logit wider than the data warrant; a private logistic recalibration on the real
patients (:func:`recalibrate_privately`) scales it back, so that the drawn outcomes depend on a
synthetic patient's features as strongly as real outcomes do on a real patient's, and odds
ratios estimated from the synthetic cohort are not inflated.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from synthmed.encoding import category_codes, decode_codes
from synthmed.errors import DataError
from synthmed.models.base import GeneratedBatch, pad_steps
from synthmed.models.static_model import MakePrivate
from synthmed.schema import Schema

if TYPE_CHECKING:
    from synthmed.cohort import Cohort

#: Numeric summaries of each temporal variable, scaled to [0, 1] by the variable's bounds.
_LEVEL_STATS = ("mean", "min", "max", "first", "last")


def labelled_columns(schema: Schema) -> list[str]:
    """The binary outcome columns of ``schema``: the ones an outcome labeller draws."""
    return [c for c in schema.outcome_columns if schema[c].kind == "binary"]


class OutcomeFeatures:
    """A fixed per-patient summary of a stay, scaled by the schema's declared bounds.

    For each numeric temporal variable: mean, min, max, first and last value (as a fraction of
    the declared range), standard deviation (same scale), observations per step slot
    (count / ``max_length``) and whether it was never observed; for each categorical temporal
    variable its observations per step slot; the number of steps (/ ``max_length``) and the time of
    the last step (/ ``max_time``); the non-outcome static columns, numeric ones scaled by their
    bounds with a missing flag, categorical ones one-hot. Unobserved summaries are 0.

    With ``curved`` (the default), every one of those that is not a 0/1 flag also enters twice
    more, after the linear block: log-scaled, ``log(1 + 20 x) / log(21)``, and squared. A logistic
    model on straight fractions of a declared range can neither see a lab whose values crowd the
    bottom of its range (lactate: 0-40 mmol/L, 3 % of it on average) nor risk that rises at
    both ends of a range (blood pressure); a fixed basis lets it bend without reading the data.
    On PhysioNet 2012 (results.md, twenty-first session) a non-private logistic model's AUROC on
    set B rose from 0.837 to 0.848; the private labeller's (epsilon 10, averaged and
    recalibrated) from 0.820-0.826 to about 0.835.
    """

    #: Scale of the log-scaled copies: ``log(1 + 20 x)`` spreads the bottom twentieth of a range.
    LOG_SCALE = 20.0

    def __init__(
        self, schema: Schema, max_length: int, max_time: float, *, curved: bool = True
    ) -> None:
        self.schema = schema
        self.max_length = int(max_length)
        self.max_time = float(max_time)
        self.curved = bool(curved)
        self.variables = list(schema.temporal_columns)
        self.static_columns = [c for c in schema.static_columns if schema[c].role != "outcome"]

    def _range(self, name: str) -> tuple[float, float]:
        column = self.schema[name]
        lower = 0.0 if column.lower is None else float(column.lower)
        upper = lower + 1.0 if column.upper is None else float(column.upper)
        return lower, max(upper - lower, 1e-12)

    @property
    def size(self) -> int:
        numeric = sum(self.schema[v].kind == "numeric" for v in self.variables)
        static_numeric = sum(self.schema[c].kind == "numeric" for c in self.static_columns)
        categories = sum(
            len(self.schema[c].categories)
            for c in self.static_columns
            if self.schema[c].kind != "numeric"
        )
        flags = numeric + static_numeric + categories
        continuous = 2 + len(self.variables) + 6 * numeric + static_numeric
        return flags + continuous * (3 if self.curved else 1)

    def transform(
        self, static: pd.DataFrame, values: np.ndarray, times: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """``[N, size]`` float32 features.

        Args:
            static: One row per patient with (at least) the non-outcome static columns.
            values: ``[N, T, V]`` in ``schema.temporal_columns`` order, NaN where unobserved.
            times: ``[N, T]`` step times.
            lengths: ``[N]`` number of steps of each patient.
        """
        n = len(lengths)
        if values.shape[1] == 0:  # every stay empty: one masked-out step keeps shapes simple
            values = np.full((n, 1, values.shape[2]), np.nan)
            times = np.zeros((n, 1))
        steps = values.shape[1]
        inside = np.arange(steps)[None, :] < lengths[:, None]
        values = np.where(inside[..., None], values, np.nan)
        columns = [
            np.minimum(lengths / self.max_length, 1.0),
            np.where(lengths > 0, times[np.arange(n), np.maximum(lengths - 1, 0)], 0.0)
            / self.max_time,
        ]
        flags: set[int] = set()  # the positions of 0/1 columns, which the curves leave out
        for j, name in enumerate(self.variables):
            column = values[:, :, j]
            observed = ~np.isnan(column)
            counts = observed.sum(axis=1)
            columns.append(counts / self.max_length)
            if self.schema[name].kind != "numeric":
                continue
            lower, width = self._range(name)
            scaled = (column - lower) / width
            seen = counts > 0
            safe = np.where(observed, scaled, 0.0)
            mean = safe.sum(axis=1) / np.maximum(counts, 1)
            deviation = np.where(observed, scaled - mean[:, None], 0.0)
            spread = np.sqrt((deviation**2).sum(axis=1) / np.maximum(counts, 1))
            first_index = np.argmax(observed, axis=1)
            last_index = steps - 1 - np.argmax(observed[:, ::-1], axis=1)
            rows = np.arange(n)
            summaries = {
                "mean": mean,
                "min": np.where(observed, scaled, np.inf).min(axis=1, initial=np.inf),
                "max": np.where(observed, scaled, -np.inf).max(axis=1, initial=-np.inf),
                "first": safe[rows, first_index],
                "last": safe[rows, last_index],
            }
            for stat in _LEVEL_STATS:
                columns.append(np.where(seen, summaries[stat], 0.0))
            columns.append(np.where(seen, spread, 0.0))
            flags.add(len(columns))
            columns.append((~seen).astype(np.float64))
        for name in self.static_columns:
            column = self.schema[name]
            if column.kind == "numeric":
                lower, width = self._range(name)
                raw = static[name].to_numpy(dtype=np.float64)
                missing = np.isnan(raw)
                columns.append(np.where(missing, 0.0, (raw - lower) / width))
                flags.add(len(columns))
                columns.append(missing.astype(np.float64))
            else:
                codes = category_codes(static[name], column.categories)
                for k in range(len(column.categories)):
                    flags.add(len(columns))
                    columns.append((codes == k).astype(np.float64))
        features = np.clip(np.stack(columns, axis=1), -1.0, 2.0)
        if self.curved:
            continuous = features[:, [k for k in range(len(columns)) if k not in flags]]
            logged = np.log1p(self.LOG_SCALE * np.maximum(continuous, 0.0))
            features = np.concatenate(
                [features, logged / math.log1p(self.LOG_SCALE), continuous**2], axis=1
            )
        return features.astype(np.float32)


class OutcomeLabeller(nn.Module):
    """One logistic regression per labelled outcome column, plus a calibration shift."""

    def __init__(self, n_features: int, n_outcomes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_outcomes)
        self.register_buffer("shift", torch.zeros(n_outcomes))
        self.register_buffer("prevalence", torch.full((n_outcomes,), math.nan))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, n_outcomes]`` (without the calibration shift)."""
        return self.linear(features)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities of the positive class, ``[N, n_outcomes]``."""
        return torch.sigmoid(self.linear(features) + self.shift)

    def calibrate(self, features: torch.Tensor) -> None:
        """Set ``shift`` so the mean probability over ``features`` (generated patients) is the
        stored prevalence, by bisection on each outcome's intercept shift."""
        with torch.no_grad():
            logits = self.linear(features).double()
            for k in range(logits.shape[1]):
                target = float(self.prevalence[k])
                if not 0 < target < 1:
                    self.shift[k] = -math.inf if target <= 0 else math.inf
                    continue
                low, high = -30.0, 30.0
                for _ in range(60):
                    middle = (low + high) / 2
                    if torch.sigmoid(logits[:, k] + middle).mean() < target:
                        low = middle
                    else:
                        high = middle
                self.shift[k] = (low + high) / 2


def fit_labeller_privately(
    labeller: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    make_private: MakePrivate,
    *,
    steps: int = 300,
    batches_per_epoch: int = 4,
    learning_rate: float = 0.05,
) -> None:
    """Train ``labeller`` by DP-SGD (Poisson batches of a quarter of the patients, Adam) on the
    real patients' ``features`` and ``labels`` (``[N, n_outcomes]``, NaN where unknown).

    Large batches and few steps: with a few hundred parameters and bounded features the signal
    of one step is strong, and fewer steps need less noise each. The weights kept are the average
    of the iterates over the second half of the steps (post-processing): under Adam the noise
    moves every weight the data say little about, and the last iterate's logit spread more than
    the data's (calibration slope 0.74 on real patients, against 0.86 averaged).
    """
    device = features.device
    known = ~torch.isnan(labels)
    targets = torch.nan_to_num(labels, nan=0.0)
    optimizer = torch.optim.Adam(labeller.parameters(), lr=learning_rate)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(len(features))),
        batch_size=max(1, len(features) // batches_per_epoch),
        shuffle=True,
        generator=generator if device.type == "cpu" else None,
    )
    epochs = max(1, steps // len(loader))
    module, optimizer, loader = make_private(labeller, optimizer, loader, epochs)
    module.train()
    loss_function = nn.BCEWithLogitsLoss(reduction="none")
    parameters = list(labeller.parameters())
    totals = [torch.zeros_like(p) for p in parameters]
    step, averaged, start = 0, 0, epochs * len(loader) // 2
    for _ in range(epochs):
        for (rows,) in loader:
            if len(rows) == 0:
                continue
            rows = rows.to(device)
            logits = module(features[rows])
            loss = (loss_function(logits, targets[rows]) * known[rows]).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step > start:
                for total, parameter in zip(totals, parameters, strict=True):
                    total += parameter.detach()
                averaged += 1
    if averaged:
        with torch.no_grad():
            for total, parameter in zip(totals, parameters, strict=True):
                parameter.copy_(total / averaged)


class _Recalibration(nn.Module):
    """Per outcome, a slope and an intercept on the labeller's logit (divided by ``scale``)."""

    def __init__(self, n_outcomes: int, scale: float) -> None:
        super().__init__()
        self.slopes = nn.ModuleList(nn.Linear(1, 1) for _ in range(n_outcomes))
        with torch.no_grad():
            for layer in self.slopes:  # start calibrated: slope 1
                layer.weight.fill_(scale)
                layer.bias.zero_()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(logits[:, [k]]) for k, layer in enumerate(self.slopes)], dim=1)


#: The labeller's logits are divided by this before the recalibration sees them, so that one
#: patient's gradient rarely exceeds the clipping bound (logits reach about +-8) and clipping
#: does not bias the slope.
RECALIBRATION_SCALE = 8.0


def recalibrate_privately(
    labeller: OutcomeLabeller,
    features: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    make_private: MakePrivate,
) -> torch.Tensor:
    """Scale each outcome's logit by its calibration slope on the real patients, estimated by a
    private logistic regression of the outcome on the logit (logistic recalibration, Cox 1958).

    DP noise in a few hundred weights spreads the labeller's logit wider than the data do: the
    outcomes it draws would then follow a synthetic patient's features more closely than a real
    patient's outcome does, and every odds ratio estimated from the synthetic cohort would be
    inflated (PhysioNet 2012, epsilon 10: slope on set B 0.86 without it; 0.96-1.02 with it, over
    ten private models). Returns the slopes.
    """
    with torch.no_grad():
        logits = labeller(features)
    recalibration = _Recalibration(logits.shape[1], RECALIBRATION_SCALE).to(features.device)
    fit_labeller_privately(
        recalibration, logits / RECALIBRATION_SCALE, labels, generator, make_private
    )
    with torch.no_grad():
        slopes = torch.cat([layer.weight[0] for layer in recalibration.slopes])
        slopes = (slopes / RECALIBRATION_SCALE).clamp(min=0.0)
        labeller.linear.weight.mul_(slopes[:, None])
        labeller.linear.bias.mul_(slopes)
    return slopes


#: Generated patients the labeller's intercepts are calibrated on after a private fit.
CALIBRATION_PATIENTS = 2000
#: Rounds of redrawing patients whose drawn outcome misses its condition before giving up.
MAX_LABEL_ROUNDS = 200
#: Prefix of the labeller's tensors in a saved model.
TENSOR_PREFIX = "labeller."


class OutcomeLabelling:
    """Mixin for a :class:`~synthmed.models.base.Synthesizer` whose private fit draws binary
    outcomes with an :class:`OutcomeLabeller`.

    The model implements ``_generate_patients(conditions, generator)`` (a ``GeneratedBatch``
    without labelling), ``_redraw_static(static, columns, generator)`` (``columns`` drawn anew
    given every other cell of ``static``, whose NaN cells are free) and ``_labeller_horizon()``
    (``(max_length, max_time)`` of its sequences); it sets ``labeller_ = None`` at the start of
    ``_fit`` and calls, under DP, :meth:`_fit_outcome_labeller` (before ``record_spent``), then
    :meth:`_install_outcome_labeller` and :meth:`_calibrate_outcome_labeller` once it can
    sample, and :meth:`_label_outcomes` in ``_generate``.
    """

    labeller_: OutcomeLabeller | None = None
    labelled_columns_: list[str]
    #: Whether the labeller reads the curved features (False for files saved before they were).
    labeller_curved_: bool = True

    def _outcome_features(self) -> OutcomeFeatures:
        max_length, max_time = self._labeller_horizon()
        return OutcomeFeatures(self.schema_, max_length, max_time, curved=self.labeller_curved_)

    def _fit_outcome_labeller(
        self,
        cohort: Cohort,
        rows: np.ndarray,
        generator: torch.Generator,
        *,
        labeller_budget: float,
        recalibration_budget: float,
        prevalence_budget: float,
    ) -> OutcomeLabeller:
        """Train the labeller on the patients ``rows`` of ``cohort``, recalibrate its slopes and
        count each outcome's prevalence, all privately on their shares of the budget (not
        installed yet)."""
        from synthmed.models.privacy import private_sum

        self.labeller_curved_ = True
        columns = labelled_columns(cohort.schema)
        features = self._outcome_features()
        arrays = cohort.arrays
        steps = min(arrays.max_length, features.max_length)
        x = features.transform(
            cohort.static.iloc[rows],
            np.where(arrays.mask, arrays.values, np.nan)[rows, :steps],
            arrays.times[rows, :steps],
            np.minimum(arrays.lengths[rows], steps),
        )
        codes = np.stack(
            [
                category_codes(cohort.static[c].iloc[rows], cohort.schema[c].categories)
                for c in columns
            ],
            axis=1,
        )
        labels = np.where(codes < 0, np.nan, (codes == 1).astype(np.float64))
        labeller = OutcomeLabeller(features.size, len(columns))
        x, y = torch.as_tensor(x), torch.as_tensor(labels, dtype=torch.float32)
        fit_labeller_privately(
            labeller,
            x,
            y,
            generator,
            functools.partial(self._make_private, budget_fraction=labeller_budget),
        )
        recalibrate_privately(
            labeller,
            x,
            y,
            generator,
            functools.partial(self._make_private, budget_fraction=recalibration_budget),
        )
        # Positives and known labels of each outcome: one patient moves each sum by at most 1.
        counts = np.concatenate([np.nan_to_num(labels), ~np.isnan(labels)], axis=1)
        scale = math.sqrt(counts.shape[1])
        sums, _ = private_sum(self, counts / scale, generator, budget_fraction=prevalence_budget)
        positives, known = sums[: len(columns)] * scale, sums[len(columns) :] * scale
        prevalence = np.clip(positives / np.maximum(known, 1.0), 1e-4, 1 - 1e-4)
        labeller.prevalence.copy_(torch.as_tensor(prevalence, dtype=torch.float32))
        return labeller

    def _install_outcome_labeller(self, state: dict[str, torch.Tensor], columns: list[str]) -> None:
        features = self._outcome_features()
        labeller = OutcomeLabeller(features.size, len(columns))
        labeller.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
        self.labeller_ = labeller.to(self.device_).eval()
        self.labelled_columns_ = list(columns)

    def _calibrate_outcome_labeller(self, generator: torch.Generator) -> None:
        """Shift the intercepts so the model's own patients have the private prevalence
        (post-processing: no real patient is looked at)."""
        with torch.no_grad():
            free = self._conditions_frame(CALIBRATION_PATIENTS, None)
            batch = self._generate_patients(free, generator)
            self.labeller_.calibrate(self._labeller_features(batch))

    def _labeller_features(self, batch: GeneratedBatch) -> torch.Tensor:
        features = self._outcome_features().transform(
            batch.static, batch.values, batch.times, batch.lengths
        )
        return torch.as_tensor(features, device=self.device_)

    def _draw_outcome_codes(self, batch: GeneratedBatch, generator: torch.Generator) -> np.ndarray:
        """``[N, k]`` codes (1: the positive category) drawn by the labeller."""
        probabilities = self.labeller_.probabilities(self._labeller_features(batch))
        draws = torch.rand(probabilities.shape, generator=generator, device=self.device_)
        return (draws < probabilities).cpu().numpy().astype(np.int64)

    def _label_outcomes(
        self, batch: GeneratedBatch, conditions: pd.DataFrame, generator: torch.Generator
    ) -> GeneratedBatch:
        """Draw the binary outcomes of each generated patient from the labeller.

        A patient whose drawn outcome misses its condition is generated again (its conditions
        still given to the model) until it matches, so conditioned patients follow the model's
        ``p(patient | outcome)``. The other outcome columns are then redrawn given the patient's
        other attributes and its drawn outcomes.
        """
        schema, columns = self.schema_, self.labelled_columns_
        wanted = np.stack(
            [category_codes(conditions[c], schema[c].categories) for c in columns], axis=1
        )
        codes = self._draw_outcome_codes(batch, generator)
        static, times, values, lengths = batch.static, batch.times, batch.values, batch.lengths
        missing = ((wanted >= 0) & (codes != wanted)).any(axis=1)
        for _ in range(MAX_LABEL_ROUNDS):
            if not missing.any():
                break
            rows = np.flatnonzero(missing)
            redo = self._generate_patients(conditions.iloc[rows].reset_index(drop=True), generator)
            redo_codes = self._draw_outcome_codes(redo, generator)
            hits = ~((wanted[rows] >= 0) & (redo_codes != wanted[rows])).any(axis=1)
            take = rows[hits]
            steps = max(times.shape[1], redo.times.shape[1])
            times, values = pad_steps(times, steps, 0.0), pad_steps(values, steps, np.nan)
            redo_times = pad_steps(redo.times, steps, 0.0)
            redo_values = pad_steps(redo.values, steps, np.nan)
            times[take], values[take] = redo_times[hits], redo_values[hits]
            lengths[take] = redo.lengths[hits]
            replacement = redo.static.iloc[np.flatnonzero(hits)].set_axis(static.index[take])
            kept = static.drop(index=static.index[take])
            static = pd.concat([kept, replacement]).loc[static.index]
            codes[take] = redo_codes[hits]
            missing[take] = False
        if missing.any():
            raise DataError(
                f"{int(missing.sum())} patients still drew outcomes other than their conditions "
                f"on {columns} after {MAX_LABEL_ROUNDS} rounds: the outcome model gives those "
                "conditions too small a probability for these patients"
            )
        static = static.copy()
        for k, name in enumerate(columns):
            static[name] = decode_codes(codes[:, k], schema[name].categories)
        others = [c for c in schema.outcome_columns if c not in columns]
        if others:
            given = static.copy()
            given[others] = conditions[others].to_numpy()
            static[others] = self._redraw_static(given, others, generator).to_numpy()
        return GeneratedBatch(static=static, times=times, values=values, lengths=lengths)

    def _save_outcome_labeller(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Add the labeller (if any) to a model's saved state and tensors."""
        if self.labeller_ is None:
            return
        state["labelled_columns"] = self.labelled_columns_
        state["labeller_curved"] = self.labeller_curved_
        for name, tensor in self.labeller_.state_dict().items():
            tensors[f"{TENSOR_PREFIX}{name}"] = tensor.detach().cpu()

    def _load_outcome_labeller(
        self, state: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Install the saved labeller (if any); returns the model's other tensors. Call once
        ``_labeller_horizon`` can be answered."""
        self.labeller_ = None
        if state.get("labelled_columns"):
            self.labeller_curved_ = bool(state.get("labeller_curved", False))
            own = {
                k.removeprefix(TENSOR_PREFIX): v
                for k, v in tensors.items()
                if k.startswith(TENSOR_PREFIX)
            }
            self._install_outcome_labeller(own, list(state["labelled_columns"]))
        return {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
