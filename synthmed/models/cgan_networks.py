"""Networks of the conditional recurrent GAN (:class:`~synthmed.CGANSynthesizer`).

Layout of an encoded patient, shared by the generator's output and the critic's input:

- ``static`` ``[B, Ds]``: the :class:`~synthmed.models.transforms.StaticEncoder` vector
  (standardised numbers, missing indicators, one-hot categories).
- ``steps`` ``[B, T, F]``: per step ``[log-gap, time, alive, mask (V), values (C)]`` where
  ``log-gap = log1p(gap / gap_scale)``, ``time`` is the absolute time over the longest training
  time, ``alive`` is 1 inside the sequence, ``mask`` says which variables are observed and
  ``values`` holds one column per numeric variable (standardised by ``ValueScaler``) and one-hot
  columns per categorical variable, zero where unobserved. Everything is zero after the end.
  On a time grid's slots (``slots``) step ``k`` is the slot at time ``k * gap_scale``, ``alive``
  says whether it holds observations, and the log-gap is 0.

The generator is a static MLP (:class:`StaticGenerator`) followed by stacked LSTM cells
(:class:`SequenceGenerator`) that emit ``steps_per_cell`` steps per LSTM step (DoppelGANger's
batch generation), with the elapsed time and last values fed back (:class:`Carry`) and
per-patient latents (:class:`PatientScale`). Binary and categorical outputs (masks, ends,
categories, missing indicators) are straight-through Gumbel samples, so the forward pass is
exactly discrete while gradients flow through the relaxation. The critics (:class:`Critic`) use
only ``Linear`` layers and parameter-free operations, so Opacus can compute per-patient gradients
for them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

#: Sharpness of the soft bounds; the distortion at a bound is log(2) / BOUND_SHARPNESS std.
BOUND_SHARPNESS = 4.0
#: Columns of a step before the mask: log-gap, time, alive.
STEP_PREFIX = 3
#: Softness (over the longest time) of the straight-through cut at the end of the window.
WINDOW_SOFTNESS = 0.02
#: Buckets of the time since a variable was last observed (in units of ``gap_scale``; the
#: last bucket holds everything longer) that shift its observation logit, plus one for "not
#: yet observed" (see :class:`SequenceGenerator`).
SINCE_BUCKETS = 12
#: Starting coupling of the observation masks' noise (see ``SequenceGenerator``).
INITIAL_MASK_COUPLING = 0.9


@dataclasses.dataclass(frozen=True)
class Head:
    """One output group: a bounded number, a binary flag or a one-hot category block.

    ``kind`` is ``"numeric"`` (``lower``/``upper`` are soft bounds in the encoded space, None for
    unbounded), ``"binary"`` (one 0/1 column) or ``"categorical"`` (``width`` one-hot columns).
    """

    kind: str
    start: int
    width: int = 1
    lower: float | None = None
    upper: float | None = None


def logistic_noise(
    shape: torch.Size, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return _logistic_quantile(torch.rand(shape, generator=generator, device=device))


def _logistic_quantile(uniform: torch.Tensor) -> torch.Tensor:
    """``log(u / (1 - u))``, with ``u`` kept 1e-6 away from 0 and 1."""
    uniform = uniform.clamp(1e-6, 1 - 1e-6)
    return torch.log(uniform) - torch.log1p(-uniform)


def st_bernoulli(
    logits: torch.Tensor, generator: torch.Generator, temperature: float
) -> torch.Tensor:
    """A hard 0/1 sample of ``Bernoulli(sigmoid(logits))`` with a straight-through gradient."""
    return st_threshold(
        logits + logistic_noise(logits.shape, generator, logits.device), temperature
    )


def coupled_logistic_noise(
    shape: torch.Size, coupling: torch.Tensor, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Logistic noise whose last axis shares one Gaussian factor: entry ``v`` is the logistic
    quantile of ``Phi(coupling[v] * z + sqrt(1 - coupling[v]**2) * z_v)``, so two entries with
    couplings near 1 fall on the same side of similar thresholds (a Gaussian copula; 0 gives
    :func:`logistic_noise`). Differentiable in ``coupling``."""
    shared = torch.randn((*shape[:-1], 1), generator=generator, device=device)
    own = torch.randn(shape, generator=generator, device=device)
    gaussian = coupling * shared + torch.sqrt((1 - coupling**2).clamp_min(1e-6)) * own
    return _logistic_quantile(torch.special.ndtr(gaussian))


def st_threshold(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits > 0`` as 0/1 with a straight-through sigmoid gradient: no noise of its own, so
    flags computed from shared latents keep their dependence (e.g. an arterial line gives MAP,
    SysABP and DiasABP together)."""
    hard = (logits > 0).to(logits.dtype)
    if not logits.requires_grad:
        return hard
    soft = torch.sigmoid(logits / temperature)
    return hard + soft - soft.detach()


def st_categorical(
    logits: torch.Tensor, generator: torch.Generator, temperature: float
) -> torch.Tensor:
    """A hard one-hot Gumbel-softmax sample along the last axis, straight-through."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    noisy = logits - torch.log(-torch.log(uniform.clamp(1e-6, 1 - 1e-6)))
    hard = F.one_hot(noisy.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if not logits.requires_grad:
        return hard
    soft = torch.softmax(noisy / temperature, dim=-1)
    return hard + soft - soft.detach()


class Activation(nn.Module):
    """Applies each head's output activation to its slice of the last axis, vectorised by kind.

    Numeric heads get their soft bounds, binary heads a straight-through Bernoulli sample and each
    categorical block a straight-through one-hot sample. Output columns keep the heads' order.
    """

    def __init__(self, heads: list[Head]) -> None:
        super().__init__()
        self.heads = heads
        numeric = [h for h in heads if h.kind == "numeric"]
        self.categorical = [h for h in heads if h.kind == "categorical"]
        self.register_buffer(
            "numeric", torch.tensor([h.start for h in numeric], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "binary",
            torch.tensor([h.start for h in heads if h.kind == "binary"], dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "lower", torch.tensor([h.lower or 0.0 for h in numeric]), persistent=False
        )
        self.register_buffer(
            "upper", torch.tensor([h.upper or 0.0 for h in numeric]), persistent=False
        )
        self.register_buffer(
            "has_lower", torch.tensor([h.lower is not None for h in numeric]), persistent=False
        )
        self.register_buffer(
            "has_upper", torch.tensor([h.upper is not None for h in numeric]), persistent=False
        )
        self.width = sum(h.width for h in heads)

    def forward(
        self, raw: torch.Tensor, generator: torch.Generator, temperature: float
    ) -> torch.Tensor:
        out = torch.empty_like(raw)
        if len(self.numeric):
            x = raw[..., self.numeric]
            x = torch.where(self.has_lower, self.lower + _softplus(x - self.lower), x)
            x = torch.where(self.has_upper, self.upper - _softplus(self.upper - x), x)
            out[..., self.numeric] = x
        if len(self.binary):
            out[..., self.binary] = st_bernoulli(raw[..., self.binary], generator, temperature)
        for head in self.categorical:
            block = slice(head.start, head.start + head.width)
            out[..., block] = st_categorical(raw[..., block], generator, temperature)
        return out


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x, beta=BOUND_SHARPNESS)


def mlp(sizes: list[int], slope: float = 0.2) -> nn.Sequential:
    """Linear layers with LeakyReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class StaticGenerator(nn.Module):
    """Static vectors from noise, conditioned on any subset of given columns.

    ``condition`` is the encoded vector of the given values (anything where not given),
    ``given_dims`` marks its given dimensions and ``given_columns`` the given columns. Given
    dimensions are copied to the output exactly; the network sees them so the rest is drawn
    from the conditional distribution (CTGAN-style training with random condition masks).

    ``pairs`` lists ``(value dim, missing dim)`` of numeric columns with a missing indicator: the
    value is zeroed where the indicator says missing, as ``StaticEncoder`` encodes it.
    """

    def __init__(
        self,
        width: int,
        n_columns: int,
        heads: list[Head],
        pairs: list[tuple[int, int]],
        noise_dim: int,
        hidden: int,
        layers: int,
    ) -> None:
        super().__init__()
        self.width, self.n_columns, self.noise_dim = width, n_columns, noise_dim
        self.net = mlp([noise_dim + width + n_columns, *[hidden] * layers, width])
        self.activation = Activation(heads)
        value, missing = ([p[i] for p in pairs] for i in (0, 1))
        self.register_buffer("value_dims", torch.tensor(value, dtype=torch.long), persistent=False)
        self.register_buffer(
            "missing_dims", torch.tensor(missing, dtype=torch.long), persistent=False
        )

    def forward(
        self,
        condition: torch.Tensor,
        given_dims: torch.Tensor,
        given_columns: torch.Tensor,
        generator: torch.Generator,
        temperature: float,
    ) -> torch.Tensor:
        n = condition.shape[0]
        noise = torch.randn(n, self.noise_dim, generator=generator, device=condition.device)
        condition = condition * given_dims
        raw = self.net(torch.cat([noise, condition, given_columns], dim=1))
        out = self.activation(raw, generator, temperature)
        if len(self.value_dims):
            present = 1 - out[:, self.missing_dims]
            out = out.index_copy(1, self.value_dims, out[:, self.value_dims] * present)
        return given_dims * condition + (1 - given_dims) * out


@dataclasses.dataclass
class PatientScale:
    """Per-patient latents drawn once: each numeric variable's centre, half-range and
    persistence, and the end of the observation window (over ``time_max``).

    Each step's target is ``centre + half_range * tanh(output)`` (DoppelGANger's per-sample
    auto-normalisation, so within-patient variation is learned apart from between-patient
    variation); values follow the targets through an exponential moving average with a
    per-patient persistence ``a`` per step, a latent trajectory that observations sample, so
    consecutive observations are as close as in real records. Within one LSTM step of ``S``
    steps the average is ``level_t = carried_t * level_in + sum_k smoothing_tk * target_k``
    (``carried_t = a^(t+1)``, ``smoothing_tk = (1 - a) a^(t-k)`` for ``k <= t``), precomputed
    once per patient. Steps after ``window`` are cut, which lets stays end where the
    observation window ends. ``pace`` shifts the patient's gap outputs and ``propensity`` each
    variable's observation logits: how often a patient is charted, and which variables are
    (an arterial line or not), vary between patients more than within one. ``charted`` is a
    0/1 flag per variable (a straight-through threshold on the patient latents, so flags that
    go together, like an arterial line's MAP, SysABP and DiasABP, stay together): a variable
    not charted for a patient is never observed. Continuous propensities alone cannot make "all
    or nothing": in PhysioNet 2012, 28 % of patients have RespRate, at 90 % of their steps;
    without the flag the generator gave it to 34 % of patients at 58 % of their steps. With
    observation schedules, ``rhythm`` (positive, per variable) scales the schedule's shifts:
    one patient's temperature is taken every four hours, another's every hour.
    """

    centre: torch.Tensor
    half_range: torch.Tensor
    smoothing: torch.Tensor
    carried: torch.Tensor
    window: torch.Tensor
    pace: torch.Tensor
    propensity: torch.Tensor
    charted: torch.Tensor
    rhythm: torch.Tensor | None = None


@dataclasses.dataclass
class Carry:
    """What the sequence generator carries from one LSTM step to the next.

    ``state`` is the LSTM state; ``alive``, ``time`` (absolute, over ``time_max``; on slots,
    the next slot's), ``last`` (the last observed value of each value column, 0 before any) and
    ``seen`` (whether each variable was observed yet) are fed back as inputs, as is ``since``
    when observation schedules are on (the time since each variable was last observed, inf
    before), so the generator knows how long the stay has lasted and where each variable
    stands. ``patient`` holds the per-patient latents and ``level`` the latent trajectory's
    current value.
    """

    state: tuple[torch.Tensor, torch.Tensor]
    alive: torch.Tensor
    time: torch.Tensor
    last: torch.Tensor
    seen: torch.Tensor
    patient: PatientScale
    level: torch.Tensor
    since: torch.Tensor | None = None

    def features(self) -> torch.Tensor:
        parts = [self.alive[:, None], self.time[:, None], self.last, self.seen]
        if self.since is not None:
            parts.append(torch.exp(-self.since / SINCE_BUCKETS))
        return torch.cat(parts, dim=1)


class SequenceGenerator(nn.Module):
    """An LSTM that emits ``steps_per_cell`` steps per LSTM step, conditioned on the static vector.

    Each step: a gap (in ``log1p(gap / gap_scale)`` space, soft-bounded to ``[0, max_log_gap]``),
    an end flag (the sequence stops *before* a step whose flag is 1, so empty sequences are
    possible), the observation mask and the values. With ``slots`` the steps are the slots of a
    time grid instead, ``gap_scale`` apart from time 0: the gap output is unused, the flag says
    whether the slot holds observations, and no window cuts the sequence. The inputs of each
    LSTM step are the static vector, a per-patient noise vector, fresh noise, the step's
    relative position and the fed-back :class:`Carry` (elapsed time, last values); the initial
    state is a function of the static vector and the patient noise. The state is carried
    forward, never recomputed.

    With ``schedules`` each variable's observation logit is shifted by a learned function of the
    time since it was last observed (``since_logits``, one value per bucket of
    :data:`SINCE_BUCKETS`), scaled by a per-patient ``rhythm``, and masks are drawn step by
    step: charting follows schedules. Independent draws per step gave PhysioNet 2012's
    temperatures gaps of one hour 55 % of the time against 45 % (27 % are four hours apart:
    every four hours) and glucose 16 % against 1 %. The CGAN turns schedules on for slots
    without DP only. On PhysioNet's raw times they left the discriminative score where it was
    (0.469 and 0.458 for two seeds, against 0.469 and 0.468) and raised the mean KSComplement
    (0.956 and 0.952, against 0.941 and 0.926), already above its target; turning them on would
    change the layout of every saved raw-time model. Under DP the fed-back time since the last
    observation lowered TSTR at epsilon 10 from 0.746 to 0.721.

    With ``coupled_masks`` a step's observation draws share one Gaussian factor, each variable
    with a learned coupling (:func:`coupled_logistic_noise`, started at
    :data:`INITIAL_MASK_COUPLING`): variables charted together, such as an arterial line's
    SysABP and DiasABP, tend to be observed at the same steps. Drawn independently on
    PhysioNet 2012's hourly slots, SysABP and DiasABP came at different slots 6 % of the time
    (real: under 0.1 %) and their counts per stay were equal for 31 % of patients (real: 99.5 %);
    the eight variables' observation rates alone told generated stays from real ones at 0.81
    accuracy, all features at 0.83. Coupled: 43-46 % equal counts, discriminative score
    0.331-0.334 for three seeds against 0.348-0.364. The CGAN couples masks on slots without
    DP only. On raw times a step exists only where something is observed, and a shared
    factor leaves more steps empty: the stays came out 7 % short, HR's observation rate 0.048
    low, and the score stayed where it was (0.471 against 0.469).
    """

    def __init__(
        self,
        static_width: int,
        n_variables: int,
        value_heads: list[Head],
        n_steps: int,
        steps_per_cell: int,
        noise_dim: int,
        hidden: int,
        layers: int,
        max_log_gap: float,
        slots: bool = False,
        schedules: bool = False,
        coupled_masks: bool = False,
    ) -> None:
        super().__init__()
        self.n_variables, self.n_steps, self.slots = n_variables, n_steps, slots
        self.steps_per_cell, self.noise_dim = steps_per_cell, noise_dim
        self.hidden, self.layers = hidden, layers
        self.n_cells = -(-n_steps // steps_per_cell)
        heads = [
            Head("numeric", 0, 1, 0.0, max_log_gap),
            Head("binary", 1),
            *[Head("binary", 2 + j) for j in range(n_variables)],
            *[dataclasses.replace(h, start=h.start + 2 + n_variables) for h in value_heads],
        ]
        self.schedules, self.coupled_masks = schedules, coupled_masks
        if schedules or coupled_masks:  # the mask columns are drawn in _steps or _masks
            heads_drawn = [h for h in heads if not 2 <= h.start < 2 + n_variables]
        else:
            heads_drawn = heads
        if schedules:
            self.since_logits = nn.Parameter(torch.zeros(n_variables, SINCE_BUCKETS + 1))
            self.register_buffer("variable_index", torch.arange(n_variables), persistent=False)
        if coupled_masks:
            start = math.log(INITIAL_MASK_COUPLING / (1 - INITIAL_MASK_COUPLING))
            self.mask_coupling = nn.Parameter(torch.full((n_variables,), start))
        self.activation = Activation(heads_drawn)
        self.step_outputs = sum(h.width for h in heads)
        self.value_width = sum(h.width for h in value_heads)
        widths = torch.tensor([h.width for h in value_heads], dtype=torch.long)
        self.register_buffer(
            "value_variable",
            torch.repeat_interleave(torch.arange(n_variables), widths),
            persistent=False,
        )
        feedback = 2 + self.value_width + (2 if schedules else 1) * n_variables
        self.register_buffer(
            "numeric_value",
            torch.tensor([h.kind == "numeric" for h in value_heads for _ in range(h.width)]),
            persistent=False,
        )
        self.initial = nn.Linear(static_width + noise_dim, 2 * layers * hidden)
        per_variable = 3 if schedules else 2  # propensity, charted, and the schedule's rhythm
        self.scale = nn.Linear(
            static_width + noise_dim, 3 * self.value_width + 2 + per_variable * n_variables
        )
        lags = torch.arange(steps_per_cell)
        self.register_buffer("lags", (lags[:, None] - lags[None, :]).float(), persistent=False)
        with torch.no_grad():
            self.scale.weight.mul_(0.1)
            self.scale.bias.zero_()
            self.scale.bias[self.value_width : 2 * self.value_width] = 1.0  # half-range ~1.3 std
            self.scale.bias[3 * self.value_width] = 4.0  # window ~ 98% of the longest time
            charted = self._charted_columns
            self.scale.bias[charted] = 3.0  # all charted at first
            self.scale.bias[charted.stop :] = math.log(math.e - 1)  # rhythm 1
        inputs = static_width + 2 * noise_dim + 1 + feedback
        self.lstm = nn.ModuleList(
            [nn.LSTMCell(inputs if i == 0 else hidden, hidden) for i in range(layers)]
        )
        self.out = nn.Linear(hidden, steps_per_cell * self.step_outputs)
        # Start with a very low end hazard: at first, stays end with the window, not by chance;
        # on slots, with most slots observed.
        with torch.no_grad():
            self.out.bias.view(steps_per_cell, self.step_outputs)[:, 1] = 2.0 if slots else -7.0

    @property
    def _charted_columns(self) -> slice:
        """The outputs of ``scale`` that set the patient's charting flags."""
        start = 3 * self.value_width + 2 + self.n_variables
        return slice(start, start + self.n_variables)

    def start_at_rates(self, observation_rates: torch.Tensor, charted_shares: torch.Tensor) -> None:
        """Start each variable's observation logits at ``observation_rates`` (per step, ``[V]``
        in (0, 1)) and its charting flag at ``charted_shares`` (the share of patients who have
        it at all); under DP both are released by ``private_summary``. A private critic's noisy
        gradients alone left MAP charted at 4 % of steps against 40 % in PhysioNet 2012.

        The flags start as thresholds of one shared patient-noise coordinate, so they nest: a
        patient charted for a rarer variable is charted for the commoner ones. Started with
        every flag on, the private critic never turned them off: at epsilon 10, 96-99 % of
        generated patients had an arterial line (MAP, SysABP, DiasABP) against 70 % of
        PhysioNet 2012's, and 77-93 % RespRate against 28 %. Started here, the shares are off
        by 0.05 on average instead of 0.16 (ten training seeds; TSTR unchanged, results.md).
        """
        with torch.no_grad():
            bias = self.out.bias.view(self.steps_per_cell, self.step_outputs)
            shares = charted_shares.to(bias).clamp(0.02, 0.995)
            rates = (observation_rates.to(bias) / shares).clamp(0.01, 0.99)
            bias[:, 2 : 2 + self.n_variables] = torch.logit(rates)
            flags = self._charted_columns
            shared_noise = self.scale.in_features - self.noise_dim  # the first noise input
            self.scale.weight[flags, shared_noise] = 1.0
            self.scale.bias[flags] = torch.special.ndtri(shares)

    def start_at_stay(self, window: float, log_gap: float) -> None:
        """Start every patient's observation window at ``window`` (a share of the horizon) and
        every gap output at ``log_gap`` (the gap head's log space); under DP from released
        moments, where the horizon is ``max_steps`` time units rather than the data's longest
        stay, so the default start (98 % of it) is far from where real stays end."""
        with torch.no_grad():
            window = min(max(window, 0.05), 0.99)
            self.scale.bias[3 * self.value_width] = math.log(window / (1 - window))
            self.out.bias.view(self.steps_per_cell, self.step_outputs)[:, 0] = log_gap

    def start(
        self, static: torch.Tensor, generator: torch.Generator, temperature: float
    ) -> tuple[torch.Tensor, Carry]:
        """Per-patient noise and the initial carry."""
        n = static.shape[0]
        patient_noise = torch.randn(n, self.noise_dim, generator=generator, device=static.device)
        inputs = torch.cat([static, patient_noise], dim=1)
        initial = torch.tanh(self.initial(inputs))
        h, c = initial.view(n, 2, self.layers, self.hidden).permute(1, 2, 0, 3).contiguous()
        scale = self.scale(inputs)
        w, v = self.value_width, self.n_variables
        persistence = torch.sigmoid(scale[:, 2 * w : 3 * w]) * 0.98
        a = persistence[:, None, None, :]
        lags = self.lags[None, :, :, None]
        patient = PatientScale(
            centre=scale[:, :w],
            half_range=F.softplus(scale[:, w : 2 * w]) + 0.05,
            smoothing=torch.where(lags >= 0, (1 - a) * a ** lags.clamp_min(0), 0.0),
            carried=a[:, 0] ** (self.lags[:, :1] + 1),
            window=torch.sigmoid(scale[:, 3 * w]),
            pace=scale[:, 3 * w + 1],
            propensity=scale[:, 3 * w + 2 : 3 * w + 2 + v],
            charted=st_threshold(scale[:, self._charted_columns], temperature),
            rhythm=F.softplus(scale[:, 3 * w + 2 + 2 * v :]) if self.schedules else None,
        )
        carry = Carry(
            (h, c),
            static.new_ones(n),
            static.new_zeros(n),
            static.new_zeros(n, self.value_width),
            static.new_zeros(n, self.n_variables),
            patient,
            level=patient.centre,
            since=static.new_full((n, self.n_variables), math.inf) if self.schedules else None,
        )
        return patient_noise, carry

    def cells(
        self,
        static: torch.Tensor,
        patient_noise: torch.Tensor,
        carry: Carry,
        first_cell: int,
        n_cells: int,
        time_scale: float,
        generator: torch.Generator,
        temperature: float,
    ) -> tuple[torch.Tensor, Carry]:
        """Steps ``[B, n_cells * steps_per_cell, F]`` of LSTM steps ``first_cell...``, and the
        carry after them. ``time_scale`` is ``gap_scale / time_max``."""
        n, device = static.shape[0], static.device
        outputs = []
        for cell in range(first_cell, first_cell + n_cells):
            noise = torch.randn(n, self.noise_dim, generator=generator, device=device)
            position = static.new_full((n, 1), cell / self.n_cells)
            inputs = torch.cat([static, patient_noise, noise, position, carry.features()], dim=1)
            state = self._lstm_step(inputs, carry.state)
            raw = self.out(state[0][-1]).view(n, self.steps_per_cell, self.step_outputs)
            steps, carry = self._steps(raw, carry, state, time_scale, generator, temperature)
            outputs.append(steps)
        return torch.cat(outputs, dim=1), carry

    def _lstm_step(
        self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the stacked LSTM cells; ``state`` is ``(h, c)``, each ``[layers, B, H]``."""
        hs, cs = [], []
        for layer, cell in enumerate(self.lstm):
            h, c = cell(inputs, (state[0][layer], state[1][layer]))
            hs.append(h)
            cs.append(c)
            inputs = h
        return torch.stack(hs), torch.stack(cs)

    def _steps(
        self,
        raw: torch.Tensor,
        carry: Carry,
        state: tuple[torch.Tensor, torch.Tensor],
        time_scale: float,
        generator: torch.Generator,
        temperature: float,
    ) -> tuple[torch.Tensor, Carry]:
        """Raw outputs of one LSTM step → steps in the critic's layout, and the next carry."""
        v, patient = self.n_variables, carry.patient
        values = raw[..., 2 + v :]
        target = patient.centre[:, None] + patient.half_range[:, None] * torch.tanh(values)
        level = torch.einsum("btkc,bkc->btc", patient.smoothing, target)
        level = level + patient.carried * carry.level[:, None]
        raw = torch.cat(
            [
                raw[..., :1] + patient.pace[:, None, None],
                raw[..., 1:2],
                raw[..., 2 : 2 + v] + patient.propensity[:, None, :],
                torch.where(self.numeric_value, level, values),
            ],
            -1,
        )
        out = self.activation(raw, generator, temperature)
        if self.slots:
            time = carry.time[:, None] + self.lags[:, 0] * time_scale  # this cell's slots
            alive = out[..., 1]
            log_gap = torch.zeros_like(alive)
            next_time = time[:, -1] + time_scale
            elapsed = torch.ones_like(alive)
        else:
            gap = out[..., 0]
            elapsed = torch.expm1(gap)
            time = carry.time[:, None] + torch.cumsum(elapsed, 1) * time_scale
            inside = time - patient.window[:, None]
            hard = (inside <= 0).to(time.dtype)
            soft = torch.sigmoid(-inside / WINDOW_SOFTNESS)
            inside = hard + soft - soft.detach() if soft.requires_grad else hard
            alive = carry.alive[:, None] * torch.cumprod(1 - out[..., 1], dim=1) * inside
            log_gap = gap * alive
            next_time = time[:, -1]
        if self.schedules:
            allowed = alive[..., None] * patient.charted[:, None, :]
            mask, since = self._masks(
                raw[..., 2 : 2 + v],
                allowed,
                elapsed,
                carry.since,
                patient.rhythm,
                generator,
                temperature,
            )
        else:
            if self.coupled_masks:  # not drawn by the activation
                drawn = self._draw_masks(raw[..., 2 : 2 + v], generator, temperature)
            else:
                drawn = out[..., 2 : 2 + v]
            mask = drawn * alive[..., None] * patient.charted[:, None, :]
            since = None
        column_mask = mask[..., self.value_variable]
        values = out[..., 2 + v :] * column_mask
        steps = torch.cat(
            [log_gap[..., None], (time * alive)[..., None], alive[..., None], mask, values], dim=-1
        )
        later = torch.flip(torch.cumsum(torch.flip(column_mask, [1]), 1), [1]) - column_mask
        last_here = ((later < 0.5) * values).sum(1)
        observed = column_mask.amax(1) > 0.5
        next_carry = Carry(
            state,
            alive[:, -1],
            next_time,
            torch.where(observed, last_here, carry.last),
            torch.maximum(carry.seen, mask.amax(1)),
            patient,
            level[:, -1],
            since,
        )
        return steps, next_carry

    def _masks(
        self,
        logits: torch.Tensor,
        allowed: torch.Tensor,
        elapsed: torch.Tensor,
        since: torch.Tensor,
        rhythm: torch.Tensor,
        generator: torch.Generator,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Observation masks ``[B, S, V]`` of one cell's steps, drawn step by step with each
        variable's logit shifted by ``since_logits`` at the time since it was last observed
        (``since``, ``[B, V]``, in ``gap_scale`` units, inf before any observation; ``elapsed``
        ``[B, S]`` is the time from the previous step) and zero where not ``allowed`` (after the
        stay, or a variable not charted for the patient), and ``since`` after the cell."""
        masks = []
        for k in range(logits.shape[1]):
            since = since + elapsed[:, k, None]
            bucket = torch.where(
                torch.isinf(since), SINCE_BUCKETS, since.clamp(max=SINCE_BUCKETS - 1).floor()
            ).long()
            shift = self.since_logits[self.variable_index, bucket] * rhythm
            mask = self._draw_masks(logits[:, k] + shift, generator, temperature) * allowed[:, k]
            since = torch.where(mask > 0.5, 0.0, since)
            masks.append(mask)
        return torch.stack(masks, 1), since

    def _draw_masks(
        self, logits: torch.Tensor, generator: torch.Generator, temperature: float
    ) -> torch.Tensor:
        """0/1 observation masks of ``Bernoulli(sigmoid(logits))`` (variables on the last axis),
        straight-through; with ``coupled_masks`` a row's draws share one factor."""
        if not self.coupled_masks:
            return st_bernoulli(logits, generator, temperature)
        coupling = torch.sigmoid(self.mask_coupling)
        noise = coupled_logistic_noise(logits.shape, coupling, generator, logits.device)
        return st_threshold(logits + noise, temperature)

    def forward(
        self,
        static: torch.Tensor,
        time_scale: float,
        generator: torch.Generator,
        temperature: float,
    ) -> torch.Tensor:
        """All ``n_steps`` steps (training)."""
        patient_noise, carry = self.start(static, generator, temperature)
        steps, _ = self.cells(
            static, patient_noise, carry, 0, self.n_cells, time_scale, generator, temperature
        )
        return steps[:, : self.n_steps]


class Generator(nn.Module):
    """The static generator and the sequence generator, as one module (one optimizer)."""

    def __init__(self, static: StaticGenerator, sequence: SequenceGenerator) -> None:
        super().__init__()
        self.static = static
        self.sequence = sequence


def summaries(steps: torch.Tensor, value_variable: torch.Tensor) -> torch.Tensor:
    """Per-patient statistics of a batch of steps, differentiable: what a person would compare.

    Per variable: log count of observations and observation rate; per value column: mean,
    standard deviation, minimum, maximum, first and last observed value and mean absolute change
    between consecutive steps where it is observed (0 when never observed); per patient: log
    length, last time and mean log-gap. ``value_variable`` maps value columns to variables.
    """
    v = int(value_variable.max()) + 1 if len(value_variable) else steps.shape[2] - STEP_PREFIX
    log_gap, time, alive = steps[..., 0], steps[..., 1], steps[..., 2]
    mask = steps[..., STEP_PREFIX : STEP_PREFIX + v]
    values = steps[..., STEP_PREFIX + v :]
    column_mask = mask[..., value_variable]
    length = alive.sum(1)
    count = mask.sum(1)
    column_count = column_mask.sum(1).clamp_min(1.0)
    mean = (column_mask * values).sum(1) / column_count
    spread = (column_mask * (values - mean[:, None, :]) ** 2).sum(1) / column_count
    std = torch.sqrt(spread + 1e-4) - 1e-2
    observed = column_mask > 0.5
    seen = observed.any(1)
    high = torch.where(observed, values, -1e4).amax(1)
    low = torch.where(observed, values, 1e4).amin(1)
    high, low = torch.where(seen, high, 0.0), torch.where(seen, low, 0.0)
    # First and last observed values: weights that pick the first/last observed step.
    seen_before = torch.cumsum(column_mask, 1) - column_mask
    first = ((seen_before < 0.5) * column_mask * values).sum(1)
    seen_after = torch.flip(torch.cumsum(torch.flip(column_mask, [1]), 1), [1]) - column_mask
    last = ((seen_after < 0.5) * column_mask * values).sum(1)
    # Mean absolute change between consecutive observations (not steps) of each column.
    positions = torch.arange(steps.shape[1], device=steps.device)[None, :, None]
    latest = torch.cummax(torch.where(observed, positions, -1), dim=1).values
    before = torch.cat([torch.full_like(latest[:, :1], -1), latest[:, :-1]], dim=1)
    previous = torch.gather(values, 1, before.clamp_min(0))
    pairs = column_mask * (before >= 0)
    step = (pairs * (values - previous).abs()).sum(1) / pairs.sum(1).clamp_min(1.0)
    return torch.cat(
        [
            torch.log1p(count),
            count / length[:, None].clamp_min(1.0),
            mean,
            std,
            low,
            high,
            first,
            last,
            step,
            torch.log1p(length)[:, None],
            time.amax(1)[:, None],
            (log_gap.sum(1) / length.clamp_min(1.0))[:, None],
        ],
        dim=1,
    )


def summary_width(n_variables: int, value_width: int) -> int:
    return 2 * n_variables + 7 * value_width + 3


@dataclasses.dataclass
class SummaryParts:
    """Named views of some columns of :func:`summaries` (``[B, ...]`` each)."""

    mean: torch.Tensor  # [B, W] mean observed value (0 if never observed)
    last: torch.Tensor  # [B, W] last observed value
    log_length: torch.Tensor  # [B]
    end_time: torch.Tensor  # [B]
    mean_log_gap: torch.Tensor  # [B]


def summary_parts(summary: torch.Tensor, n_variables: int, value_width: int) -> SummaryParts:
    """The columns of :func:`summaries` output ``summary`` by name."""
    v, w = n_variables, value_width
    return SummaryParts(
        mean=summary[:, 2 * v : 2 * v + w],
        last=summary[:, 2 * v + 5 * w : 2 * v + 6 * w],
        log_length=summary[:, -3],
        end_time=summary[:, -2],
        mean_log_gap=summary[:, -1],
    )


class Critic(nn.Module):
    """Both discriminators in one module, so one optimizer (and one DP wrapper) covers them.

    The static critic scores ``[static vector, given columns]``: seeing which columns were given
    lets it check every conditional, not only the mixture. The patient critic scores
    ``[static vector, summaries]`` (:func:`summaries`) together with the flattened steps, each
    step first embedded by a shared linear layer (DoppelGANger's MLP discriminator, made
    cheaper). The gradient penalty is taken with respect to these inputs.
    """

    def __init__(
        self,
        static_inputs: int,
        patient_inputs: int,
        n_steps: int,
        step_width: int,
        step_embedding: int,
        hidden: int,
        layers: int,
    ) -> None:
        super().__init__()
        self.static_critic = mlp([static_inputs, *[hidden] * layers, 1])
        self.step_embedding = nn.Linear(step_width, step_embedding)
        self.patient_critic = mlp(
            [patient_inputs + n_steps * step_embedding, *[hidden] * layers, 1]
        )

    def forward(
        self, static_inputs: torch.Tensor, patient_inputs: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = F.leaky_relu(self.step_embedding(steps), 0.2).flatten(1)
        patient = self.patient_critic(torch.cat([patient_inputs, embedded], dim=1))
        return self.static_critic(static_inputs).squeeze(1), patient.squeeze(1)
