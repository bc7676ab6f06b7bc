"""``LSTMSynthesizer``: static attributes from a conditional model of their joint distribution,
then each patient's sequence step by step from an LSTM with proper likelihood heads."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from synthmed.cohort import Cohort
from synthmed.encoding import SequenceArrays, category_codes
from synthmed.errors import DataError
from synthmed.models.base import GeneratedBatch, Synthesizer, moving_average
from synthmed.models.lstm_network import (
    SequenceNetwork,
    SequenceSampler,
    StepFeatures,
    ValueCodec,
)
from synthmed.models.outcome_labeller import OutcomeLabelling, labelled_columns
from synthmed.models.private_summary import (
    PRIVATE_MAX_STEPS,
    PrivateSummary,
    release_summary,
    warn_unset_steps,
)
from synthmed.models.static_model import (
    ConditionalStaticModel,
    columns_from_blocks,
    fit_static_model,
    fit_static_model_privately,
)
from synthmed.models.transforms import StaticEncoder, ValueScaler
from synthmed.models.value_grid import (
    ON_GRID,
    detect_resolution,
    exact_step,
    frequent_values,
    grid_times,
    put_on_grid,
    snap,
)
from synthmed.models.variability import match_temperature, within_stay_spread

_VALIDATION_SEED_OFFSET = 7919
#: Adam's default learning rate, and the one under DP (see ``LSTMSynthesizer``'s docstring).
_LEARNING_RATE = 3e-3
_PRIVATE_LEARNING_RATE = 1e-3
#: Shares of epsilon (and delta) of the private phases: the static model, the sequence model,
#: and (when the schema has a binary outcome) the outcome labeller and its prevalence count.
#: Later phases are calibrated on the composition, so each reaches its cumulative share.
_PRIVATE_SUMMARY_BUDGET = 0.1
_PRIVATE_STATIC_BUDGET = 0.2
_PRIVATE_SEQUENCE_BUDGET = 0.3
_PRIVATE_LABELLER_BUDGET = 0.3
_PRIVATE_RECALIBRATION_BUDGET = 0.05
_PRIVATE_PREVALENCE_BUDGET = 0.05
#: Where the per-patient dequantisation widths of the static numbers sit in _Prepared.tensors.
_STATIC_DEQUANTIZE = 10
#: Gradient norm clipping of non-private training (DP clips per patient instead).
_CLIP_NORM = 5.0
#: Dropout on the LSTM's outputs without DP (``LSTMConfig.dropout`` left at None).
_DROPOUT = 0.25
#: Generated patients per round of ``match_variability``'s search.
_TEMPERATURE_PATIENTS = 2000
#: Epochs that the weights' moving average of non-private training spans (its decay per
#: minibatch is 1 - 1 / (this * minibatches per epoch): 0.995 on PhysioNet 2012's set A).
_AVERAGE_EPOCHS = 3.5


@dataclasses.dataclass
class LSTMConfig:
    """Architecture of :class:`LSTMSynthesizer` (training settings are constructor arguments).

    Attributes:
        hidden_size: LSTM hidden units.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on the LSTM's outputs, before the heads, and between its layers.
            None: 0.25 without DP, 0 under DP (where the noisy, few-epoch fit underfits). On
            PhysioNet's hourly grid the held-out loss stopped improving after about 50 epochs
            while the training loss kept falling; with 0.25 it improved in every seed
            (``benchmarks/results.md``). The fitted model's ``config_`` holds the choice.
        head_hidden: Hidden units of the mask and value heads' MLPs (0: linear heads).
        gap_components: Log-normal components of the time-gap distribution.
        mask_components: Components of the observation-mask model (a mixture of logistic
            chains over the variables, see ``heads.NonEmptyBernoulliMixture``).
        value_components: Components of the joint mixture over a step's values.
        static_hidden: Hidden units of the static attribute model.
        static_layers: Hidden layers of the static attribute model.
        static_components: Gaussian components per numeric static column.
        min_scale: Smallest standard deviation of a Gaussian component (standardised units).
        value_reads_levels: Whether the value head also reads each numeric variable's last and
            mean observed value directly, besides the LSTM state. On all 4,000 PhysioNet set-a
            patients it narrows the drift of raw stays (discriminative score 0.34 against
            0.38); trained on 1,000, models without it gave the better outcome prediction
            (TSTR AUROC 0.61-0.64 against 0.56-0.57; ``benchmarks/results.md``).
        charted_flags: Whether each patient first draws, given its static attributes, which
            temporal variables it has at all (an arterial line, blood gases), and the sequence
            is generated given those flags: a variable without its flag is never observed.
            None: on without DP, off under DP (at epsilon 10 on PhysioNet the flags lowered the
            TSTR AUROC from 0.74-0.77 to 0.72-0.73; ``benchmarks/results.md``). The fitted
            model's ``config_`` holds the choice; models saved without this setting load with
            it off.
    """

    hidden_size: int = 128
    num_layers: int = 1
    dropout: float | None = None
    head_hidden: int = 64
    gap_components: int = 8
    mask_components: int = 8
    value_components: int = 8
    static_hidden: int = 128
    static_layers: int = 2
    static_components: int = 8
    min_scale: float = 0.01
    value_reads_levels: bool = True
    charted_flags: bool | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "value_reads_levels":
                if not isinstance(value, bool):
                    raise ValueError(f"LSTMConfig.{field.name} must be a bool, got {value!r}")
            elif field.name == "charted_flags":
                if not (value is None or isinstance(value, bool)):
                    raise ValueError(
                        f"LSTMConfig.{field.name} must be a bool or None, got {value!r}"
                    )
            elif field.name in ("dropout", "min_scale"):
                if value is None and field.name == "dropout":
                    continue
                if not (isinstance(value, int | float) and not isinstance(value, bool)):
                    raise ValueError(f"LSTMConfig.{field.name} must be a number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LSTMConfig.{field.name} must be an integer, got {value!r}")
        positive = (
            "hidden_size",
            "num_layers",
            "gap_components",
            "mask_components",
            "value_components",
            "static_hidden",
            "static_components",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"LSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_hidden < 0 or self.static_layers < 0:
            raise ValueError("LSTMConfig.head_hidden and static_layers must be >= 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"LSTMConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.min_scale > 0:
            raise ValueError(f"LSTMConfig.min_scale must be positive, got {self.min_scale}")


class _Network(nn.Module):
    """Everything that sees real data, so one optimizer and one DP wrapper cover it all."""

    def __init__(self, static_model: ConditionalStaticModel, sequence: SequenceNetwork) -> None:
        super().__init__()
        self.static_model = static_model
        self.sequence = sequence

    def forward(
        self,
        static: torch.Tensor,
        static_targets: torch.Tensor,
        static_dequantize: torch.Tensor,
        inputs: torch.Tensor,
        lengths: torch.Tensor,
        ended: torch.Tensor,
        remaining: torch.Tensor,
        gaps: torch.Tensor,
        gap_targets: torch.Tensor,
        mask: torch.Tensor,
        z: torch.Tensor,
        codes: torch.Tensor,
        flags: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``[B, 5]`` negative log-likelihood per patient: static, end, gap, mask, values."""
        static_nll = self.static_model(static_targets, generator, static_dequantize)
        sequence_nll = self.sequence(
            static,
            inputs,
            lengths,
            ended,
            remaining,
            gaps,
            gap_targets,
            mask,
            z,
            codes,
            flags,
            generator=generator,
        )
        return torch.cat([static_nll[:, None], sequence_nll], dim=1)


_COMPONENTS = ("static", "end", "gap", "mask", "values")


class LSTMSynthesizer(OutcomeLabelling, Synthesizer):
    """Autoregressive generator: static attributes first, then the sequence step by step.

    Static attributes come from :class:`~synthmed.models.static_model.ConditionalStaticModel`,
    which can be conditioned on any subset of them; without DP it reads long-tailed numbers
    (survival or length of stay in days) on a log scale, and generated numbers stay inside the
    range the training values span (``StaticEncoder.bounds``). Then, without DP, which temporal
    variables the patient has at all, given them (its charted flags,
    ``LSTMConfig.charted_flags``: an arterial line, blood gases; a Bernoulli mixture drawn once
    per patient), so that a variable the patient does not have is never observed. The sequence
    comes from an LSTM that reads the static vector, the flags and a running summary of the
    sequence so far (for each variable its last value, the time since and share of steps it was
    observed; the time since admission, the previous gap and the step count) and emits at each
    step: whether the sequence stops; the gap to the next observation (zero-inflated log-normal
    mixture); which variables are observed (Bernoulli mixture with at least one observed), given
    the gap; and their values (a mixture of products of Gaussians, centred on each variable's
    last value, and categoricals), given the mask and gap.
    A sequence also ends when its next step would fall after the observation window
    (``max_time_``, e.g. PhysioNet's 48 h), and training scores that end as a right-censored
    gap, so the window, not a per-step hazard, explains why stays end there. Training maximises
    this exact likelihood with teacher forcing on minibatches of patients of similar length and
    stops early on a validation split of patients; what is validated and kept is a moving
    average of the weights over about the last 3.5 epochs (not under DP). Sampling runs whole
    batches of patients in parallel, carrying the LSTM state forward.

    With ``epsilon`` the fit is six private releases composed into one budget: a noisy summary
    (value histograms for the value scaler, mean length and observation rates where the stop
    and mask heads start; 10 %), the static model (20 %), the sequence model (a
    :class:`~synthmed.models.private_lstm.PrivateLSTM`; 30 %), and, when the schema has a binary
    outcome, an outcome labeller that draws it given the generated patient (30 %), its
    calibration slope on the real patients (5 %) and the outcome's prevalence (5 %); see
    :mod:`synthmed.models.outcome_labeller`. Without a binary outcome the sequence model gets
    70 %.

    Generated times and values land where recorded ones lie (see ``quantize``), inside the
    schema's bounds; no sequence is longer than ``max_length_``.

    Args:
        config: Architecture (:class:`LSTMConfig` or a dict of its fields); None for defaults.
        epochs: Maximum passes over the training patients.
        batch_size: Patients per optimisation step (the expected number under DP). On a CPU
            an epoch takes as long at 64 as at 128, and the twice as many steps reach a lower
            held-out loss in fewer epochs (results.md, fourteenth session).
        learning_rate: Adam's learning rate. None: 3e-3, or 1e-3 under DP, where the noise
            added to every step makes a smaller step pay (mean TSTR AUROC at epsilon 10 on
            PhysioNet, six samples of one model: 0.743 against 0.737 with 2e-3).
        validation_fraction: Share of patients held out to pick the best epoch and stop early
            (none under DP, where the held-out loss would not be private, nor for cohorts of
            fewer than 20 patients; training then runs all ``epochs`` and keeps the last
            weights, or their moving average without DP).
        patience: Stop after this many epochs without a better validation loss; the weights of
            the best epoch are kept. The learning rate is halved after half of that. The
            held-out loss of raw PhysioNet stays is noisy (its time-gap term moves by 0.05 from
            epoch to epoch), and with 10 one run stopped at epoch 91 of 200 while still
            improving; halving the rate after a quarter of it stopped another at epoch 119 on
            such a dip (discriminative score 0.331 against 0.307 with the rate halved later).
        max_length: Cut longer training sequences to this many steps (counted in
            ``n_truncated_``; their end is then not learned) and never generate longer ones.
            None: the longest training sequence (under DP, where that would leak, 256).
        max_time: End of the observation window, in the cohort's time unit (e.g. 48 for the
            first 48 hours of a stay): later steps are dropped from training (counted in
            ``n_truncated_``) and sequences end when their next step would fall after it.
            None: the latest time seen in training (under DP: no window, so give it when it
            is public; without it the private model learns poorly where stays end).
        quantize: Put generated times and values where recorded ones lie: on the time grid
            and value resolution found in training (minutes, whole beats per minute, 0.1 °C),
            and, for variables recorded on a small set of values (e.g. heights converted from
            inches), on the values seen at least 5 times. Off under DP, where only the schema's
            ``integer`` flags apply.
        match_variability: After fitting, scale each numeric variable's step noise when
            sampling (a temperature, stored in ``value_temperature_``) so that generated stays
            vary within themselves as much as the training stays do: the mean over patients of
            the within-stay standard deviation of each variable is matched, in three rounds of
            2,000 generated patients. On PhysioNet's hourly grid the stays otherwise varied
            more than real ones (MAP 11.7 against 10.5 mmHg); matched, a classifier told them
            from real ones less often (``benchmarks/results.md``, fifteenth session). Off under
            DP, where the training stays' spread would be a release outside the budget.
        sample_batch_size: Patients generated in parallel by one batch when sampling.
        seed, device, verbose, epsilon, delta, max_grad_norm, rejection_sampling,
            rejection_stages: See :class:`~synthmed.models.base.Synthesizer`.

    Fitted attributes: ``max_length_``, ``max_time_``, ``n_truncated_`` (None when loaded from
    a private model), ``best_epoch_``, ``value_temperature_`` (numeric variable -> the factor on
    its step noise; all 1 without ``match_variability``), ``history_`` (one row per epoch: mean per-step training
    and validation losses, the training loss components ``static``, ``end``, ``gap``, ``mask`` and
    ``values``, and the learning rate; under DP only the epoch, spent epsilon, learning rate and
    time), plus those of the base class.

    Example:
        >>> synth = LSTMSynthesizer(epochs=50).fit(train)
        >>> cohort = synth.sample(1000, conditions={"In-hospital_death": 1})
    """

    model_type: ClassVar[str] = "lstm"
    supports_checkpoints: ClassVar[bool] = True
    config_class: ClassVar[type] = LSTMConfig

    def __init__(
        self,
        config: LSTMConfig | Mapping[str, Any] | None = None,
        *,
        epochs: int = 150,
        batch_size: int = 64,
        learning_rate: float | None = None,
        validation_fraction: float = 0.1,
        patience: int = 20,
        max_length: int | None = None,
        max_time: float | None = None,
        quantize: bool = True,
        match_variability: bool = True,
        sample_batch_size: int = 8192,
        seed: int | None = 0,
        device: str = "auto",
        verbose: bool = True,
        epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        rejection_sampling: float | None = None,
        rejection_stages: int = 1,
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
        self.config = config
        # A dict of fields becomes an LSTMConfig (validated), so settings round-trip through
        # saved files unchanged.
        self.config = self._resolve_config() if config is not None else None
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.max_length = max_length
        self.max_time = max_time
        self.quantize = quantize
        self.match_variability = match_variability
        self.sample_batch_size = sample_batch_size
        self._check_settings()

    def _resolve_config(self) -> LSTMConfig:
        if self.config is None:
            return LSTMConfig()
        if isinstance(self.config, LSTMConfig):
            return self.config
        if isinstance(self.config, Mapping):
            unknown = set(self.config) - {f.name for f in dataclasses.fields(LSTMConfig)}
            if unknown:
                raise ValueError(f"LSTMConfig has no field(s) {sorted(unknown)}")
            return LSTMConfig(**self.config)
        raise ValueError(f"config must be an LSTMConfig, a dict or None, got {self.config!r}")

    def _check_settings(self) -> None:
        if self.learning_rate is not None and not (
            isinstance(self.learning_rate, int | float)
            and not isinstance(self.learning_rate, bool)
            and self.learning_rate > 0
        ):
            raise ValueError(f"learning_rate must be positive or None, got {self.learning_rate!r}")
        if not (
            isinstance(self.validation_fraction, int | float) and 0 <= self.validation_fraction < 1
        ):
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        for name in ("quantize", "match_variability"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_time is not None and not (
            isinstance(self.max_time, int | float)
            and not isinstance(self.max_time, bool)
            and math.isfinite(self.max_time)
            and self.max_time > 0
        ):
            raise ValueError(f"max_time must be a positive number or None, got {self.max_time!r}")
        for name, value, least in (
            ("patience", self.patience, 1),
            ("sample_batch_size", self.sample_batch_size, 1),
            ("max_length", self.max_length, 1),
        ):
            if name == "max_length" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    # -- fitting ---------------------------------------------------------------------------------

    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        self._check_settings()
        config = self._resolve_config()
        schema = cohort.schema
        if not schema.temporal_columns:
            raise DataError("LSTMSynthesizer needs at least one temporal variable")
        private = self.epsilon is not None
        if private:
            from synthmed.models.privacy import check_public_schema

            check_public_schema(cohort)
            if self.max_length is None:
                warn_unset_steps("max_length")
        if config.charted_flags is None:
            config = dataclasses.replace(config, charted_flags=not private)
        if config.dropout is None:
            config = dataclasses.replace(config, dropout=0.0 if private else _DROPOUT)
        # Under DP the longest training sequence would leak: a fixed number of steps instead.
        max_length = self.max_length or (PRIVATE_MAX_STEPS if private else None)
        device = self.device_
        summary = self._private_summary(cohort, max_length, generator) if private else None
        data = _prepare(cohort, max_length, self.max_time, self.quantize, private, device, summary)
        self.config_ = config
        self.static_encoder_ = data.static_encoder
        self.value_scaler_ = data.value_scaler
        self.facts_ = data.facts
        self.max_length_ = data.facts["max_length"]
        self.max_time_ = data.facts["max_time"]
        self.n_truncated_ = data.n_truncated

        network = self._build_network(private).to(device)
        seq = network.sequence
        with torch.no_grad():  # start the stop head at the mean stop rate
            seq.out.bias[0] = -math.log(max(data.facts["mean_length"], 1.0))
            if summary is not None:  # and, under DP, the mask head at the observation rates
                rates = [summary.observation_rates[v] for v in data.facts["numeric_variables"]]
                rates += [summary.observation_rates[v] for v in data.facts["categorical_variables"]]
                logits = torch.logit(torch.tensor(rates, dtype=torch.float32))
                components = seq.mask_head.n_components
                seq.mask_net[-1].bias[components:] = logits.repeat(components)
        n = cohort.n_patients
        order = torch.randperm(n, generator=generator)
        n_val = int(round(n * self.validation_fraction))
        if private or n < 20 or n_val < 1:
            n_val = 0
        val_rows, train_rows = order[:n_val], order[n_val:]
        # One item per patient (its row in the prepared tensors), as DP-SGD requires.
        loader = DataLoader(
            TensorDataset(train_rows),
            batch_sampler=_LengthBatches(
                data.tensors[6][train_rows].cpu(), min(self.batch_size, len(train_rows)), generator
            ),
        )
        if device.type == "cpu":
            noise = generator
        else:
            noise = torch.Generator(device=device).manual_seed(
                int(torch.randint(2**31 - 1, (1,), generator=generator))
            )
        # The static model shares no parameter with the sequence model: it gets its own, longer
        # schedule first (see fit_static_model), under DP on its own share of the budget.
        static_rows, dequantize = data.tensors[0], data.tensors[_STATIC_DEQUANTIZE]
        if private:
            static_fit = fit_static_model_privately(
                network.static_model,
                static_rows[train_rows.to(device)],
                noise,
                functools.partial(self._make_private, budget_fraction=_PRIVATE_STATIC_BUDGET),
                dequantize[train_rows.to(device)],
            )
        else:
            static_fit = fit_static_model(
                network.static_model,
                static_rows[train_rows.to(device)],
                static_rows[val_rows.to(device)],
                noise,
                dequantize[train_rows.to(device)],
            )
        network.static_model.requires_grad_(False)
        self.facts_["static_fit"] = static_fit
        trainable = [p for p in network.parameters() if p.requires_grad]
        learning_rate = self.learning_rate
        if learning_rate is None:
            learning_rate = _PRIVATE_LEARNING_RATE if private else _LEARNING_RATE
        optimizer = torch.optim.Adam(trainable, lr=learning_rate)
        labelled = labelled_columns(schema) if private else []
        sequence_budget = (
            _PRIVATE_SEQUENCE_BUDGET
            if labelled
            else 1 - _PRIVATE_SUMMARY_BUDGET - _PRIVATE_STATIC_BUDGET
        )
        module, optimizer, loader = self._make_private(
            network, optimizer, loader, self.epochs, budget_fraction=sequence_budget
        )
        # Halve the learning rate when the monitored loss stalls, before early stopping gives up
        # (not under DP: the schedule would depend on the patients' losses).
        scheduler = (
            None
            if private
            else torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=0.5, patience=max(1, self.patience // 2)
            )
        )
        norm = data.facts["mean_length"] + 1.0
        best, best_state, best_epoch, bad, first_epoch = math.inf, None, 0, 0, 0
        history: list[dict[str, float]] = []
        # The noise generator is the data-order one on CPU; on a GPU it is saved by name.
        named = {} if noise is generator else {"noise": noise}
        # After _make_private: restores the RNGs, history and, under DP, the accountant.
        resumed = self._load_checkpoint(generator, named)
        saved: dict[str, Any] = {}
        if resumed is not None:
            first_epoch, saved = resumed
            network.load_state_dict(saved["network"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            best, best_epoch, bad = saved["best"], saved["best_epoch"], saved["bad"]
            best_state = saved.get("best_state")
            history = self.history_.to_dict(orient="records")
        # Without DP the weights kept are a moving average of the iterates: the last iterate
        # alone is one noisy step of Adam's, and rates such as the arterial line's moved by
        # +-0.05 from fit to fit with it. Made after a resumed network is loaded, so that a
        # checkpoint written before the average was kept starts it from the network it saved.
        averaged = (
            None
            if private
            else moving_average(network, _AVERAGE_EPOCHS, len(loader), saved.get("averaged"))
        )
        kept = network if averaged is None else averaged.module
        progress = tqdm(
            range(first_epoch, self.epochs), desc="LSTM", unit="epoch", disable=not self.verbose
        )
        started = time.perf_counter()
        for epoch in progress:
            if bad >= self.patience:
                break  # a resumed run that had already stopped early
            module.train()
            sums, count = torch.zeros(len(_COMPONENTS)), 0
            for (rows,) in loader:
                if len(rows) == 0:  # Poisson sampling under DP can draw an empty batch
                    continue
                batch = [t[rows.to(device)] for t in data.tensors]
                parts = module(*self._batch_arguments(batch, data, noise, device), generator=noise)
                loss = parts.sum(1).mean() / norm
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not private:
                    nn.utils.clip_grad_norm_(network.parameters(), _CLIP_NORM)
                optimizer.step()
                network.sequence.project()
                if averaged is not None:
                    averaged.update_parameters(network)
                sums += parts.detach().sum(0).cpu()
                count += len(parts)
            row: dict[str, float] = {"epoch": epoch + 1}
            if private:
                # Losses on real patients are not private: keep only what DP accounts for.
                row["epsilon"] = self.privacy_spent_[0] if self.privacy_spent_ else 0.0
            else:
                train = sums / max(count, 1) / norm
                row["train_loss"] = float(train.sum())
                row.update({name: float(v) for name, v in zip(_COMPONENTS, train, strict=True)})
                if n_val:
                    row["val_loss"] = self._validation_loss(kept, data, val_rows, norm)
            row["learning_rate"] = optimizer.param_groups[0]["lr"]
            row["seconds"] = time.perf_counter() - started
            history.append(row)
            progress.set_postfix(
                {k: f"{row[k]:.3f}" for k in ("train_loss", "val_loss", "epsilon") if k in row}
            )
            if scheduler is not None:
                score = row.get("val_loss", row.get("train_loss", 0.0))
                scheduler.step(score)
                if n_val:
                    if score < best - 1e-4:
                        best, best_epoch, bad = score, epoch + 1, 0
                        best_state = copy.deepcopy(kept.state_dict())
                    else:
                        bad += 1
            if self._checkpoint_due(epoch) or (bad >= self.patience and self._checkpoint_dir):
                self.history_ = pd.DataFrame(history)
                checkpoint = {
                    "network": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "best": best,
                    "best_epoch": best_epoch,
                    "bad": bad,
                    "best_state": best_state,
                    "averaged": averaged.state_dict() if averaged is not None else None,
                }
                self._save_checkpoint(epoch, checkpoint, generator, named)
            if bad >= self.patience:
                break
        if best_state is None and averaged is not None:
            best_state = averaged.module.state_dict()
        if best_state is not None:
            network.load_state_dict(best_state)
        self.best_epoch_ = best_epoch if n_val else len(history)
        self.history_ = pd.DataFrame(history)
        self.labeller_ = None
        if labelled:
            labeller = self._fit_outcome_labeller(
                cohort,
                train_rows.numpy(),
                generator,
                labeller_budget=_PRIVATE_LABELLER_BUDGET,
                recalibration_budget=_PRIVATE_RECALIBRATION_BUDGET,
                prevalence_budget=_PRIVATE_PREVALENCE_BUDGET,
            )
        if private:
            from synthmed.models.privacy import record_spent

            record_spent(self)
        self._install(network.state_dict(), device)
        if self.match_variability and not private:
            self._match_variability(cohort, generator)
        if labelled:
            self._install_outcome_labeller(labeller.state_dict(), labelled)
            self._calibrate_outcome_labeller(noise)

    def _private_summary(
        self, cohort: Cohort, max_length: int, generator: torch.Generator
    ) -> PrivateSummary:
        """What the model starts from under DP (``private_summary.release_summary`` on
        ``_PRIVATE_SUMMARY_BUDGET`` of the budget, over the steps it learns from, the first
        ``max_length`` of each stay): the value scaler is fitted on the histograms, and the
        length and rates start the stop and mask heads."""
        arrays = cohort.arrays
        inside = _steps_in_window(arrays, self.max_time)
        inside = inside & (np.arange(arrays.max_length)[None, :] < max_length)
        return release_summary(
            self, cohort, inside, max_length, generator, budget_fraction=_PRIVATE_SUMMARY_BUDGET
        )

    def _build_network(self, private: bool) -> _Network:
        config, facts = self.config_, self.facts_
        static_model = ConditionalStaticModel(
            columns_from_blocks(self.static_encoder_.blocks_),
            hidden_size=config.static_hidden,
            num_layers=config.static_layers,
            n_components=config.static_components,
            min_scale=config.min_scale,
        )
        sequence = SequenceNetwork(
            static_size=self.static_encoder_.width_,
            n_numeric=len(facts["numeric_variables"]),
            category_sizes=facts["category_sizes"],
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout,
            gap_components=config.gap_components,
            mask_components=config.mask_components,
            value_components=config.value_components,
            head_hidden=config.head_hidden,
            min_scale=config.min_scale,
            gap_scale=facts["gap_scale"],
            private=private,
            value_reads_levels=config.value_reads_levels,
            charted_flags=config.charted_flags,
        )
        return _Network(static_model, sequence)

    def _batch_arguments(
        self,
        batch: list[torch.Tensor],
        data: _Prepared,
        noise: torch.Generator,
        device: torch.device,
    ) -> tuple[torch.Tensor, ...]:
        static, inputs, gaps, mask, values, codes, lengths, ended, remaining, flags, dequantize = (
            t.to(device, non_blocking=True) for t in batch
        )
        steps = max(int(lengths.max()), 1)
        inputs, gaps, mask = inputs[:, : steps + 1], gaps[:, :steps], mask[:, :steps]
        values, codes = values[:, :steps], codes[:, :steps]
        quantum = data.facts["time_quantum"]
        gap_targets = gaps
        if quantum > 0:
            # Dequantise: a gap recorded on a grid stands for an interval of the grid's width.
            u = torch.rand(gaps.shape, generator=noise, device=device)
            gap_targets = torch.where(gaps > 0, gaps + quantum * (u - 0.5), gaps)
        resolution = data.codec.resolution
        if values.shape[-1]:
            u = torch.rand(values.shape, generator=noise, device=device)
            values = values + resolution * (u - 0.5)
        numeric_mask = mask[..., : values.shape[-1]]
        z = torch.where(numeric_mask, data.codec.to_z(values), torch.zeros_like(values))
        return (
            static,
            static,
            dequantize,
            inputs,
            lengths,
            ended,
            remaining,
            gaps,
            gap_targets,
            mask,
            z,
            codes,
            flags,
        )

    @torch.no_grad()
    def _validation_loss(
        self, network: _Network, data: _Prepared, rows: torch.Tensor, norm: float
    ) -> float:
        network.eval()
        device = self.device_
        # The same random orders and noise at every epoch, so epochs compare fairly.
        noise = torch.Generator(device=device).manual_seed(self.seed_ + _VALIDATION_SEED_OFFSET)
        total = 0.0
        for start in range(0, len(rows), 512):
            chunk = rows[start : start + 512]
            batch = [t[chunk.to(device)] for t in data.tensors]
            parts = network(*self._batch_arguments(batch, data, noise, device), generator=noise)
            total += float(parts.sum())
        network.train()
        return total / len(rows) / norm

    def _install(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Build the sampling network (plain nn.LSTM, eval mode) from trained weights."""
        network = self._build_network(private=False)
        network.load_state_dict(state, strict=True)
        self.network_ = network.to(device).eval()
        facts = self.facts_
        self._codec = _codec(facts, self.value_scaler_, device)
        self._sampler = SequenceSampler(
            self.network_.sequence,
            self._codec,
            feature_args=_feature_args(facts),
            time_quantum=facts["time_quantum"],
            min_positive_gap=facts["time_quantum"],
        )
        # Files written before the temperatures existed sample at temperature 1.
        self._use_value_temperature(facts.get("value_temperature"))
        encoder = self.static_encoder_
        lower, upper = [], []
        for block in encoder.blocks_:
            if block.kind != "numeric":
                continue
            lo, hi = encoder.bounds(block.name)
            lower.append(float(encoder.encode_number(block.name, lo)))
            upper.append(float(encoder.encode_number(block.name, hi)))
        self._static_bounds = (
            torch.tensor(lower, dtype=torch.float32, device=device),
            torch.tensor(upper, dtype=torch.float32, device=device),
        )

    def _match_variability(self, cohort: Cohort, generator: torch.Generator) -> None:
        """Find ``value_temperature_`` (see ``match_variability``) and install it."""
        numeric = self.facts_["numeric_variables"]
        if not numeric:
            return
        arrays = cohort.arrays
        # Training and generated arrays both hold the schema's temporal columns in its order.
        columns = [arrays.variables.index(name) for name in numeric]
        lengths = _steps_in_window(arrays, self.max_time_).sum(axis=1)
        target = within_stay_spread(arrays.values[..., columns], lengths)
        conditions = self._conditions_frame(_TEMPERATURE_PATIENTS, None)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))

        def generate(temperature: np.ndarray) -> np.ndarray:
            self._use_value_temperature(dict(zip(numeric, temperature.tolist(), strict=True)))
            draws = torch.Generator(device=self.device_).manual_seed(seed)
            with torch.no_grad():
                batch = self._generate_patients(conditions, draws)
            return within_stay_spread(batch.values[..., columns], batch.lengths)

        temperature = match_temperature(target, generate)
        self.facts_["value_temperature"] = {
            name: float(t) for name, t in zip(numeric, temperature, strict=True)
        }
        self._use_value_temperature(self.facts_["value_temperature"])

    def _use_value_temperature(self, temperature: Mapping[str, float] | None) -> None:
        """Sample with ``temperature`` (numeric variable -> factor on its step noise); None:
        every factor 1, and the sampler skips the scaling."""
        numeric = self.facts_["numeric_variables"]
        self.value_temperature_ = {
            name: float((temperature or {}).get(name, 1.0)) for name in numeric
        }
        self._sampler.value_temperature = (
            torch.tensor([self.value_temperature_[name] for name in numeric], device=self.device_)
            if temperature
            else None
        )

    # -- sampling --------------------------------------------------------------------------------

    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        self._check_seen_categories(conditions)
        batch = self._generate_patients(conditions, generator)
        if self.labeller_ is None:
            return batch
        return self._label_outcomes(batch, conditions, generator)

    def _labeller_horizon(self) -> tuple[int, float]:
        time = self.max_time_ or self.facts_["gap_scale"] * self.max_length_
        return self.max_length_, float(time)

    def _redraw_static(
        self, static: pd.DataFrame, columns: list[str], generator: torch.Generator
    ) -> pd.DataFrame:
        drawn = pd.concat(
            [
                self._draw_static(static.iloc[start : start + self.sample_batch_size], generator)
                for start in range(0, len(static), self.sample_batch_size)
            ],
            ignore_index=True,
        )
        return drawn[columns]

    def _generate_patients(
        self, conditions: pd.DataFrame, generator: torch.Generator
    ) -> GeneratedBatch:
        """Static rows from the static model, then their sequences, in batches."""
        device = self.device_
        statics, parts = [], []
        for start in range(0, len(conditions), self.sample_batch_size):
            stop = min(start + self.sample_batch_size, len(conditions))
            static = self._draw_static(conditions.iloc[start:stop], generator)
            encoded = torch.as_tensor(self.static_encoder_.transform(static), device=device)
            parts.append(self._sampler.sample(encoded, generator, self.max_length_, self.max_time_))
            statics.append(static)
        static = pd.concat(statics, ignore_index=True)
        times, values, lengths = self._assemble(parts, len(conditions))
        return GeneratedBatch(static=static, times=times, values=values, lengths=lengths)

    def _draw_static(self, conditions: pd.DataFrame, generator: torch.Generator) -> pd.DataFrame:
        """One static row per row of ``conditions``, its given cells kept."""
        encoder = self.static_encoder_
        given = conditions.notna().to_numpy()
        known = torch.as_tensor(
            np.stack([given[:, conditions.columns.get_loc(b.name)] for b in encoder.blocks_], 1)
            if encoder.blocks_
            else np.zeros((len(conditions), 0), bool),
            device=self.device_,
        )
        encoded = torch.as_tensor(encoder.transform(conditions), device=self.device_)
        x = self.network_.static_model.sample(encoded, known, generator, self._static_bounds)
        return self._decode_static(x, conditions, generator)

    def _check_seen_categories(self, conditions: pd.DataFrame) -> None:
        for name, seen in self.facts_["seen_categories"].items():
            given = conditions[name].dropna()
            if given.empty:
                continue
            categories = self.schema_[name].categories
            codes = category_codes(given, categories)
            unseen = ~np.isin(codes, seen)
            if unseen.any():
                raise DataError(
                    f"condition column {name!r}: category {given.iloc[int(np.argmax(unseen))]!r} "
                    f"never occurs in the training data, so the model cannot condition on it; "
                    f"seen categories: {[categories[c] for c in seen]}"
                )

    def _decode_static(
        self, x: torch.Tensor, conditions: pd.DataFrame, generator: torch.Generator
    ) -> pd.DataFrame:
        static = self.static_encoder_.inverse(x.cpu().numpy())
        facts = self.facts_
        # Schema order, so a seed draws the same snapping choices in every process.
        for name in self.schema_.static_columns:
            if name not in facts["static_resolution"] and name not in facts["static_support"]:
                continue
            grid = {"resolution": facts["static_resolution"].get(name, 0.0)}
            if name in facts["static_support"]:
                # As for temporal values: snap with the share of training values on the support.
                grid["support"] = facts["static_support"][name]
                grid["share"] = facts.get("static_support_share", {}).get(name, 1.0)
                grid["weights"] = facts.get("static_support_weight", {}).get(name)
            drawn = static[name].to_numpy(dtype=np.float64)
            low, high = self.static_encoder_.bounds(name)
            static[name] = put_on_grid(drawn, grid, low, high, generator)
        for name in conditions.columns:
            given = conditions[name].notna().to_numpy()
            if given.any() and self.schema_[name].kind == "numeric":
                values = static[name].to_numpy(dtype=np.float64)
                values[given] = conditions[name].to_numpy(dtype=np.float64)[given]
                static[name] = values
        return static

    def _assemble(
        self, parts: list[tuple[torch.Tensor, ...]], n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        longest = max((int(p[0].shape[1]) for p in parts), default=0)
        facts = self.facts_
        variables = self.schema_.temporal_columns
        numeric_pos = [variables.index(v) for v in facts["numeric_variables"]]
        categorical_pos = [variables.index(v) for v in facts["categorical_variables"]]
        times = np.zeros((n, longest))
        values = np.full((n, longest, len(variables)), np.nan)
        lengths = np.zeros(n, dtype=np.int64)
        row = 0
        for p_times, p_values, p_codes, p_mask, p_lengths in parts:
            size, steps = p_times.shape
            block = slice(row, row + size)
            lengths[block] = p_lengths.cpu().numpy()
            # Finished patients ride along in the sampler, so steps past a length hold values.
            inside = np.arange(steps)[None, :] < lengths[block, None]
            times[block, :steps] = np.where(inside, p_times.cpu().numpy(), 0.0)
            observed = p_mask.cpu().numpy() & inside[..., None]
            # Copied one variable at a time into views of ``values``, where observed: no
            # temporaries of the whole block (raw stays run to hundreds of steps).
            sources = [
                (p_values.cpu().numpy(), numeric_pos),
                (p_codes.cpu().numpy(), categorical_pos),
            ]
            offset = 0
            for source, positions in sources:
                for k, position in enumerate(positions):
                    np.copyto(
                        values[block, :steps, position],
                        source[..., k],
                        where=observed[..., offset + k],
                    )
                offset += len(positions)
            row += size
        # The network works in float32; put times and values back on their grid in float64.
        quantum = facts["time_quantum"]
        if quantum > 0:
            times = grid_times(np.round(times / quantum), quantum)
        for name, position in zip(facts["numeric_variables"], numeric_pos, strict=True):
            step = facts["value_resolution"][name]
            support = facts["value_support"].get(name)
            if step > 0 or support:
                lo, hi = self.schema_[name].bounds
                column = values[..., position]
                present = ~np.isnan(column)
                column_values = column[present]
                if step > 0:
                    column_values = np.round(column_values / step) * step
                if support:
                    column_values = snap(column_values, support, tolerance=1e-6)
                column[present] = np.clip(column_values, lo, hi)
        return times, values, lengths

    # -- persistence -----------------------------------------------------------------------------

    def _get_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        state = {
            "config": dataclasses.asdict(self.config_),
            "static_encoder": self.static_encoder_.to_dict(),
            "value_scaler": self.value_scaler_.to_dict(),
            "facts": self.facts_,
            "best_epoch": self.best_epoch_,
        }
        tensors = {k: v.detach().cpu() for k, v in self.network_.state_dict().items()}
        self._save_outcome_labeller(state, tensors)
        return state, tensors

    def _set_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        # Files written before charted flags existed were trained without them.
        self.config_ = LSTMConfig(**{"charted_flags": False, **config["config"]})
        # The file stores JSON with sorted keys, and StaticEncoder lays out its blocks in the
        # order of its dict: restore the schema's column order first.
        encoder = config["static_encoder"]
        columns = {name: encoder["columns"][name] for name in self.schema_.static_columns}
        self.static_encoder_ = StaticEncoder.from_dict(
            {**encoder, "columns": columns}, self.schema_
        )
        self.value_scaler_ = ValueScaler.from_dict(config["value_scaler"], self.schema_)
        facts = dict(config["facts"])
        self.facts_ = facts
        self.max_length_ = int(facts["max_length"])
        self.max_time_ = facts["max_time"]
        self.n_truncated_ = facts["n_truncated"]
        self.best_epoch_ = int(config["best_epoch"])
        self._install(self._load_outcome_labeller(config, tensors), self.device_)


class _LengthBatches(torch.utils.data.Sampler):
    """Minibatches of patients of similar length, in random order (each patient once per epoch).

    Sorting by length with random jitter before cutting batches keeps padding, and so training
    time, low, while batches still vary from epoch to epoch. Under DP the data loader is replaced
    by Poisson sampling, which ignores this.
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.lengths = lengths.to(torch.float64)
        self.batch_size = batch_size
        self.generator = generator
        self.jitter = float(self.lengths.std()) * 0.5 if len(lengths) > 1 else 0.0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        noise = torch.rand(len(self.lengths), generator=self.generator, dtype=torch.float64)
        order = torch.argsort(self.lengths + self.jitter * noise)
        batches = list(torch.split(order, self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i].tolist()


# -- data preparation --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Prepared:
    static_encoder: StaticEncoder
    value_scaler: ValueScaler
    codec: ValueCodec
    facts: dict[str, Any]
    tensors: list[torch.Tensor]
    n_truncated: int


def _dequantize_widths(
    encoder: StaticEncoder, name: str, values: np.ndarray, step: float
) -> np.ndarray:
    """Each patient's width, on the encoded scale, of the grid cell its value of the static
    column ``name`` stands for (0 off the grid; a missing value gets a width that is never
    used, as its noise is not added). On a log scale the cell narrows as the value grows."""
    info = encoder.columns_[name]
    if step <= 0 or not info["log"]:
        return np.full(len(values), step / info["scale"])
    values = np.where(np.isfinite(values), values, 0.0)
    low = np.maximum(values - step / 2, 0.0)
    return encoder.encode_number(name, values + step / 2) - encoder.encode_number(name, low)


def _steps_in_window(arrays: SequenceArrays, max_time: float | None) -> np.ndarray:
    """``[n, T]`` bool: the steps of each stay up to the end of the observation window (every
    step without one)."""
    if max_time is None:
        return arrays.step_mask
    return arrays.step_mask & (arrays.times <= max_time)


def _time_quantum(times: np.ndarray) -> float:
    """The grid of the recorded times (e.g. 1/60 h for minutes), or 0.0 when they are
    continuous: the smallest positive gap, if (nearly) all times are multiples of it."""
    flat = np.unique(times[np.isfinite(times)])
    gaps = np.diff(flat)
    gaps = gaps[gaps > 1e-9]
    if len(gaps) == 0 or len(flat) < 20:
        return 0.0
    quantum = float(gaps.min())
    ratio = flat / quantum
    if np.mean(np.abs(ratio - np.round(ratio)) < 1e-3) < ON_GRID:
        return 0.0
    return exact_step(quantum)


def _feature_args(facts: dict[str, Any]) -> dict[str, float]:
    return {
        "gap_scale": facts["gap_scale"],
        "time_scale": facts["time_scale"],
        "length_scale": float(facts["max_length"]),
        "max_time": facts["max_time"],
    }


def _codec(facts: dict[str, Any], scaler: ValueScaler, device: torch.device) -> ValueCodec:
    schema = scaler.schema_
    variables = schema.temporal_columns
    positions = [variables.index(v) for v in facts["numeric_variables"]]
    lower, upper, resolution, support, share, weights = [], [], [], [], [], []
    for name in facts["numeric_variables"]:
        low, high = schema[name].bounds
        lower.append(low)
        upper.append(high)
        resolution.append(facts["value_resolution"][name])
        support.append(facts["value_support"].get(name))
        share.append(facts.get("value_support_share", {}).get(name, 1.0))
        weights.append(facts.get("value_support_weight", {}).get(name))
    return ValueCodec(
        log=scaler.log_[positions],
        center=scaler.center_[positions],
        scale=scaler.scale_[positions],
        lower=lower,
        upper=upper,
        resolution=resolution,
        support=support,
        device=device,
        support_share=share,
        support_weights=weights,
    )


def _prepare(
    cohort: Cohort,
    max_length: int | None,
    max_time: float | None,
    quantize: bool,
    private: bool,
    device: torch.device,
    summary: PrivateSummary | None = None,
) -> _Prepared:
    """Everything training needs, computed once: encoders, the facts the model keeps (scales,
    grids, lengths: data-free under DP), and padded tensors with the step features."""
    schema = cohort.schema
    arrays = cohort.arrays
    variables = list(arrays.variables)
    numeric = [v for v in variables if schema[v].kind == "numeric"]
    categorical = [v for v in variables if schema[v].kind != "numeric"]
    order = [variables.index(v) for v in numeric + categorical]

    # Steps after the window are dropped; the sequence then ends at the window (censored).
    lengths = _steps_in_window(arrays, max_time).sum(axis=1).astype(np.int64)
    # A sequence cut at max_length has an unknown end; one cut by the window ends there.
    ended = lengths <= max_length if max_length is not None else np.ones(len(lengths), bool)
    if max_length is not None:
        lengths = np.minimum(lengths, max_length)
    n_truncated = int((lengths < arrays.lengths).sum())
    steps = max(int(lengths.max()) if len(lengths) else 0, 1)
    step_mask = np.arange(steps)[None, :] < lengths[:, None]
    times = np.zeros((len(lengths), steps))
    gaps = np.zeros((len(lengths), steps))
    width = min(steps, arrays.max_length)
    times[:, :width] = arrays.times[:, :width]
    gaps[:, :width] = arrays.gaps[:, :width]
    times, gaps = np.where(step_mask, times, 0.0), np.where(step_mask, gaps, 0.0)
    values = np.full((len(lengths), steps, len(variables)), np.nan, dtype=np.float32)
    values[:, :width] = arrays.values[:, :width][:, :, order]
    values[~step_mask] = np.nan
    mask = ~np.isnan(values)

    static_encoder = StaticEncoder().fit(
        cohort.static, schema, from_bounds=private, log_skewed=True
    )
    if summary is not None:  # private: the scaler of noisy histograms
        value_scaler = summary.value_scaler(schema)
    else:
        value_scaler = ValueScaler().fit(arrays.values, schema, from_bounds=private)

    observed_gaps = gaps[step_mask]
    positive = observed_gaps[observed_gaps > 0]
    last_times = times[np.arange(len(lengths)), np.maximum(lengths - 1, 0)][lengths > 0]
    if max_time is None and not private:
        max_time = float(last_times.max()) if len(last_times) else None
    # Where recorded values lie (grid steps, frequent values). Under DP only the schema's
    # `integer` flags are used: these statistics are not privatised.
    learn_grid = quantize and not private
    value_resolution, value_support, value_share, value_weight = {}, {}, {}, {}
    for j, name in enumerate(numeric):
        observed = values[:, :, j][mask[:, :, j]]
        step = detect_resolution(observed) if learn_grid else 0.0
        value_resolution[name] = max(step, 1.0) if schema[name].integer else step
        found = frequent_values(observed) if learn_grid else None
        if found is not None:
            value_support[name], value_share[name], value_weight[name] = found
    static_resolution, static_support, static_share, static_weight = {}, {}, {}, {}
    static_dequantize = []
    for block in static_encoder.blocks_:
        if block.kind != "numeric":
            continue
        column_values = cohort.static[block.name].to_numpy(np.float64)
        step = detect_resolution(column_values) if learn_grid else 0.0
        step = max(step, 1.0) if schema[block.name].integer else step
        if step > 0:
            static_resolution[block.name] = step
        found = frequent_values(column_values) if learn_grid else None
        if found is not None:
            static_support[block.name], static_share[block.name], static_weight[block.name] = found
        static_dequantize.append(
            _dequantize_widths(static_encoder, block.name, column_values, step)
        )
    seen_categories = {}
    for name in schema.static_columns:
        column = schema[name]
        if column.kind != "numeric":
            codes = category_codes(cohort.static[name], column.categories)
            seen = (
                list(range(len(column.categories)))
                if private
                else sorted(int(c) for c in np.unique(codes[codes >= 0]))
            )
            seen_categories[name] = seen
    if private:
        # Nothing the model keeps may depend on the patients: lengths and scales come from the
        # settings, not from the data.
        mean_length = summary.mean_length if summary is not None else max_length / 2
        longest, truncated = max_length, None
        gap_scale = max_time / max_length if max_time else 1.0
    else:
        longest = int(lengths.max()) if len(lengths) else 0
        mean_length, truncated = float(lengths.mean()), n_truncated
        gap_scale = float(np.median(positive)) if len(positive) else 1.0
    facts: dict[str, Any] = {
        "numeric_variables": numeric,
        "categorical_variables": categorical,
        "category_sizes": [len(schema[v].categories) for v in categorical],
        "max_length": longest,
        "mean_length": mean_length,
        "n_truncated": truncated,
        "max_time": max_time,
        "time_scale": max_time if max_time and max_time > 0 else 1.0,
        "gap_scale": gap_scale,
        "time_quantum": _time_quantum(times[step_mask]) if learn_grid else 0.0,
        "value_resolution": value_resolution,
        "value_support": value_support,
        "value_support_share": value_share,
        "value_support_weight": value_weight,
        "static_resolution": static_resolution,
        "static_support": static_support,
        "static_support_share": static_share,
        "static_support_weight": static_weight,
        "seen_categories": seen_categories,
    }
    codec = _codec(facts, value_scaler, device)

    n = len(lengths)
    numeric_values = np.nan_to_num(values[..., : len(numeric)], nan=0.0)
    codes = np.nan_to_num(values[..., len(numeric) :], nan=0.0).astype(np.int64)
    t_values = torch.as_tensor(numeric_values, device=device)
    t_mask = torch.as_tensor(mask, device=device)
    t_codes = torch.as_tensor(codes, device=device)
    t_gaps = torch.as_tensor(gaps, dtype=torch.float32, device=device)
    z = torch.where(t_mask[..., : len(numeric)], codec.to_z(t_values), torch.zeros_like(t_values))
    features = StepFeatures(
        n, len(numeric), facts["category_sizes"], device=device, **_feature_args(facts)
    )
    inputs = []
    for t in range(steps):
        inputs.append(features.inputs())
        features.update(t_gaps[:, t], t_mask[:, t], z[:, t], t_codes[:, t])
    inputs.append(features.inputs())
    static = torch.as_tensor(static_encoder.transform(cohort.static), device=device)
    ended = torch.as_tensor(ended, device=device)
    last_time = times[np.arange(n), np.maximum(lengths - 1, 0)] * (lengths > 0)
    remaining = (
        np.maximum(max_time - last_time, 0.0) if max_time is not None else np.full(n, np.inf)
    )
    tensors = [
        static,
        torch.stack(inputs, dim=1),
        t_gaps,
        t_mask,
        t_values,
        t_codes,
        torch.as_tensor(lengths, device=device),
        ended,
        torch.as_tensor(remaining, dtype=torch.float32, device=device),
        # Which variables each patient has at some step (its charted flags).
        t_mask.any(dim=1).to(torch.float32),
        torch.as_tensor(
            np.stack(static_dequantize, axis=1) if static_dequantize else np.zeros((n, 0)),
            dtype=torch.float32,
            device=device,
        ),
    ]
    return _Prepared(
        static_encoder,
        value_scaler,
        codec,
        facts,
        tensors,
        n_truncated,
    )
