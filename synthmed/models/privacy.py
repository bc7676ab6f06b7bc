"""Differentially private training for synthmed's generators (DP-SGD through Opacus).

How a generator trains privately
--------------------------------
A model builds, in one place, the module that sees real data, one optimizer for it and a
``torch.utils.data.DataLoader`` that yields **one item per patient** (e.g. a ``TensorDataset`` of
patient indices), and passes them through ``Synthesizer._make_private``. Without ``epsilon`` that
is the identity; with it, the base calls :func:`make_private` here, which

1. resolves ``delta`` (default ``1 / n_patients**1.1``, and always below ``1 / n_patients``),
2. checks that the data loader has one item per training patient (one patient is one privacy
   unit, however many rows it has) and that every layer has per-sample gradients in Opacus
   (:func:`check_module`; ``nn.LSTM`` must be :class:`~synthmed.models.private_lstm.PrivateLSTM`
   or ``opacus.layers.DPLSTM``, no BatchNorm, ...), so an
   unsupported configuration fails before any training step,
3. calls ``PrivacyEngine.make_private_with_epsilon``: per-patient gradients are clipped to
   ``max_grad_norm``, Gaussian noise is calibrated so that the planned ``epochs`` spend at most
   ``epsilon`` under the accountant (RDP by default, PRV on request), and the loader is replaced
   by a Poisson-sampling one,
4. records the run on the synthesizer; the spent budget is updated at the end of every epoch.

At the end of ``_fit`` the model calls :func:`record_spent` (the **hook**). It computes the
spent (epsilon, delta) from the accountant, stores it in ``synth.privacy_spent_`` (which the base
writes into the saved file and every sampled cohort's metadata, and the report shows), and
detaches Opacus' hooks from the modules so sampling and saving see plain modules. It refuses a
model whose ``epsilon`` is set but which never trained through :func:`make_private`.

A model that must train two private parts separately (e.g. a static model and a sequence model
with different schedules) calls :func:`make_private` once per part with ``budget_fraction``
shares summing to at most 1; the phases' accountant histories are composed, so the reported
epsilon is that of the whole run. The first phase is calibrated alone to its share; each later
phase's noise is calibrated on the composition with the earlier ones, to the cumulative share
(composition spends less than the sum of separately calibrated shares). The LSTM does this:
trained as one module under one clipping bound, its small static model got too small a share of
each clipped gradient to learn.

Under DP a model keeps only :func:`releasable_history` of its training history: per-epoch
losses on real patients are not covered by the accountant.

Two more helpers for models: :func:`plain_state_dict` (the state dict of a model holding a
``DPLSTM``, loadable into its ``nn.LSTM`` twin for fast sampling) and, for training loops that
checkpoint, :func:`checkpoint_state` / :func:`restore_checkpoint_state` (a resumed run must
carry the accountant's history of the interrupted one, or it would under-report epsilon).
``Synthesizer._save_checkpoint`` / ``_load_checkpoint`` call them for every private model, so a
training loop only has to load its checkpoint after ``_make_private``.

``privacy_sweep`` trains a generator at several budgets and evaluates each, for the
privacy-utility frontier (``synthmed privacy-sweep``, ``benchmarks/privacy_frontier.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from synthmed.errors import PrivacyError

if TYPE_CHECKING:
    from synthmed.cohort import Cohort
    from synthmed.models.base import Synthesizer

#: Accountant used unless the synthesizer has an ``accountant`` attribute ("rdp" or "prv").
DEFAULT_ACCOUNTANT = "rdp"
ACCOUNTANTS = ("rdp", "prv")
#: Default delta is ``n_patients ** -DELTA_EXPONENT``: below ``1 / n``, as DP requires.
DELTA_EXPONENT = 1.1
#: Reported epsilon may exceed the target by this relative slack before a warning is raised.
EPSILON_SLACK = 1e-3

_SESSION_ATTRIBUTE = "_privacy_session"


class PrivacyWarning(UserWarning):
    """Private training ran, but something deserves the user's attention."""


# -- delta ---------------------------------------------------------------------------------------


def default_delta(n_patients: int) -> float:
    """The default ``delta``: ``1 / n_patients**1.1``, below ``1 / n_patients`` for n ≥ 2.

    ``delta`` bounds the probability that the epsilon guarantee fails; it must be well below
    ``1 / n`` (otherwise "publish one random patient" would satisfy the definition).
    """
    if n_patients < 2:
        raise PrivacyError(
            f"differential privacy needs at least 2 training patients, got {n_patients}"
        )
    return float(n_patients**-DELTA_EXPONENT)


def resolve_delta(delta: float | None, n_patients: int) -> float:
    """``delta`` itself, checked to be below ``1 / n_patients``, or :func:`default_delta`."""
    if delta is None:
        return default_delta(n_patients)
    if not 0 < delta < 1 / n_patients:
        raise PrivacyError(
            f"delta={delta!r} must be below 1/n_patients = {1 / n_patients:.3g} for "
            f"{n_patients} training patients; leave delta=None for the default "
            f"1/n**{DELTA_EXPONENT} = {default_delta(n_patients):.3g}"
        )
    return float(delta)


# -- validation ----------------------------------------------------------------------------------


def check_module(module: nn.Module) -> None:
    """Raise :class:`PrivacyError` unless Opacus can compute per-patient gradients for ``module``.

    Runs, layer by layer, Opacus' ``ModuleValidator`` checks (``nn.LSTM``/``nn.GRU`` must be
    ``opacus.layers.DPLSTM``/``DPGRU``, no BatchNorm, ...) and ``GradSampleModule``'s (no
    trainable layer with buffers). Call it when building the modules of a private model, so that
    an unsupported configuration fails before any training step; :func:`make_private` calls it
    too. The module's train/eval mode does not matter here.
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import IllegalModuleConfigurationError

    problems = []
    for name, sub in trainable_modules(module):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        errors = [str(e).strip() for e in validator(sub)] if validator else []
        if list(sub.buffers()):
            errors.append("a trainable layer with buffers (e.g. running statistics)")
        if errors:
            problems.append(f"{name or 'the model'} ({type(sub).__name__}): {' '.join(errors)}")
    if not problems:
        was_training = module.training
        try:
            module.train()
            problems = [
                str(e).strip()
                for e in ModuleValidator.validate(module, strict=False)
                if not isinstance(e, IllegalModuleConfigurationError)
            ]
        finally:
            module.train(was_training)
    if problems:
        raise PrivacyError(
            "this model configuration cannot be trained with differential privacy, Opacus has "
            "no per-patient gradients for: "
            + "; ".join(problems)
            + " -- use synthmed.models.private_lstm.PrivateLSTM or opacus.layers.DPLSTM/DPGRU "
            "instead of nn.LSTM/nn.GRU, and GroupNorm or "
            "LayerNorm instead of BatchNorm"
        )


def check_public_schema(cohort: Cohort) -> None:
    """Check that what a private model reads from the schema is declared, not data-derived.

    Under DP the schema travels with the model and its samples unprotected, so it must be
    public knowledge: numeric columns need declared ``lower``/``upper`` bounds (the
    ``from_bounds=True`` encoders scale with them instead of the data's mean and spread).
    Raises :class:`PrivacyError` for a numeric column without bounds, and warns
    (:class:`PrivacyWarning`) when a column's bounds are exactly the training data's minimum
    and maximum, the signature of ``Schema.infer``.
    """
    schema = cohort.schema
    unbounded = [
        name
        for name, column in schema.columns.items()
        if column.kind == "numeric" and (column.lower is None or column.upper is None)
    ]
    if unbounded:
        raise PrivacyError(
            f"private training needs declared lower and upper bounds for every numeric column; "
            f"{unbounded} have none. Declare them from domain knowledge, e.g. "
            f"schema.with_column({unbounded[0]!r}, lower=..., upper=...)"
        )
    inferred = []
    for name, column in schema.columns.items():
        if column.kind != "numeric":
            continue
        table = cohort.static if column.is_static else cohort.events
        values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) and values.min() == column.lower and values.max() == column.upper:
            inferred.append(name)
    if inferred:
        warnings.warn(
            f"the bounds of {inferred} equal the training data's minimum and maximum, as "
            "Schema.infer sets them: the schema is released with the model, so under DP these "
            "extremes leak. Replace them with declared (e.g. physiological) bounds.",
            PrivacyWarning,
            stacklevel=2,
        )


def _check_loader(synth: Synthesizer, data_loader: torch.utils.data.DataLoader) -> int:
    dataset = data_loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise PrivacyError(
            "private training needs a map-style dataset (one item per patient), not an "
            "IterableDataset, so that Poisson sampling can pick patients"
        )
    n = len(dataset)  # type: ignore[arg-type]
    expected = getattr(synth, "n_train_patients_", None)
    if expected is not None and n != expected:
        raise PrivacyError(
            f"the private data loader has {n} items but the cohort has {expected} patients: "
            "under DP one item must be one patient (the privacy unit), whatever its number of "
            "rows; build the dataset over patient indices"
        )
    try:
        n_batches = len(data_loader)
    except TypeError:
        raise PrivacyError(
            "the private data loader must have a length (batches per epoch): its batch sampler "
            "is replaced by Poisson sampling at rate 1 / len(data_loader)"
        ) from None
    if n_batches < 1:
        raise PrivacyError("the private data loader yields no batch")
    if not isinstance(dataset[0], tuple | list):
        raise PrivacyError(
            "each item of the private dataset must be a tuple of tensors (e.g. "
            "TensorDataset(torch.arange(n_patients))) so that Opacus can build empty batches"
        )
    if n_batches == 1:
        warnings.warn(
            f"one batch per epoch holds all {n} training patients: "
            "without subsampling DP-SGD needs far more noise; use a smaller batch_size",
            PrivacyWarning,
            stacklevel=3,
        )
    return n


# -- the session: what one private fit spent -----------------------------------------------------


@dataclasses.dataclass
class _Phase:
    engine: Any  # opacus.PrivacyEngine; None for a one-shot Gaussian mechanism (private_sum)
    module: Any  # opacus GradSampleModule, or None
    noise_multiplier: float
    sample_rate: float
    fraction: float
    steps_per_epoch: int
    planned_epochs: int
    steps: int = 0
    fixed_history: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's (noise multiplier, sample rate, steps) entries of this phase."""
        return self.engine.accountant.history if self.engine is not None else self.fixed_history

    @history.setter
    def history(self, entries: list[tuple[float, float, int]]) -> None:
        if self.engine is not None:
            self.engine.accountant.history = entries
        else:
            self.fixed_history = entries


class PrivacySession:
    """The DP state of one private fit: its phases (engines), steps and spent budget.

    Stored on the synthesizer by :func:`make_private`, closed by :func:`record_spent`. Not saved
    with the model; :func:`privacy_details` gives its JSON-friendly summary.
    """

    def __init__(self, epsilon: float, delta: float, accountant: str, n_patients: int) -> None:
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.n_patients = n_patients
        self.phases: list[_Phase] = []
        self.epsilon_by_epoch: list[float] = []
        self.finished = False

    @property
    def fraction_used(self) -> float:
        return sum(phase.fraction for phase in self.phases)

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)

    def spent_epsilon(self) -> float:
        """Epsilon at ``self.delta`` over every step of every phase, composed by the accountant."""
        history = [entry for phase in self.phases for entry in phase.history]
        return spent_epsilon(history, self.delta, self.accountant)

    def close(self) -> None:
        """Detach Opacus' hooks and per-sample attributes from the trained modules."""
        for phase in self.phases:
            if phase.module is not None:
                phase.module.cleanup()
        self.finished = True


def spent_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of a run of (noise multiplier, sample rate, steps) entries.

    The same number Opacus' accountant gives for that history (RDP: its default orders; PRV:
    its upper bound). RDP reuses the per-step RDP curve of each (noise, rate) pair, so
    recomputing the spent budget at every epoch costs next to nothing.
    """
    if not history:
        return 0.0
    with warnings.catch_warnings():
        # RDP notes when the largest order is optimal; the bound stays valid (just looser).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "rdp":
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis import rdp as analysis

            curve = sum(
                steps * np.asarray(_rdp_per_step(float(sigma), float(rate)))
                for sigma, rate, steps in history
            )
            epsilon, _ = analysis.get_privacy_spent(
                orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta
            )
            return float(epsilon)
        from opacus.accountants import create_accountant

        engine_accountant = create_accountant(mechanism=accountant)
        engine_accountant.history = [tuple(entry) for entry in history]
        return float(engine_accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=128)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    return tuple(float(v) for v in curve)


def make_private(
    synth: Synthesizer,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    epochs: int,
    *,
    budget_fraction: float = 1.0,
    accountant: str | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader]:
    """Make ``module``'s training differentially private at ``synth.epsilon``.

    Called through ``Synthesizer._make_private`` when ``epsilon`` is set. Every later training
    step must use the returned module (or the original one: Opacus' hooks sit on its layers),
    optimizer and loader, and run exactly ``epochs`` passes of the loader (one optimizer step per
    batch); any other use of real data is outside the guarantee. Call :func:`record_spent` at the
    end of training.

    Args:
        synth: The synthesizer being fitted (reads ``epsilon``, ``delta``, ``max_grad_norm``,
            ``n_train_patients_`` and, if present, ``accountant``).
        module: Everything that sees real data; its layers must pass :func:`check_module`.
        optimizer: One optimizer over ``module``'s parameters only.
        data_loader: A map-style loader yielding one item (a tuple of tensors) per patient.
            Its sampling (shuffling, a custom batch sampler such as length buckets) is replaced
            by Poisson sampling at rate ``1 / len(data_loader)``.
        epochs: Passes over the data planned; the noise is calibrated for exactly these.
        budget_fraction: Share of (epsilon, delta) for this call, when a model trains several
            private parts separately; the shares of one fit must sum to at most 1.
        accountant: ``"rdp"`` (default) or ``"prv"``.

    Returns:
        ``(module, optimizer, data_loader)`` wrapped by Opacus: a ``GradSampleModule``, a
        ``DPOptimizer`` and a Poisson-sampling ``DPDataLoader``.

    Raises:
        PrivacyError: delta not below 1/n, a layer without per-sample gradients, a loader that
            is not one item per patient, an optimizer over other parameters, or a budget that no
            amount of noise can reach for these settings.
    """
    from opacus import PrivacyEngine

    if synth.epsilon is None:
        raise PrivacyError("make_private was called on a synthesizer without epsilon")
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 1:
        raise PrivacyError(f"epochs must be a positive integer, got {epochs!r}")
    if not 0 < budget_fraction <= 1:
        raise PrivacyError(f"budget_fraction must be in (0, 1], got {budget_fraction!r}")
    accountant = accountant or getattr(synth, "accountant", None) or DEFAULT_ACCOUNTANT
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    n_patients = _check_loader(synth, data_loader)
    owned = {id(p) for p in module.parameters()}
    if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
        raise PrivacyError(
            "the optimizer holds parameters outside the module passed to _make_private; under "
            "DP one optimizer must train exactly the module(s) that see real data"
        )
    delta = resolve_delta(synth.delta, n_patients)
    check_module(module)

    session = _session_for(synth, delta, accountant, n_patients, budget_fraction)

    module.train()
    # Opacus' per-sample hooks use gradients with respect to layer outputs; torch warns, once per
    # training loop, when a hooked layer's input needs no gradient. That is expected here.
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing when gradients are computed with respect"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        engine = PrivacyEngine(accountant=accountant)
        try:
            if session.phases:
                # A later phase tops the run up to its cumulative share: its noise is calibrated
                # on the composition with the earlier phases, which spends less than the sum of
                # separately calibrated shares.
                noise = _composed_noise_multiplier(
                    session,
                    target=synth.epsilon * (session.fraction_used + budget_fraction),
                    sample_rate=1 / len(data_loader),
                    steps=int(epochs) * len(data_loader),
                )
                private_module, private_optimizer, private_loader = engine.make_private(
                    module=module,
                    optimizer=optimizer,
                    data_loader=data_loader,
                    noise_multiplier=noise,
                    max_grad_norm=synth.max_grad_norm,
                    poisson_sampling=True,
                    grad_sample_mode="hooks",
                )
            else:
                private_module, private_optimizer, private_loader = (
                    engine.make_private_with_epsilon(
                        module=module,
                        optimizer=optimizer,
                        data_loader=data_loader,
                        target_epsilon=synth.epsilon * budget_fraction,
                        target_delta=delta * budget_fraction,
                        epochs=int(epochs),
                        max_grad_norm=synth.max_grad_norm,
                        poisson_sampling=True,
                        grad_sample_mode="hooks",
                    )
                )
        except ValueError as exc:
            raise _explain(exc, synth, data_loader, epochs) from None

    phase = _Phase(
        engine=engine,
        module=private_module,
        noise_multiplier=float(private_optimizer.noise_multiplier),
        sample_rate=float(private_loader.sample_rate),
        fraction=float(budget_fraction),
        steps_per_epoch=len(private_loader),
        planned_epochs=int(epochs),
    )
    session.phases.append(phase)
    accountant_hook = private_optimizer.step_hook

    def step_hook(optim: Any) -> None:
        accountant_hook(optim)
        phase.steps += 1
        if phase.steps % phase.steps_per_epoch == 0:
            spent = session.spent_epsilon()
            session.epsilon_by_epoch.append(spent)
            synth.privacy_spent_ = (spent, session.delta)

    private_optimizer.attach_step_hook(step_hook)
    return private_module, private_optimizer, private_loader


def _session_for(
    synth: Synthesizer, delta: float, accountant: str, n_patients: int, budget_fraction: float
) -> PrivacySession:
    """The fit's running session if this phase's share fits in it, else a new session."""
    session = getattr(synth, _SESSION_ATTRIBUTE, None)
    joins = (
        session is not None
        and not session.finished
        and budget_fraction < 1
        and session.fraction_used + budget_fraction <= 1 + 1e-9
        and session.accountant == accountant
    )
    if not joins:
        session = PrivacySession(synth.epsilon, delta, accountant, n_patients)
        setattr(synth, _SESSION_ATTRIBUTE, session)
        synth.privacy_spent_ = None
    return session


def private_sum(
    synth: Synthesizer,
    rows: np.ndarray,
    generator: torch.Generator,
    *,
    budget_fraction: float,
    accountant: str | None = None,
) -> tuple[np.ndarray, float]:
    """Column sums of per-patient ``rows`` (``[n_patients, k]``) by the Gaussian mechanism,
    and the standard deviation of the noise added to each.

    Each row is scaled to an L2 norm of at most 1 (one patient changes the sums by at most 1),
    and Gaussian noise is added with the multiplier that brings the fit's session to its
    cumulative share of epsilon, as a later phase of :func:`make_private` does; the accountant
    composes it with the other phases (one step at sample rate 1).
    """
    if synth.epsilon is None:
        raise PrivacyError("private_sum was called on a synthesizer without epsilon")
    if not 0 < budget_fraction <= 1:
        raise PrivacyError(f"budget_fraction must be in (0, 1], got {budget_fraction!r}")
    accountant = accountant or getattr(synth, "accountant", None) or DEFAULT_ACCOUNTANT
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    n_patients = len(rows)
    delta = resolve_delta(synth.delta, n_patients)
    session = _session_for(synth, delta, accountant, n_patients, budget_fraction)
    try:
        noise = _composed_noise_multiplier(
            session,
            target=synth.epsilon * (session.fraction_used + budget_fraction),
            sample_rate=1.0,
            steps=1,
        )
    except ValueError as exc:
        raise PrivacyError(f"epsilon={synth.epsilon} cannot be reached: {exc}") from None
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.maximum(norms, 1.0)
    draws = torch.randn(rows.shape[1], generator=generator, dtype=torch.float64).numpy()
    session.phases.append(
        _Phase(
            engine=None,
            module=None,
            noise_multiplier=noise,
            sample_rate=1.0,
            fraction=float(budget_fraction),
            steps_per_epoch=1,
            planned_epochs=1,
            steps=1,
            fixed_history=[(noise, 1.0, 1)],
        )
    )
    spent = session.spent_epsilon()
    session.epsilon_by_epoch.append(spent)
    synth.privacy_spent_ = (spent, session.delta)
    return rows.sum(axis=0) + noise * draws, noise


def _explain(
    exc: ValueError, synth: Synthesizer, data_loader: torch.utils.data.DataLoader, epochs: int
) -> PrivacyError:
    text = str(exc)
    if "budget is too low" in text:
        return PrivacyError(
            f"epsilon={synth.epsilon} cannot be reached with {epochs} epochs over "
            f"{len(data_loader.dataset)} patients in batches of {data_loader.batch_size}: "
            "raise epsilon, train fewer epochs or use smaller batches"
        )
    if "different than optimizer" in text:
        return PrivacyError(
            "the optimizer holds parameters outside the module passed to _make_private; under "
            "DP one optimizer must train exactly the module(s) that see real data"
        )
    return PrivacyError(f"Opacus refused the private training setup: {text}")


def _composed_noise_multiplier(
    session: PrivacySession, target: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier (within 1 %) for which the session's phases so far plus
    ``steps`` more at ``sample_rate`` spend at most ``target`` epsilon at the session's delta."""
    earlier = [entry for phase in session.phases for entry in phase.history]

    def spent(noise: float) -> float:
        return spent_epsilon(
            [*earlier, (noise, sample_rate, steps)], session.delta, session.accountant
        )

    if spent_epsilon(earlier, session.delta, session.accountant) >= target:
        raise ValueError("the privacy budget is too low: earlier phases already spent it")
    low, high = 0.1, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("the privacy budget is too low for these settings")
    while high / low > 1.01:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > target else (low, middle)
    return high


def record_spent(synth: Synthesizer) -> tuple[float, float] | None:
    """The hook every private model calls at the end of ``_fit``.

    Sets ``synth.privacy_spent_`` to the (epsilon, delta) spent by every private step of this
    fit, detaches Opacus' hooks from the trained modules, and returns the pair. For a model
    without ``epsilon`` it does nothing and returns None.

    Raises:
        PrivacyError: ``epsilon`` is set but no module was trained through :func:`make_private`
            (or no private step was taken): the model would not be private.
    """
    if synth.epsilon is None:
        return None
    session: PrivacySession | None = getattr(synth, _SESSION_ATTRIBUTE, None)
    if session is None or session.finished or not session.phases:
        raise PrivacyError(
            f"{type(synth).__name__} has epsilon={synth.epsilon} but did not train through "
            "_make_private: the fitted model is NOT differentially private (a bug in the model)"
        )
    if session.steps == 0:
        raise PrivacyError(
            f"{type(synth).__name__} took no private optimisation step; nothing was learned"
        )
    spent = session.spent_epsilon()
    session.close()
    if spent > session.epsilon * (1 + EPSILON_SLACK):
        planned = sum(p.planned_epochs * p.steps_per_epoch for p in session.phases)
        warnings.warn(
            f"{type(synth).__name__} spent epsilon={spent:.3g}, more than the requested "
            f"{session.epsilon}: it took {session.steps} private steps where {planned} were "
            "planned. The reported budget is the true one.",
            PrivacyWarning,
            stacklevel=2,
        )
    synth.privacy_spent_ = (spent, session.delta)
    return synth.privacy_spent_


def releasable_history(
    synth: Synthesizer,
    history: pd.DataFrame,
    public: Sequence[str] = ("epoch", "seconds"),
) -> pd.DataFrame:
    """The training history a fitted model may keep (and save, and show in reports).

    Without DP, ``history`` unchanged. Under DP, only the ``public`` columns (those that depend
    on no real patient outside the private mechanism: epoch numbers, timings, a GAN generator's
    loss on generated data) plus ``epsilon``, the budget spent at the end of each epoch. Losses
    computed on real patients are statistics of the training data that the accountant does not
    cover, so the model file must not carry them.
    """
    if synth.epsilon is None:
        return history
    kept = history[[c for c in history.columns if c in set(public)]].copy()
    session: PrivacySession | None = getattr(synth, _SESSION_ATTRIBUTE, None)
    spent = session.epsilon_by_epoch if session is not None else []
    if len(spent) == len(kept):
        kept["epsilon"] = spent
    return kept


def checkpoint_state(synth: Synthesizer) -> dict[str, Any] | None:
    """What a training checkpoint must keep of the privacy accounting (JSON-friendly).

    ``Synthesizer._save_checkpoint`` saves it with every checkpoint of a private model (unless
    the loop's state already holds it under ``"privacy"``) and ``_load_checkpoint`` hands it to
    :func:`restore_checkpoint_state`, which must come after ``_make_private``: otherwise the
    resumed run would account only for its own steps and under-report epsilon. None without a
    private session.
    """
    session: PrivacySession | None = getattr(synth, _SESSION_ATTRIBUTE, None)
    if session is None or session.finished:
        return None
    return {
        "phases": [
            {"history": [list(entry) for entry in p.history], "steps": p.steps}
            for p in session.phases
        ],
        "epsilon_by_epoch": list(session.epsilon_by_epoch),
    }


def restore_checkpoint_state(synth: Synthesizer, state: Mapping[str, Any] | None) -> None:
    """Restore the accounting saved by :func:`checkpoint_state` into the current session.

    Call it after :func:`make_private` has been called again (as many times as in the
    interrupted run) and before the first resumed step.
    """
    if state is None:
        return
    session: PrivacySession | None = getattr(synth, _SESSION_ATTRIBUTE, None)
    saved = list(state["phases"])
    if session is None or session.finished or len(session.phases) < len(saved):
        raise PrivacyError(
            "restore_checkpoint_state needs the private training set up again first: call "
            "_make_private as in the interrupted run, then restore"
        )
    for phase, entry in zip(session.phases, saved, strict=False):
        phase.history = [tuple(item) for item in entry["history"]]
        phase.steps = int(entry["steps"])
    session.epsilon_by_epoch = [float(e) for e in state["epsilon_by_epoch"]]


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the internal duplicates of Opacus' DP layers.

    A ``DPLSTM`` nested in a model adds its internal names (``lstm.l0.ih.weight``...) to the
    parent's state dict next to ``nn.LSTM``'s (``lstm.weight_ih_l0``...): Opacus filters them only
    for a top-level DPLSTM. The result loads strictly into the same model built with ``nn.LSTM``
    (the fast layer to sample with).
    """
    state = module.state_dict()
    for name, sub in module.named_modules():
        renamed = getattr(sub, "old_to_new", None)
        if renamed:
            prefix = f"{name}." if name else ""
            for old in renamed:
                state.pop(prefix + old, None)
    return state


def privacy_details(synth: Synthesizer) -> dict[str, Any] | None:
    """A JSON-friendly summary of the last private fit (None without one).

    Keys: ``epsilon_target``, ``delta``, ``accountant``, ``n_patients``, ``steps``,
    ``epsilon_by_epoch`` (spent epsilon at the end of each epoch, cumulative), and ``phases``
    (``noise_multiplier``, ``sample_rate``, ``budget_fraction``, ``epochs``, ``steps`` each).
    Models may store it in their saved state or history.
    """
    session: PrivacySession | None = getattr(synth, _SESSION_ATTRIBUTE, None)
    if session is None:
        return None
    return {
        "epsilon_target": session.epsilon,
        "delta": session.delta,
        "accountant": session.accountant,
        "n_patients": session.n_patients,
        "steps": session.steps,
        "epsilon_by_epoch": list(session.epsilon_by_epoch),
        "phases": [
            {
                "noise_multiplier": p.noise_multiplier,
                "sample_rate": p.sample_rate,
                "budget_fraction": p.fraction,
                "epochs": p.planned_epochs,
                "steps": p.steps,
            }
            for p in session.phases
        ],
    }


# -- the privacy-utility frontier ----------------------------------------------------------------

#: Metrics of the sweep, read from ``report.scores`` (overall rows, variable None).
SWEEP_METRICS = (
    "tstr_auroc",
    "trtr_auroc",
    "discriminative_score",
    "discriminative_auroc",
    "membership_inference_auroc",
    "dcr_ratio",
)


def privacy_sweep(
    train: Cohort,
    holdout: Cohort,
    model: str | type[Synthesizer] = "lstm",
    epsilons: Sequence[float | None] = (1.0, 3.0, 10.0, None),
    settings: Mapping[str, Any] | None = None,
    n_synthetic: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    evaluate_kwargs: Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> pd.DataFrame:
    """Train ``model`` at each budget in ``epsilons`` and evaluate each synthetic cohort.

    Args:
        train: Real patients to fit on.
        holdout: Real patients never seen in training (TSTR test set, fidelity reference).
        model: A registered ``model_type`` (``"lstm"``, ``"cgan"``) or a Synthesizer class.
        epsilons: Budgets to train at; None (or ``math.inf``) trains without DP.
        settings: Constructor settings shared by every run (``epochs``, ``batch_size``, ...).
        n_synthetic: Synthetic patients per run (default: as many as ``train``).
        seed: Seed of every fit, sample and evaluation.
        out_dir: If given, each model, synthetic cohort and report is saved under it
            (``eps-<value>/``), and the table as ``privacy_sweep.csv``.
        evaluate_kwargs: Extra arguments of ``synthmed.evaluate`` (e.g. ``gru=False``).
        verbose: Progress output.

    Returns:
        One row per budget: ``epsilon_target`` (inf without DP), ``epsilon``/``delta`` spent,
        ``fit_seconds``, ``time_ratio`` (fit time over the non-private run's, when there is
        one) and the columns of :data:`SWEEP_METRICS`.
    """
    from synthmed.evaluation import evaluate
    from synthmed.models.base import Synthesizer

    if isinstance(model, str):
        registry = Synthesizer.registry()
        if model not in registry:
            _import_models()
            registry = Synthesizer.registry()
        if model not in registry:
            raise ValueError(f"unknown model {model!r}; known: {sorted(registry)}")
        model_class = registry[model]
    else:
        model_class = model
    settings = dict(settings or {})
    settings.setdefault("verbose", verbose)
    out = Path(out_dir) if out_dir is not None else None
    rows = []
    for target in epsilons:
        private = target is not None and math.isfinite(target)
        label = f"eps-{target:g}" if private else "eps-inf"
        if verbose:
            print(f"[privacy_sweep] {model_class.__name__} {label}: fitting", flush=True)
        run_settings = {**settings, "epsilon": float(target) if private else None, "seed": seed}
        synth = model_class(**run_settings)
        started = time.perf_counter()
        synth.fit(train)
        seconds = time.perf_counter() - started
        synthetic = synth.sample(n_synthetic or train.n_patients, seed=seed)
        report = evaluate(holdout, synthetic, train=train, seed=seed, **dict(evaluate_kwargs or {}))
        values = headline_scores(report.scores)
        spent = synth.privacy_spent
        row = {
            "model": model_class.__name__,
            "epsilon_target": float(target) if private else math.inf,
            "epsilon": spent[0] if spent else math.inf,
            "delta": spent[1] if spent else 0.0,
            "fit_seconds": seconds,
            **{metric: float(values.get(metric, math.nan)) for metric in SWEEP_METRICS},
        }
        rows.append(row)
        if verbose:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in row.items() if isinstance(v, float))
            print(f"[privacy_sweep] {label}: {shown}", flush=True)
        if out is not None:
            folder = out / label
            folder.mkdir(parents=True, exist_ok=True)
            synth.save(folder / "model.synthmed")
            synthetic.to_parquet(folder / "synthetic.parquet")
            report.to_json(folder / "report.json")
    frame = pd.DataFrame(rows)
    baseline = frame.loc[np.isinf(frame["epsilon_target"]), "fit_seconds"]
    frame["time_ratio"] = frame["fit_seconds"] / baseline.iloc[0] if len(baseline) else math.nan
    if out is not None:
        frame.to_csv(out / "privacy_sweep.csv", index=False)
    return frame


def headline_scores(scores: pd.DataFrame) -> dict[str, float]:
    """One value per metric of a report's ``scores``: its overall row (variable None) or, for
    metrics reported per variable only (``tstr_auroc``, ``trtr_auroc``: the outcome column),
    its first row."""
    values: dict[str, float] = {}
    for metric, rows in scores.groupby("metric", sort=False):
        overall = rows[rows["variable"].isna()]
        values[str(metric)] = float((overall if len(overall) else rows)["value"].iloc[0])
    return values


def _import_models() -> None:
    import importlib

    for name in ("synthmed.models.lstm", "synthmed.models.cgan"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue


def plot_privacy_frontier(frame: pd.DataFrame, path: str | Path) -> Path:
    """Plot utility against epsilon from :func:`privacy_sweep`'s table into one PNG.

    Left: TSTR AUROC (with TRTR as the reference line); middle: discriminative score
    (|accuracy − 0.5|, lower is better); right: membership-inference AUROC (0.5 is chance).
    The non-private run is drawn at the right end, labelled ∞.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = frame.sort_values("epsilon_target").reset_index(drop=True)
    finite = frame["epsilon_target"][np.isfinite(frame["epsilon_target"])]
    right = float(finite.max()) * 3 if len(finite) else 10.0
    x = frame["epsilon_target"].where(np.isfinite(frame["epsilon_target"]), right)
    labels = [f"{v:g}" if np.isfinite(v) else "∞" for v in frame["epsilon_target"]]
    panels = [
        ("tstr_auroc", "TSTR AUROC (in-hospital death)", "trtr_auroc"),
        ("discriminative_score", "discriminative score |acc − 0.5|", None),
        ("membership_inference_auroc", "membership-inference AUROC", None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for axis, (metric, title, reference) in zip(axes, panels, strict=True):
        axis.plot(x, frame[metric], "o-", label=metric)
        if reference is not None and frame[reference].notna().any():
            axis.axhline(float(frame[reference].mean()), color="grey", ls="--", label="TRTR")
            axis.axhline(
                0.9 * float(frame[reference].mean()), color="grey", ls=":", label="90% of TRTR"
            )
        if metric == "membership_inference_auroc":
            axis.axhline(0.55, color="red", ls=":", label="target 0.55")
            axis.axhline(0.5, color="grey", ls="--", label="chance")
        low, high = {
            "tstr_auroc": (0.4, 1.0),
            "discriminative_score": (0.0, 0.52),
            "membership_inference_auroc": (0.4, 0.8),
        }[metric]
        if frame[metric].notna().any():
            low = min(low, float(np.nanmin(frame[metric])) - 0.02)
            high = max(high, float(np.nanmax(frame[metric])) + 0.02)
        axis.set_ylim(low, high)
        axis.set_xscale("log")
        axis.set_xticks(list(x))
        axis.set_xticklabels(labels)
        axis.minorticks_off()
        axis.set_xlabel("ε (target)")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    model = frame["model"].iloc[0] if "model" in frame and len(frame) else ""
    figure.suptitle(f"Privacy-utility frontier {model}".strip(), fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def frontier_markdown(frame: pd.DataFrame) -> str:
    """:func:`privacy_sweep`'s table as a Markdown table for ``benchmarks/results.md``."""
    columns = [
        ("epsilon_target", "ε target"),
        ("epsilon", "ε spent"),
        ("delta", "δ"),
        ("tstr_auroc", "TSTR AUROC"),
        ("trtr_auroc", "TRTR AUROC"),
        ("discriminative_score", "disc. score"),
        ("discriminative_auroc", "disc. AUROC"),
        ("membership_inference_auroc", "MIA AUROC"),
        ("fit_seconds", "fit s"),
        ("time_ratio", "time / non-DP"),
    ]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for _, row in frame.iterrows():
        cells = []
        for key, _ in columns:
            value = row.get(key, math.nan)
            if isinstance(value, float) and math.isinf(value):
                cells.append("∞")
            elif key == "delta":
                cells.append(f"{value:.2g}" if value else "–")
            else:
                cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
