"""The networks behind :class:`synthmed.LSTMSynthesizer`: step features, the LSTM with its
likelihood heads, and the batched step-by-step sampler.

Before the first step, with charted flags, each patient draws from its static vector which
variables it has at all (``p(flags | static)``, a Bernoulli mixture with at least one on, as the
mask head). At step t the LSTM has read a summary of steps ``< t`` (:class:`StepFeatures`), the
static vector and the flags, and its output parameterises, in this order:

1. ``p(stop)``: the sequence ends before step t (so empty sequences are possible);
2. ``p(gap)``: the time since the previous step, a zero-inflated log-normal mixture;
3. ``p(mask | gap)``: which variables are observed, a Bernoulli mixture with at least one on
   (a variable whose flag is off never);
4. ``p(values | mask, gap)``: a product mixture over the variables, Gaussian in the
   standardised space of :class:`~synthmed.models.transforms.ValueScaler` for numeric variables
   and softmax for categorical ones; unobserved variables are marginalised out.

Variables are held in an internal order, numeric ones first, then categorical ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthmed.models.heads import (
    NonEmptyBernoulliMixture,
    ProductMixture,
    ZeroInflatedLogNormalMixture,
)
from synthmed.models.value_grid import REACH, cell_boundaries

#: Largest lookup table of a variable's snapping grid.
_LOOKUP_SIZE = 8192
#: How far a variable's observation logit is lowered when its charted flag is off.
_UNCHARTED = 1e4
#: The sampler drops finished patients from its batch once fewer than this share are going.
_COMPACT = 0.75


class StepFeatures:
    """The running summary of each patient's sequence so far, and the LSTM input made from it.

    Per variable: its last observed value (standardised; one-hot for categorical variables),
    the mean of its observed values (numeric variables),
    whether it was ever observed, the share of steps so far that observed it, whether it was
    observed at the previous step, and the
    (log-scaled) time since its last observation. Per patient: the time since admission (linear
    and log-scaled), the previous gap, the number of steps so far, a first-step flag and, with an
    observation window (``max_time``), ``exp(-time left / gap_scale)``, which is sharp where the
    window's end decides whether a stay goes on (on an hourly grid, hour 47 against hour 46). Both
    training (teacher forcing, all patients at once) and sampling use this one class, so the
    inputs the model sees when generating are built exactly as in training.
    """

    def __init__(
        self,
        n: int,
        n_numeric: int,
        category_sizes: Sequence[int],
        gap_scale: float,
        time_scale: float,
        length_scale: float,
        device: torch.device,
        max_time: float | None = None,
    ) -> None:
        self.n_numeric = n_numeric
        self.max_time = max_time
        self.category_sizes = list(category_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.category_sizes)]).astype(int)
        n_vars = n_numeric + len(self.category_sizes)
        self.gap_scale = gap_scale
        self.time_scale = time_scale
        self.log_time_scale = float(np.log1p(time_scale / gap_scale))
        self.log_length_scale = float(np.log1p(length_scale))
        self.locf_num = torch.zeros((n, n_numeric), device=device)
        self.sum_num = torch.zeros((n, n_numeric), device=device)
        self.locf_cat = torch.zeros((n, int(self.offsets[-1])), device=device)
        self.ever = torch.zeros((n, n_vars), device=device)
        self.count = torch.zeros((n, n_vars), device=device)
        self.last_time = torch.zeros((n, n_vars), device=device)
        self.prev_mask = torch.zeros((n, n_vars), device=device)
        self.time = torch.zeros(n, device=device)
        self.prev_gap = torch.zeros(n, device=device)
        self.step = torch.zeros(n, device=device)

    @staticmethod
    def size(n_numeric: int, category_sizes: Sequence[int]) -> int:
        """Width of the input vector."""
        return 2 * n_numeric + sum(category_sizes) + 4 * (n_numeric + len(category_sizes)) + 6

    def inputs(self) -> torch.Tensor:
        since = self.ever * torch.log1p((self.time[:, None] - self.last_time) / self.gap_scale)
        count_num = self.count[:, : self.n_numeric]
        mean_num = self.sum_num / count_num.clamp(min=1)
        if self.max_time is None:
            window_end = torch.zeros_like(self.time)
        else:
            window_end = torch.exp(-(self.max_time - self.time).clamp(min=0) / self.gap_scale)
        return torch.cat(
            [
                self.locf_num,
                mean_num,
                self.locf_cat,
                self.ever,
                self.count / self.step.clamp(min=1)[:, None],
                self.prev_mask,
                since / self.log_time_scale,
                (self.time / self.time_scale)[:, None],
                (torch.log1p(self.time / self.gap_scale) / self.log_time_scale)[:, None],
                torch.log1p(self.prev_gap / self.gap_scale)[:, None],
                (torch.log1p(self.step) / self.log_length_scale)[:, None],
                (self.step == 0).to(self.time.dtype)[:, None],
                window_end[:, None],
            ],
            dim=1,
        )

    def update(
        self, gap: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, codes: torch.Tensor
    ) -> None:
        """Advance by one step: ``gap [n]``, ``mask [n, V]`` bool (internal order), ``z [n,
        n_numeric]`` standardised values, ``codes [n, n_categorical]``."""
        mask_f = mask.to(self.time.dtype)
        self.time = self.time + gap
        self.prev_gap = gap
        self.step = self.step + 1
        numeric = mask[:, : self.n_numeric]
        self.locf_num = torch.where(numeric, z, self.locf_num)
        self.sum_num = self.sum_num + torch.where(numeric, z, torch.zeros_like(z))
        for j, size in enumerate(self.category_sizes):
            start, stop = self.offsets[j], self.offsets[j + 1]
            hot = F.one_hot(codes[:, j].clamp(min=0), size).to(self.time.dtype)
            observed = mask[:, self.n_numeric + j : self.n_numeric + j + 1]
            self.locf_cat[:, start:stop] = torch.where(observed, hot, self.locf_cat[:, start:stop])
        self.ever = torch.maximum(self.ever, mask_f)
        self.count = self.count + mask_f
        self.last_time = torch.where(mask, self.time[:, None], self.last_time)
        self.prev_mask = mask_f

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the patients ``rows`` (drop finished ones while sampling)."""
        for name in (
            "locf_num",
            "sum_num",
            "locf_cat",
            "ever",
            "count",
            "last_time",
            "prev_mask",
            "time",
            "prev_gap",
            "step",
        ):
            setattr(self, name, getattr(self, name)[rows])


def gap_features(gap: torch.Tensor, gap_scale: float) -> torch.Tensor:
    """``[..., 2]``: the log-scaled gap and a zero-gap flag, what the mask and value heads see."""
    return torch.stack([torch.log1p(gap / gap_scale), (gap <= 0).to(gap.dtype)], dim=-1)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    if hidden <= 0:
        return nn.Sequential(nn.Linear(n_in, n_out))
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class SequenceNetwork(nn.Module):
    """LSTM over step features and the static vector, with stop, gap, mask and value heads.

    ``forward`` returns each patient's negative log-likelihood components under teacher forcing;
    :class:`SequenceSampler` generates from the same weights.
    """

    def __init__(
        self,
        static_size: int,
        n_numeric: int,
        category_sizes: Sequence[int],
        hidden_size: int,
        num_layers: int,
        dropout: float,
        gap_components: int,
        mask_components: int,
        value_components: int,
        head_hidden: int,
        min_scale: float,
        gap_scale: float,
        private: bool = False,
        value_reads_levels: bool = True,
        charted_flags: bool = False,
    ) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.category_sizes = [int(c) for c in category_sizes]
        self.n_variables = n_numeric + len(self.category_sizes)
        self.input_size = StepFeatures.size(n_numeric, self.category_sizes)
        self.static_size = static_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.gap_scale = gap_scale
        self.dropout = dropout
        self.private = private
        # With charted flags the sequence is conditioned on which variables the patient ever has
        # (drawn first, from the static vector), and a variable never charted is never observed.
        self.n_flags = self.n_variables if charted_flags else 0
        conditioning = static_size + self.n_flags
        if private:
            # Opacus needs per-patient gradients; PrivateLSTM gives them in one pass and shares
            # nn.LSTM's parameter names, so the weights load into nn.LSTM for sampling.
            from synthmed.models.private_lstm import PrivateLSTM

            self.lstm: nn.Module = PrivateLSTM(
                self.input_size + conditioning, hidden_size, num_layers, dropout
            )
        else:
            self.lstm = nn.LSTM(
                self.input_size + conditioning,
                hidden_size,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )
        self.init = nn.Linear(conditioning, 2 * num_layers * hidden_size)
        self.gap_head = ZeroInflatedLogNormalMixture(gap_components, gap_scale, min_scale)
        self.mask_head = NonEmptyBernoulliMixture(self.n_variables, mask_components)
        # U of the mask chain: an ordinary layer (so DP-SGD can clip it per patient) whose
        # weight is kept strictly lower-triangular by project() after every optimiser step.
        self.mask_interactions = nn.Linear(self.n_variables, self.n_variables, bias=False)
        nn.init.zeros_(self.mask_interactions.weight)
        self.register_buffer(
            "_strictly_lower",
            torch.tril(torch.ones(self.n_variables, self.n_variables), -1),
            persistent=False,
        )
        if charted_flags:
            self.flag_head = NonEmptyBernoulliMixture(self.n_variables, mask_components)
            self.flag_net = _mlp(static_size, head_hidden, self.flag_head.n_params)
            self.flag_interactions = nn.Linear(self.n_variables, self.n_variables, bias=False)
            nn.init.zeros_(self.flag_interactions.weight)
        self.value_head = ProductMixture(
            n_numeric, self.category_sizes, value_components, min_scale, anchored=True
        )
        self.out = nn.Linear(hidden_size, 1 + self.gap_head.n_params)
        self.mask_net = _mlp(hidden_size + 2, head_hidden, self.mask_head.n_params)
        # Optionally the value head also reads each numeric variable's last and mean observed
        # value directly (LSTMConfig.value_reads_levels).
        self.n_level_inputs = 2 * n_numeric if value_reads_levels else 0
        self.value_net = _mlp(
            hidden_size + 2 + self.n_variables + self.n_level_inputs,
            head_hidden,
            self.value_head.n_params,
        )

    @torch.no_grad()
    def project(self) -> None:
        """Keep the mask interactions strictly lower-triangular (call after each step)."""
        self.mask_interactions.weight.mul_(self._strictly_lower)
        if self.n_flags:
            self.flag_interactions.weight.mul_(self._strictly_lower)

    def conditioning(self, static: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
        """What the LSTM is conditioned on: the static vector and, with charted flags, the
        flags ``[B, V]`` (0/1)."""
        return static if flags is None else torch.cat([static, flags], dim=1)

    def flag_log_prob(self, static: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """``[B]`` log-probability of the charted flags given the static vector."""
        raw = self.flag_net(static)
        return self.flag_head.log_prob(raw, flags, self.flag_interactions(flags))

    def mask_raw(self, raw: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
        """The mask head's parameters ``[B, (T,) P]`` with every variable whose flag is off
        switched off for good (its logit lowered by ``_UNCHARTED``)."""
        if flags is None:
            return raw
        k = self.mask_head.n_components
        penalty = (flags - 1.0) * _UNCHARTED
        penalty = penalty.reshape(len(flags), *([1] * (raw.dim() - 1)), self.n_variables)
        base = raw[..., k:].unflatten(-1, (k, self.n_variables)) + penalty
        return torch.cat([raw[..., :k], base.flatten(-2)], dim=-1)

    def initial_state(
        self, static: torch.Tensor, batch_first: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h0, c0)``, each ``[num_layers, B, H]`` as ``nn.LSTM`` takes them, or ``[B,
        num_layers, H]`` with ``batch_first`` (as :class:`PrivateLSTM` takes them)."""
        state = torch.tanh(self.init(static))
        state = state.reshape(len(static), 2, self.num_layers, self.hidden_size)
        if batch_first:
            return state[:, 0], state[:, 1]
        return (
            state[:, 0].transpose(0, 1).contiguous(),
            state[:, 1].transpose(0, 1).contiguous(),
        )

    def forward(
        self,
        static: torch.Tensor,
        inputs: torch.Tensor,
        lengths: torch.Tensor,
        ended: torch.Tensor,
        remaining: torch.Tensor,
        gaps: torch.Tensor,
        gap_targets: torch.Tensor,
        mask: torch.Tensor,
        z: torch.Tensor,
        codes: torch.Tensor,
        flags: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-patient negative log-likelihood ``[B, 4]``: end, gap, mask and value terms
        (the mask term includes the charted flags' term).

        A sequence ends either by the stop head or because its next step would fall after the
        end of the observation window (``max_time``): after the last step the likelihood is
        ``p(stop) + (1 - p(stop)) P(gap > remaining)``, the next gap being right-censored. This
        is exactly how sampling ends sequences, and it lets a fixed window (PhysioNet's 48 h)
        explain most ends instead of a per-step hazard.

        Args:
            static: ``[B, S]`` encoded static attributes.
            inputs: ``[B, T + 1, I]`` step features (position t summarises steps ``< t``).
            lengths: ``[B]`` steps per patient (``<= T``).
            ended: ``[B]`` bool; False for sequences cut at ``max_length``, whose end is unknown.
            remaining: ``[B]`` time from the last step to the end of the window (``inf``
                without a window).
            gaps: ``[B, T]`` time gaps as observed (they condition the mask and value heads).
            gap_targets: ``[B, T]`` the gaps to score (dequantised when times lie on a grid).
            mask: ``[B, T, V]`` bool, internal variable order.
            z: ``[B, T, n_numeric]`` standardised values (finite everywhere).
            codes: ``[B, T, n_categorical]`` category codes (>= 0 everywhere).
            flags: ``[B, V]`` 0/1, whether each variable is observed at some step (required
                with charted flags, ignored without).
            generator: draws the dropout masks in training.
        """
        batch, steps = gaps.shape
        flags = flags if self.n_flags else None
        condition = self.conditioning(static, flags)
        x = torch.cat([inputs, condition[:, None, :].expand(-1, steps + 1, -1)], dim=2)
        if self.private:
            out = self.lstm(x, *self.initial_state(condition, batch_first=True))
        else:
            out, _ = self.lstm(x, self.initial_state(condition))
        if self.training and self.dropout > 0:
            # A uniform draw compared with the rate: half the time of F.dropout's Bernoulli
            # draws on CPU, and from the fit's own generator.
            u = torch.rand(out.shape, generator=generator, device=out.device, dtype=out.dtype)
            out = out * (u >= self.dropout) / (1.0 - self.dropout)
        head = self.out(out)
        stop_logit, gap_raw = head[..., 0], head[:, :steps, 1:]
        position = torch.arange(steps + 1, device=gaps.device)[None, :]
        inside = (position < lengths[:, None]).to(out.dtype)
        stop_nll = -(inside * F.logsigmoid(-stop_logit)).sum(1)
        end_raw = head[torch.arange(batch, device=gaps.device), lengths]
        finite = torch.isfinite(remaining)
        log_censored = F.logsigmoid(-end_raw[:, 0]) + self.gap_head.log_survival(
            end_raw[:, 1:], torch.where(finite, remaining, torch.zeros_like(remaining))
        )
        log_censored = torch.where(finite, log_censored, torch.full_like(remaining, -math.inf))
        log_end = torch.logaddexp(F.logsigmoid(end_raw[:, 0]), log_censored)
        stop_nll = stop_nll - torch.where(ended, log_end, torch.zeros_like(log_end))
        inside = inside[:, :steps]
        gap_nll = -self.gap_head.log_prob(gap_raw, gap_targets) * inside
        hidden = torch.cat([out[:, :steps], gap_features(gaps, self.gap_scale)], dim=2)
        mask_f = mask.to(out.dtype)
        mask_raw = self.mask_raw(self.mask_net(hidden), flags)
        mask_nll = (
            -self.mask_head.log_prob(mask_raw, mask_f, self.mask_interactions(mask_f)) * inside
        ).sum(1)
        if flags is not None:
            # A patient without steps has no flag on, which the non-empty head cannot score.
            charted = -self.flag_log_prob(static, flags)
            mask_nll = mask_nll + torch.where(lengths > 0, charted, torch.zeros_like(charted))
        levels = inputs[:, :steps, : self.n_level_inputs]
        value_raw = self.value_net(torch.cat([hidden, mask_f, levels], dim=2))
        # Numeric means are anchored on the last observed value (its z, 0 if never observed):
        # vital signs mostly move little between steps (see ProductMixture).
        anchor = inputs[:, :steps, : self.n_numeric]
        value_nll = (
            -self.value_head.log_prob(
                value_raw,
                z,
                codes,
                mask[..., : self.n_numeric],
                mask[..., self.n_numeric :],
                anchor,
            )
            * inside
        )
        return torch.stack([stop_nll, gap_nll.sum(1), mask_nll, value_nll.sum(1)], dim=1)


class ValueCodec:
    """Standardised ↔ recorded values of the numeric variables, in torch, on the model's device.

    Mirrors :class:`~synthmed.models.transforms.ValueScaler` (log1p for skewed variables, then
    centre and scale) from its fitted parameters, and puts generated values where recorded
    values lie: inside the schema's bounds, on the frequent values seen in training where a
    variable has them (e.g. heights converted from whole inches), else rounded to the
    variable's resolution (whole numbers for ``integer`` columns).

    Args:
        support: Per variable, the sorted frequent values to snap to (None for none). A value
            is snapped only to a support value at most ``value_grid.REACH`` median spacings of
            the support away, so the tails and the gaps in the support stay continuous.
        support_share: Per variable, the share of training values that lay on the support.
        support_weights: Per variable, how often each support value was seen (None: equally):
            each value's snapping cell is widened in proportion (see
            :func:`~synthmed.models.value_grid.cell_boundaries`).
    """

    def __init__(
        self,
        log: Sequence[bool],
        center: Sequence[float],
        scale: Sequence[float],
        lower: Sequence[float],
        upper: Sequence[float],
        resolution: Sequence[float],
        support: Sequence[Sequence[float] | None],
        device: torch.device,
        support_share: Sequence[float] | None = None,
        support_weights: Sequence[Sequence[float] | None] | None = None,
    ) -> None:
        def tensor(values, dtype=torch.float32):
            return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

        self.log = tensor(log, torch.bool)
        self.center = tensor(center)
        self.scale = tensor(scale)
        self.lower = tensor(lower)
        self.upper = tensor(upper)
        self.resolution = tensor(resolution)
        self.on_grid = self.resolution > 0
        self.safe_resolution = torch.where(self.on_grid, self.resolution, 1.0)
        # Snapping looks values up in a table over a grid spanning the support (the variable's
        # resolution, or a fine grid without one): far cheaper per step than a search.
        n_vars = len(support)
        low, high, reach = np.zeros(n_vars), np.zeros(n_vars), np.zeros(n_vars)
        spacing = np.ones(n_vars)
        tables = []
        for j, values in enumerate(support):
            if not values:
                tables.append(None)
                continue
            table = np.asarray(values, dtype=np.float64)
            margin = float(np.median(np.diff(table))) if len(table) > 1 else 0.0
            reach[j] = REACH * margin
            low[j], high[j] = table[0] - reach[j], table[-1] + reach[j]
            step = float(resolution[j])
            if step <= 0 or (high[j] - low[j]) / step > _LOOKUP_SIZE:
                step = max((high[j] - low[j]) / _LOOKUP_SIZE, 1e-9)
            spacing[j] = step
            grid = low[j] + step * np.arange(int(np.ceil((high[j] - low[j]) / step)) + 1)
            weights = support_weights[j] if support_weights is not None else None
            tables.append(table[np.searchsorted(cell_boundaries(table, weights), grid)])
        width = max([len(t) for t in tables if t is not None] + [1])
        lookup = np.zeros((n_vars, width))
        for j, table in enumerate(tables):
            if table is not None:
                lookup[j, : len(table)] = table
                lookup[j, len(table) :] = table[-1]
        self.snaps = any(t is not None for t in tables)
        self.snapped = tensor([t is not None for t in tables], torch.bool)
        self.snap_share = tensor(support_share if support_share is not None else [1.0] * n_vars)
        self.lookup = tensor(lookup)
        self.lookup_low = tensor(low)
        self.reach = tensor(reach)
        self.lookup_step = tensor(spacing)
        self.lookup_width = width

    def to_z(self, values: torch.Tensor) -> torch.Tensor:
        logged = torch.where(self.log, torch.log1p(values.clamp(min=0)), values)
        return (logged - self.center) / self.scale

    def from_z(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Recorded values for standardised ``z`` ``[..., V]``. With a ``generator``, each value
        is snapped to the support with the probability that a training value lay on it (the
        rest stay on the resolution grid); without one, every value in range is snapped."""
        x = z * self.scale + self.center
        x = torch.where(self.log, torch.expm1(x.clamp(max=50.0)), x)
        x = torch.maximum(torch.minimum(x, self.upper), self.lower)
        rounded = torch.round(x / self.safe_resolution) * self.safe_resolution
        x = torch.where(self.on_grid, rounded, x)
        if self.snaps:
            x = self._snap(x, generator)
        return torch.maximum(torch.minimum(x, self.upper), self.lower)

    def _snap(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        index = torch.round((x - self.lookup_low) / self.lookup_step)
        index = index.clamp(0, self.lookup_width - 1).to(torch.int64)
        flat = index.reshape(-1, x.shape[-1]).t()  # [V, n]
        nearest = self.lookup.gather(1, flat).t().reshape(x.shape)
        inside = self.snapped & ((nearest - x).abs() <= self.reach)
        if generator is not None:
            u = torch.rand(x.shape, generator=generator, device=x.device)
            inside &= u < self.snap_share
        return torch.where(inside, nearest, x)


class SequenceSampler:
    """Generates sequences for a batch of patients at once, one step at a time.

    The LSTM recurrence is unrolled by hand from the trained weights (the static vector's share
    of the input projection is computed once per patient, not at every step), the hidden state is
    carried forward, and patients that stop are dropped from the batch so the work per step
    shrinks with the number of patients still going.
    """

    def __init__(
        self,
        network: SequenceNetwork,
        codec: ValueCodec,
        feature_args: dict,
        time_quantum: float,
        min_positive_gap: float,
        value_temperature: torch.Tensor | None = None,
    ) -> None:
        self.net = network
        # Scales each numeric variable's step noise (``variability.match_temperature``).
        self.value_temperature = value_temperature
        self.codec = codec
        self.feature_args = feature_args
        self.time_quantum = time_quantum
        self.min_positive_gap = min_positive_gap
        weights = {k: v.detach() for k, v in network.lstm.state_dict().items()}
        n_in = network.input_size
        self.layers = []
        for layer in range(network.num_layers):
            w_ih = weights[f"weight_ih_l{layer}"]
            bias = weights[f"bias_ih_l{layer}"] + weights[f"bias_hh_l{layer}"]
            w_hh_t = weights[f"weight_hh_l{layer}"].t().contiguous()
            if layer == 0:
                w_in_t = w_ih[:, :n_in].t().contiguous()
                w_static_t = w_ih[:, n_in:].t().contiguous()
            else:
                w_in_t, w_static_t = w_ih.t().contiguous(), None
            # tanh(x) = 2 sigmoid(2x) - 1, and sigmoid is much cheaper than tanh on CPU: doubling
            # the cell-input gate's weights lets one sigmoid cover all four gates.
            cell = slice(2 * network.hidden_size, 3 * network.hidden_size)
            bias = bias.clone()
            bias[cell] *= 2
            for matrix in (w_in_t, w_hh_t, w_static_t):
                if matrix is not None:
                    matrix[:, cell] *= 2
            self.layers.append((w_in_t, w_hh_t, w_static_t, bias))
        # One matmul of the LSTM output feeds the stop/gap head and the first layers of the mask
        # and value heads; their gap and mask inputs are added separately.
        hidden = network.hidden_size
        out = network.out
        mask_first, value_first = network.mask_net[0], network.value_net[0]
        self.n_out = out.out_features
        self.mask_deep = len(network.mask_net) > 1
        self.value_deep = len(network.value_net) > 1
        self.n_mask = mask_first.out_features
        fused_w = torch.cat(
            [out.weight, mask_first.weight[:, :hidden], value_first.weight[:, :hidden]], dim=0
        )
        fused_b = torch.cat([out.bias, mask_first.bias, value_first.bias])
        self.fused_w_t = fused_w.detach().t().contiguous()
        self.fused_b = fused_b.detach()
        self.mask_gap_t = mask_first.weight[:, hidden : hidden + 2].detach().t().contiguous()
        self.value_gap_t = value_first.weight[:, hidden : hidden + 2].detach().t().contiguous()
        levels_start = hidden + 2 + network.n_variables
        self.value_mask_t = (
            value_first.weight[:, hidden + 2 : levels_start].detach().t().contiguous()
        )
        self.value_levels_t = value_first.weight[:, levels_start:].detach().t().contiguous()
        self.mask_interactions = network.mask_interactions.weight.detach() * network._strictly_lower
        self.flag_interactions = (
            network.flag_interactions.weight.detach() * network._strictly_lower
            if network.n_flags
            else None
        )

    @staticmethod
    def _lstm_cell(
        x: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        w_in_t: torch.Tensor,
        w_hh_t: torch.Tensor,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step with the cell-input gate's weights doubled (see ``__init__``)."""
        gates = torch.addmm(bias, x, w_in_t).addmm_(h, w_hh_t).sigmoid_()
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.addcmul(f * c, i, g.mul(2).sub_(1))
        return o * torch.sigmoid(2 * c).mul_(2).sub_(1), c

    def _head(self, net: nn.Sequential, pre: torch.Tensor, deep: bool) -> torch.Tensor:
        if not deep:
            return pre
        return net[2](torch.relu(pre))

    @torch.inference_mode()
    def sample(
        self,
        static: torch.Tensor,
        generator: torch.Generator,
        max_length: int,
        max_time: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate one sequence per row of ``static`` (``[n, S]`` encoded).

        Returns:
            ``(times [n, T], values [n, T, n_numeric], codes [n, T, n_cat], mask [n, T, V],
            lengths [n])`` on the model's device, T = the longest generated sequence; numeric
            values are in recorded units (bounded and rounded), entries past a patient's length
            are zero.
        """
        net, codec = self.net, self.codec
        n, device = static.shape[0], static.device
        n_numeric, n_vars = net.n_numeric, net.n_variables
        n_cat = len(net.category_sizes)
        # Step-major outputs: each step writes one contiguous block.
        out_times = torch.zeros((max_length, n), device=device)
        out_values = torch.zeros((max_length, n, n_numeric), device=device)
        out_codes = torch.zeros((max_length, n, n_cat), dtype=torch.int64, device=device)
        out_mask = torch.zeros((max_length, n, n_vars), dtype=torch.bool, device=device)
        lengths = torch.full((n,), max_length, dtype=torch.int64, device=device)

        flags = None
        if net.n_flags:
            flags = net.flag_head.sample(
                net.flag_net(static), generator, self.flag_interactions
            ).to(static.dtype)
        condition = net.conditioning(static, flags)
        h0, c0 = net.initial_state(condition)
        hs, cs = list(h0.unbind(0)), list(c0.unbind(0))
        w0_in, w0_hh, w0_static, b0 = self.layers[0]
        static_bias = torch.addmm(b0, condition, w0_static)
        features = StepFeatures(
            n, n_numeric, net.category_sizes, device=device, **self.feature_args
        )
        rows = torch.arange(n, device=device)
        alive = torch.ones(n, dtype=torch.bool, device=device)
        quantum = self.time_quantum
        for step in range(max_length + 1):
            x = features.inputs()
            levels = x[:, : net.n_level_inputs]
            hs[0], cs[0] = self._lstm_cell(x, hs[0], cs[0], w0_in, w0_hh, static_bias)
            for layer in range(1, net.num_layers):
                w_in, w_hh, _, bias = self.layers[layer]
                hs[layer], cs[layer] = self._lstm_cell(
                    hs[layer - 1], hs[layer], cs[layer], w_in, w_hh, bias
                )
            fused = torch.addmm(self.fused_b, hs[-1], self.fused_w_t)
            head = fused[:, : self.n_out]
            u = torch.rand(len(rows), generator=generator, device=device)
            stop = u < torch.sigmoid(head[:, 0])
            gap = net.gap_head.sample(head[:, 1:], generator)
            # The window is checked on the continuous gap, as training scores it (a gap on a
            # grid stands for the interval around it).
            if max_time is not None:
                stop |= features.time + gap > max_time
            if quantum > 0:
                positive = gap > 0
                gap = torch.round(gap / quantum) * quantum
                gap = torch.where(positive, gap.clamp(min=self.min_positive_gap), gap)
                if max_time is not None:
                    gap = torch.minimum(gap, (max_time - features.time).clamp(min=0))
            stop = alive.clone() if step == max_length else stop & alive
            if stop.any():
                lengths[rows[stop]] = step
                alive &= ~stop
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                # Finished patients ride along (their outputs lie past their length) until
                # dropping them is worth the copies.
                if n_alive < _COMPACT * len(rows):
                    keep = alive.nonzero().squeeze(1)
                    rows, fused, gap, levels = rows[keep], fused[keep], gap[keep], levels[keep]
                    static_bias, alive = static_bias[keep], alive[keep]
                    flags = flags[keep] if flags is not None else None
                    hs = [h[keep] for h in hs]
                    cs = [c[keep] for c in cs]
                    features.select(keep)
            g_feat = gap_features(gap, net.gap_scale)
            start = self.n_out
            mask_pre = fused[:, start : start + self.n_mask] + g_feat @ self.mask_gap_t
            mask = net.mask_head.sample(
                net.mask_raw(self._head(net.mask_net, mask_pre, self.mask_deep), flags),
                generator,
                self.mask_interactions,
            )
            start += self.n_mask
            mask_f = mask.to(fused.dtype)
            value_pre = (
                fused[:, start:]
                + g_feat @ self.value_gap_t
                + mask_f @ self.value_mask_t
                + levels @ self.value_levels_t
            )
            z, codes = net.value_head.sample(
                self._head(net.value_net, value_pre, self.value_deep),
                generator,
                features.locf_num,
                self.value_temperature,
            )
            values = codec.from_z(z, generator)
            z = codec.to_z(values)
            features.update(gap, mask, z, codes)
            out_times[step].index_copy_(0, rows, features.time)
            out_values[step].index_copy_(0, rows, values)
            out_codes[step].index_copy_(0, rows, codes)
            out_mask[step].index_copy_(0, rows, mask)
        longest = int(lengths.max()) if n else 0
        return (
            out_times[:longest].t(),
            out_values[:longest].transpose(0, 1),
            out_codes[:longest].transpose(0, 1),
            out_mask[:longest].transpose(0, 1),
            lengths,
        )
