"""The surface every synthesizer shares: fit, sample, sample_to, save, seeds, devices, DP seam."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import synthmed
from synthmed.cohort import Cohort
from synthmed.errors import DataError, ModelFileError, NotFittedError, SchemaError, SynthmedError
from synthmed.models import distributed
from synthmed.models.persistence import save_model_file
from synthmed.models.rejection import (
    FILTER_MAX_PATIENTS,
    FilterCascade,
    RejectionFilter,
    draft_and_keep,
    drafts_per_slot,
)
from synthmed.schema import Schema

DEVICES = ("auto", "cpu", "cuda")
ID_PREFIX = "syn-"
#: Names of the rejection filter's tensors in a model file start with this.
FILTER_PREFIX = "rejection_filter."
#: Drafts generated at once under rejection sampling: a block of patients, each drafted about
#: 1 / (the share kept) times, so that a cascade's lower share does not raise the memory held.
DRAFTS_AT_ONCE = 3 * 8192
#: Drafts per training patient that the rejection filter's classifier learns from: more
#: than one lets it see the model's own distribution better (hourly PhysioNet, seeds 0 / 1:
#: discriminative score 0.147 / 0.150 with 3, against 0.151 / 0.159 with 1).
FILTER_DRAFTS = 3


@dataclasses.dataclass
class GeneratedBatch:
    """What a model's ``_generate`` returns: static rows and padded sequences of n patients.

    ``times`` are absolute (non-decreasing, >= 0), ``values`` hold NaN where unobserved and
    category codes for categorical temporal variables, ``lengths`` count each patient's steps.
    """

    static: pd.DataFrame
    times: np.ndarray
    values: np.ndarray
    lengths: np.ndarray


def pad_steps(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    """``array`` (patients on axis 0, steps on axis 1) padded with ``fill`` to ``width`` steps;
    unchanged when it already has as many."""
    missing = width - array.shape[1]
    if missing <= 0:
        return array
    pad = [(0, 0), (0, missing)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=fill)


def moving_average(
    module: torch.nn.Module,
    epochs: float,
    batches_per_epoch: int,
    state: dict[str, Any] | None = None,
) -> AveragedModel:
    """An exponential moving average of ``module``'s weights spanning about the last ``epochs``
    epochs (decay ``1 - 1 / (epochs * batches_per_epoch)`` per minibatch); call its
    ``update_parameters(module)`` after every optimiser step.

    ``state`` is a saved average to resume (a checkpoint's); without one the average starts
    from ``module``'s current weights, so build it after loading a resumed module."""
    decay = 1.0 - 1.0 / (epochs * max(batches_per_epoch, 1))
    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if state is not None:
        averaged.load_state_dict(state)
    return averaged


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device; use 'auto'")
    return torch.device(device)


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/k"`` or ``(i, k)`` → ``(i, k)`` with ``0 <= i < k``; None means the whole run."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(x) for x in (shard.split("/") if isinstance(shard, str) else shard))
    except (ValueError, TypeError):
        raise ValueError(f"shard must look like 'i/k' (e.g. '0/4'), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: need 0 <= i < k")
    return index, count


class Synthesizer(abc.ABC):
    """Base class of every synthmed generator.

    Settings go to the constructor, learning happens in :meth:`fit`, and fitted state ends with a
    trailing underscore. Subclasses implement ``_fit``, ``_generate``, ``_get_state`` and
    ``_set_state``; everything a user calls lives here, so every generator behaves the same.

    Args:
        epochs: Passes over the training patients. A model whose ``epochs_from_data`` is true
            also takes None and chooses them from the training cohort. Either way ``fit`` records
            them in ``epochs_``.
        batch_size: Patients per optimisation step.
        seed: Seed for training and, unless ``sample`` gets its own, for sampling. Same data,
            seed and settings give identical output on CPU. None draws a fresh seed (recorded).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        verbose: Show progress bars.
        epsilon, delta: Train with differential privacy (DP-SGD) to this budget; None trains
            without. ``delta`` defaults to ``1 / n_patients**1.1``.
        max_grad_norm: Per-patient gradient clipping bound under DP.
        rejection_sampling: None (default) samples the model as it is. A share in (0, 1) turns
            on discriminator rejection sampling (:mod:`synthmed.models.rejection`): after
            training, a classifier learns to tell the model's drafts from the training patients,
            and sampling keeps each draft with a probability that grows with how real it looks,
            so that about this share of drafts is kept. Lower shares give patients closer to
            the real ones and slower sampling. Not available with ``epsilon``: the classifier
            reads the real patients outside the DP accounting.
        rejection_stages: Filters applied in turn (:class:`~synthmed.models.rejection.
            FilterCascade`), each fitted on the drafts the ones before it keep and keeping
            ``rejection_sampling`` of them, so about ``rejection_sampling ** rejection_stages``
            of all drafts are kept. Each stage catches part of what the ones before it missed
            (the LSTM on PhysioNet's raw stays, discriminative score: 0.26 unfiltered, 0.20
            with one stage of 0.35, 0.17 with two, 0.13 with three; one filter keeping as few
            drafts does not do it), and each divides the sampling speed by three or more. Only
            read with ``rejection_sampling``.
    """

    model_type: ClassVar[str]
    #: Whether ``_fit`` saves and restores checkpoints (``fit(checkpoint_dir=...)``).
    supports_checkpoints: ClassVar[bool] = False
    #: Whether ``epochs=None`` is allowed: ``_fit`` then sets ``epochs_`` from the data.
    epochs_from_data: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type[Synthesizer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls) and "model_type" in cls.__dict__:
            Synthesizer._registry[cls.model_type] = cls

    @classmethod
    def registry(cls) -> dict[str, type[Synthesizer]]:
        return dict(Synthesizer._registry)

    def __init__(
        self,
        *,
        epochs: int | None,
        batch_size: int,
        seed: int | None = 0,
        device: str = "auto",
        verbose: bool = True,
        epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        rejection_sampling: float | None = None,
        rejection_stages: int = 1,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.verbose = verbose
        self.epsilon = epsilon
        self.delta = delta
        self.max_grad_norm = max_grad_norm
        self.rejection_sampling = rejection_sampling
        self.rejection_stages = rejection_stages
        self._check_shared_settings()

    def _check_shared_settings(self) -> None:
        for name, may_be_none in (("epochs", self.epochs_from_data), ("batch_size", False)):
            value = getattr(self, name)
            if value is None and may_be_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                alternative = " or None (chosen from the data by fit)" if may_be_none else ""
                raise ValueError(f"{name} must be a positive integer{alternative}, got {value!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.epsilon is not None and not (
            isinstance(self.epsilon, int | float)
            and math.isfinite(self.epsilon)
            and self.epsilon > 0
        ):
            raise ValueError(
                f"epsilon must be a positive finite number (or None for no DP), got {self.epsilon!r}"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        share = self.rejection_sampling
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
                raise ValueError(
                    "rejection_sampling must be None or the share of drafts to keep, in (0, 1), "
                    f"got {share!r}"
                )
            if self.epsilon is not None:
                raise ValueError(
                    "rejection_sampling cannot be combined with epsilon: its classifier reads "
                    "the real training patients outside the DP accounting"
                )
        stages = self.rejection_stages
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"rejection_stages must be a positive integer, got {stages!r}")

    # -- settings --------------------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        names = []
        for klass in cls.__mro__:
            if klass is object or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    names.append(p.name)
            if klass is Synthesizer:
                break
        # A subclass whose constructor does not take a shared setting (one written before the
        # setting existed) keeps that setting at its default, and does not report it.
        own = inspect.signature(cls.__init__).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            accepted = {p.name for p in own}
            names = [name for name in names if name in accepted]
        return list(dict.fromkeys(names))

    def get_params(self) -> dict[str, Any]:
        """The constructor settings, as a dict (JSON-friendly)."""
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            params[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return params

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({settings})"

    # -- fitting ---------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "schema_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(cohort) first"
            )

    def fit(
        self,
        cohort: Cohort,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        checkpoint_every: int = 1,
    ) -> Synthesizer:
        """Learn the distribution of ``cohort``'s patients; returns ``self``.

        Args:
            cohort: The training patients.
            checkpoint_dir: Save the training state (weights, optimizer, RNG states, epoch and,
                under DP, the accountant) there every ``checkpoint_every`` epochs.
            resume: Continue from the checkpoint in ``checkpoint_dir`` when there is one. A
                resumed run ends with the same weights as an uninterrupted one on CPU.
        """
        if not isinstance(cohort, Cohort):
            raise DataError(
                f"fit expects a synthmed.Cohort, got {type(cohort).__name__}; build one with "
                "Cohort(static, events) or Cohort.from_long(df, id=..., time=..., static=[...])"
            )
        self._check_shared_settings()
        if checkpoint_dir is not None and not self.supports_checkpoints:
            raise ValueError(
                f"{type(self).__name__} does not save training checkpoints yet; "
                "fit without checkpoint_dir"
            )
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or (checkpoint_every < 1)
        ):
            raise ValueError(
                f"checkpoint_every must be a positive integer, got {checkpoint_every!r}"
            )
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._checkpoint_every = checkpoint_every
        self._resume = resume
        self._fingerprint = _run_fingerprint(self.get_params(), cohort)
        # Under torchrun (WORLD_SIZE > 1) this joins the process group; otherwise a no-op.
        self.device_ = distributed.setup(resolve_device(self.device))
        self.seed_ = (
            self.seed if self.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
        )
        self.n_train_patients_ = cohort.n_patients
        self.epochs_ = self.epochs  # a model with epochs_from_data sets it in _fit
        self.id_prefix_ = _fresh_prefix(cohort.ids)
        self.history_ = pd.DataFrame()
        self.privacy_spent_: tuple[float, float] | None = None
        self.rejection_filter_: FilterCascade | None = None
        self._sample_calls = 0
        started = time.perf_counter()
        # Set first (a model may sample its own patients at the end of _fit); a failed fit
        # leaves the synthesizer unfitted.
        self.schema_ = cohort.schema
        try:
            with torch.random.fork_rng(
                devices=[self.device_] if self.device_.type == "cuda" else []
            ):
                torch.manual_seed(self.seed_)
                generator = torch.Generator(device="cpu").manual_seed(self.seed_)
                self._fit(cohort, generator)
                if self.rejection_sampling is not None:
                    self._fit_rejection_filter(cohort, generator)
        except BaseException:
            del self.schema_
            raise
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @abc.abstractmethod
    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        """Train on ``cohort``; fill ``self.history_``. Torch's RNG is already seeded."""

    def _fit_rejection_filter(self, cohort: Cohort, generator: torch.Generator) -> None:
        """Fit ``rejection_filter_``, stage by stage: each stage learns the training patients
        (up to the filter's cap) against ``FILTER_DRAFTS`` times as many drafts that the stages
        before it keep, and is calibrated on as many such drafts again as there are training
        patients."""
        n = min(cohort.n_patients, FILTER_MAX_PATIENTS)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        draws = torch.Generator(device=self.device_).manual_seed(seed)
        stages: list[RejectionFilter] = []
        for stage in range(self.rejection_stages):
            with torch.no_grad():
                drafts, calibration = (
                    self._batch_cohort(
                        self._draft(self._conditions_frame(k * n, None), draws, stages)
                    )
                    for k in (FILTER_DRAFTS, 1)
                )
            stages.append(
                RejectionFilter.fit(
                    cohort, drafts, calibration, self.rejection_sampling, (seed + stage) % 2**32
                )
            )
        self.rejection_filter_ = FilterCascade(stages)

    def _draft(
        self, frame: pd.DataFrame, generator: torch.Generator, stages: list[RejectionFilter]
    ) -> GeneratedBatch:
        """One patient per row of ``frame``, through the filter ``stages`` if there are any."""
        if not stages:
            return self._generate(frame, generator)
        return self._generate_kept(frame, generator, FilterCascade(stages))[0]

    # -- checkpoints (used by the models' training loops) -----------------------------------------

    def _checkpoint_due(self, epoch: int) -> bool:
        """Whether the loop should call ``_save_checkpoint`` after finishing ``epoch`` (0-based)."""
        return self._checkpoint_dir is not None and (epoch + 1) % self._checkpoint_every == 0

    def _save_checkpoint(
        self,
        epoch: int,
        state: dict[str, Any],
        generator: torch.Generator,
        generators: Mapping[str, torch.Generator] | None = None,
    ) -> None:
        """Atomically save the loop's ``state`` (state dicts, counters...) after ``epoch``.

        The torch RNG, the data-order ``generator``, the loop's own ``generators`` (by name: noise,
        shuffling...) and the history are saved alongside, so that a resumed run draws the same
        numbers as an uninterrupted one. Under DP the accountant's state is saved too.
        """
        assert self._checkpoint_dir is not None
        if not distributed.is_main_process():
            return
        self._checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "fingerprint": self._fingerprint,
            "epoch": epoch,
            "state": state,
            "torch_rng": torch.get_rng_state(),
            "generator_rng": generator.get_state(),
            "generators": {name: g.get_state() for name, g in (generators or {}).items()},
            "history": json.dumps(self.history_.to_dict(orient="list")),
        }
        if self.epsilon is not None:
            from synthmed.models.privacy import checkpoint_state

            payload["privacy"] = checkpoint_state(self)
        path = self._checkpoint_dir / "checkpoint.pt"
        temporary = path.with_name(".checkpoint.pt.tmp")
        torch.save(payload, temporary)
        temporary.replace(path)

    def _load_checkpoint(
        self,
        generator: torch.Generator,
        generators: Mapping[str, torch.Generator] | None = None,
    ) -> tuple[int, dict[str, Any]] | None:
        """``(next_epoch, state)`` from the checkpoint when resuming, else None.

        Restores the torch RNG, ``generator``, the named ``generators`` saved with
        ``_save_checkpoint``, ``history_`` and, under DP, the accountant (so call it after
        ``_make_private``). Refuses a checkpoint written for other settings or other data.
        """
        if not self._resume:
            return None
        assert self._checkpoint_dir is not None
        path = self._checkpoint_dir / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same error
            raise ModelFileError(f"checkpoint {str(path)!r} is unreadable: {exc}") from None
        if payload.get("fingerprint") != self._fingerprint:
            raise ModelFileError(
                f"checkpoint {str(path)!r} belongs to a run with other settings or data; "
                "use another checkpoint_dir or resume=False"
            )
        saved_generators = payload.get("generators", {})
        missing = sorted(set(generators or {}) - set(saved_generators))
        if missing:
            raise ModelFileError(
                f"checkpoint {str(path)!r} lacks the state of the random generator(s) {missing}"
            )
        torch.set_rng_state(payload["torch_rng"])
        generator.set_state(payload["generator_rng"])
        for name, other in (generators or {}).items():
            other.set_state(saved_generators[name])
        self.history_ = pd.DataFrame(json.loads(payload["history"]))
        if payload.get("privacy") is not None:
            from synthmed.models.privacy import restore_checkpoint_state

            restore_checkpoint_state(self, payload["privacy"])
        return payload["epoch"] + 1, payload["state"]

    def _make_private(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        epochs: int,
        budget_fraction: float = 1.0,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader]:
        """The seam for DP-SGD: identity without ``epsilon``, Opacus with it.

        ``module`` must be everything that sees real data, ``data_loader`` must yield one item
        per patient, so one patient is one privacy unit. A model that trains several parts
        privately, one after the other, gives each a ``budget_fraction`` (summing to at most 1).
        """
        if self.epsilon is None:
            # Under torchrun: DistributedDataParallel and a per-rank share of every minibatch
            # (a model may set ``distributed_strategy = "allreduce"``); otherwise identity.
            module, data_loader = distributed.parallelize(
                module,
                data_loader,
                self.device_,
                self.seed_,
                optimizer=optimizer,
                strategy=getattr(self, "distributed_strategy", "ddp"),
            )
            return module, optimizer, data_loader
        if distributed.is_distributed():
            raise SynthmedError(
                "differentially private training under torchrun is not supported; "
                "train with epsilon in a single process"
            )
        from synthmed.models.privacy import make_private

        return make_private(
            self, module, optimizer, data_loader, epochs, budget_fraction=budget_fraction
        )

    @property
    def privacy_spent(self) -> tuple[float, float] | None:
        """The (epsilon, delta) spent by DP training, or None for a non-private model."""
        self._check_fitted()
        return self.privacy_spent_

    # -- sampling --------------------------------------------------------------------------------

    def sample(
        self,
        n: int | None = None,
        conditions: Mapping[str, Any] | pd.DataFrame | None = None,
        seed: int | None = None,
    ) -> Cohort:
        """Generate ``n`` synthetic patients.

        Args:
            n: Number of patients. With a DataFrame of conditions it may be omitted (one patient
                per row) and must otherwise equal the number of rows.
            conditions: Fixed static values for every patient (a dict, e.g.
                ``{"In-hospital_death": 1}``), or a DataFrame of static rows, one patient per row
                (NaN cells are drawn freely). Every patient satisfies its conditions exactly.
            seed: Seed for this call. Without one, calls draw from a stream seeded by the
                constructor's ``seed``, so a script's sequence of calls is reproducible.
        """
        self._check_fitted()
        frame = self._conditions_frame(n, conditions)
        seed = self._call_seed(seed)
        cohort = self._sample_chunk(frame, seed, first_id=0)
        return cohort

    def _call_seed(self, seed: int | None) -> int:
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            return int(seed)
        self._sample_calls += 1
        if self._sample_calls == 1:
            return self.seed_
        return int(np.random.SeedSequence([self.seed_, self._sample_calls]).generate_state(1)[0])

    def _sample_chunk(self, frame: pd.DataFrame, seed: int, first_id: int) -> Cohort:
        generator = torch.Generator(device=self.device_).manual_seed(seed)
        metadata = self._provenance(seed)
        with torch.no_grad():
            if self.rejection_filter_ is None:
                batch = self._generate(frame, generator)
            else:
                batch, metadata["rejection_sampling"] = self._generate_kept(
                    frame, generator, self.rejection_filter_
                )
        ids = pd.Index(
            [f"{self.id_prefix_}{i:08d}" for i in range(first_id, first_id + len(frame))],
            name=self.schema_.id_column,
        )
        _check_conditions(batch.static[self.schema_.static_columns].set_axis(ids), frame)
        return self._batch_cohort(batch, ids, metadata)

    def _batch_cohort(
        self,
        batch: GeneratedBatch,
        ids: pd.Index | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Cohort:
        if ids is None:
            ids = pd.RangeIndex(len(batch.lengths), name=self.schema_.id_column)
        static = batch.static[self.schema_.static_columns].set_axis(ids)
        return Cohort.from_arrays(
            static, batch.times, batch.values, batch.lengths, self.schema_, metadata=metadata
        )

    def _generate_kept(
        self, frame: pd.DataFrame, generator: torch.Generator, filter_: FilterCascade
    ) -> tuple[GeneratedBatch, dict[str, int]]:
        """One patient per row of ``frame``, each the first of its drafts ``filter_`` keeps
        (drafts of a row share its conditions); with the counts of drafts for the metadata.
        Rows are drafted in blocks, and only the kept drafts of a block are held on to."""

        def passes(batch: GeneratedBatch, draws: np.ndarray) -> np.ndarray:
            return filter_.passes(self._batch_cohort(batch), draws)

        def uniform(k: int) -> np.ndarray:
            return (
                torch.rand(k, generator=generator, device=generator.device).double().cpu().numpy()
            )

        pieces = []
        counts = {"drafted": 0, "kept": len(frame), "forced": 0}
        block_size = max(1, DRAFTS_AT_ONCE // drafts_per_slot(filter_.acceptance))
        for start in range(0, len(frame), block_size):
            block = frame.iloc[start : start + block_size].reset_index(drop=True)

            def draft(slots: np.ndarray, block: pd.DataFrame = block) -> GeneratedBatch:
                return self._generate(block.iloc[slots].reset_index(drop=True), generator)

            kept = draft_and_keep(len(block), draft, passes, uniform, filter_.acceptance)
            counts["drafted"] += kept.drafted
            counts["forced"] += kept.forced
            for k, drafted in enumerate(kept.parts):
                mine = np.flatnonzero(kept.choice[:, 0] == k)
                rows = kept.choice[mine, 1]
                pieces.append(
                    (
                        start + mine,
                        drafted.times[rows],
                        drafted.values[rows],
                        drafted.lengths[rows],
                        drafted.static.iloc[rows].set_axis(start + mine),
                    )
                )
        width = max(piece[1].shape[1] for piece in pieces)
        n_values = pieces[0][2].shape[2]
        times = np.zeros((len(frame), width))
        values = np.full((len(frame), width, n_values), np.nan)
        lengths = np.zeros(len(frame), dtype=np.int64)
        for positions, piece_times, piece_values, piece_lengths, _ in pieces:
            times[positions] = pad_steps(piece_times, width, 0.0)
            values[positions] = pad_steps(piece_values, width, np.nan)
            lengths[positions] = piece_lengths
        static = pd.concat([piece[4] for piece in pieces]).sort_index()
        return GeneratedBatch(static, times, values, lengths), counts

    def _provenance(self, seed: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "source": "synthetic",
            "generator": type(self).__name__,
            "model_type": self.model_type,
            "settings": _json_safe(self.get_params()),
            "epochs": self.epochs_,
            "seed": seed,
            "n_train_patients": self.n_train_patients_,
            "synthmed_version": synthmed.__version__,
        }
        if self.privacy_spent_ is not None:
            metadata["epsilon"], metadata["delta"] = self.privacy_spent_
        return metadata

    @abc.abstractmethod
    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        """Generate one patient per row of ``conditions`` (NaN cells are free)."""

    def sample_to(
        self,
        path: str | Path,
        n: int,
        chunk_size: int = 10_000,
        seed: int | None = None,
        shard: str | tuple[int, int] | None = None,
        conditions: Mapping[str, Any] | None = None,
    ) -> Path:
        """Stream ``n`` patients into a Parquet dataset folder in bounded memory.

        Patients are generated in chunks of ``chunk_size``; chunk ``c`` holds patients
        ``c * chunk_size ...`` and is seeded from ``(seed, c)`` alone, so any chunk can be made
        independently. ``shard="i/k"`` makes only the chunks ``c`` with ``c % k == i``: k workers
        with the same seed and chunk size write disjoint files whose union is the unsharded run.
        Each chunk is written to a temporary name and renamed; a manifest written last lists
        the files, so a partial dataset is detectable.
        """
        self._check_fitted()
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if conditions is not None and not isinstance(conditions, Mapping):
            raise ValueError("sample_to takes conditions as a dict of fixed static values")
        index, count = parse_shard(shard)
        base_seed = self._call_seed(seed)
        folder = Path(path)
        if not distributed.is_main_process():
            return folder  # under torchrun only rank 0 writes
        folder.mkdir(parents=True, exist_ok=True)
        n_chunks = math.ceil(n / chunk_size)
        mine = range(index, n_chunks, count)
        files, written = [], 0
        for chunk in tqdm(mine, desc="sampling", unit="chunk", disable=not self.verbose):
            first = chunk * chunk_size
            size = min(chunk_size, n - first)
            frame = self._conditions_frame(size, conditions)
            chunk_seed = int(np.random.SeedSequence([base_seed, chunk]).generate_state(1)[0])
            cohort = self._sample_chunk(frame, chunk_seed, first_id=first)
            name = f"part-{chunk:06d}.parquet"
            cohort.to_parquet(folder / name)
            files.append(name)
            written += size
        manifest = {
            "format": "synthmed-dataset",
            "n_patients_total": n,
            "n_patients": written,
            "chunk_size": chunk_size,
            "seed": base_seed,
            "shard": [index, count],
            "files": files,
            "generator": type(self).__name__,
        }
        name = "_manifest.json" if count == 1 else f"_manifest-{index}-of-{count}.json"
        temporary = folder / f".{name}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2))
        temporary.replace(folder / name)
        return folder

    def _conditions_frame(
        self, n: int | None, conditions: Mapping[str, Any] | pd.DataFrame | None
    ) -> pd.DataFrame:
        """One row per patient to generate, all static columns, NaN where not conditioned."""
        schema = self.schema_
        if isinstance(conditions, pd.DataFrame):
            if n is not None and n != len(conditions):
                raise ValueError(
                    f"n={n} but the conditions DataFrame has {len(conditions)} rows; "
                    "pass n=None to generate one patient per row"
                )
            n = len(conditions)
            given = conditions.reset_index(drop=True)
        elif conditions is None or isinstance(conditions, Mapping):
            given = pd.DataFrame({k: [v] * (n or 0) for k, v in dict(conditions or {}).items()})
        else:
            raise ValueError(
                f"conditions must be a dict or a DataFrame, got {type(conditions).__name__}"
            )
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        for name in given.columns:
            _check_condition_column(schema, name, given[name])
        frame = pd.DataFrame(index=pd.RangeIndex(int(n)))
        for name in schema.static_columns:
            if name in given.columns:
                frame[name] = given[name].to_numpy()
            else:
                frame[name] = np.nan if schema[name].kind == "numeric" else None
        return frame

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Save the fitted model to one file (JSON settings + tensors, no pickle)."""
        self._check_fitted()
        if not distributed.is_main_process():
            return Path(path)  # under torchrun only rank 0 writes
        state, tensors = self._get_state()
        config: dict[str, Any] = {
            "params": _json_safe(self.get_params()),
            "schema": self.schema_.to_dict(),
            "fitted": {
                "seed_": self.seed_,
                "n_train_patients_": self.n_train_patients_,
                "epochs_": self.epochs_,
                "id_prefix_": self.id_prefix_,
                "fit_seconds_": self.fit_seconds_,
                "privacy_spent_": list(self.privacy_spent_) if self.privacy_spent_ else None,
                "history_": self.history_.to_dict(orient="split", index=False),
            },
            "rejection_filter": None,
            "state": state,
            "synthmed_version": synthmed.__version__,
        }
        if self.rejection_filter_ is not None:
            filter_config, filter_tensors = self.rejection_filter_.to_state()
            config["rejection_filter"] = filter_config
            tensors = {**tensors, **{FILTER_PREFIX + k: v for k, v in filter_tensors.items()}}
        return save_model_file(path, self.model_type, config, tensors)

    @classmethod
    def _from_saved(
        cls,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        device: str | None = None,
        source: str = "",
    ) -> Synthesizer:
        try:
            params = dict(config["params"])
            if device is not None:
                params["device"] = device
            model = cls(**_params_from_json(cls, params))
            fitted = config["fitted"]
            model.schema_ = Schema.from_dict(config["schema"])
            model.device_ = resolve_device(model.device)
            model.seed_ = fitted["seed_"]
            model.n_train_patients_ = fitted["n_train_patients_"]
            # Files written before epochs could be chosen by fit always name them.
            model.epochs_ = fitted.get("epochs_", model.epochs)
            model.id_prefix_ = fitted["id_prefix_"]
            model.fit_seconds_ = fitted["fit_seconds_"]
            spent = fitted["privacy_spent_"]
            model.privacy_spent_ = tuple(spent) if spent else None
            history = fitted["history_"]
            model.history_ = pd.DataFrame(history["data"], columns=history["columns"])
            model._sample_calls = 0
            filter_tensors = {
                k[len(FILTER_PREFIX) :]: v
                for k, v in tensors.items()
                if k.startswith(FILTER_PREFIX)
            }
            tensors = {k: v for k, v in tensors.items() if not k.startswith(FILTER_PREFIX)}
            # Files written before rejection sampling existed have no filter.
            filter_config = config.get("rejection_filter")
            model.rejection_filter_ = (
                FilterCascade.from_state(filter_config, filter_tensors) if filter_config else None
            )
            model._set_state(config["state"], tensors)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, SchemaError) as exc:
            raise ModelFileError(
                f"{source or 'the model file'} does not match a {cls.__name__}: {exc}"
            ) from None
        return model

    @abc.abstractmethod
    def _get_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The fitted state: JSON-friendly settings and named tensors."""

    @abc.abstractmethod
    def _set_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild the fitted model from ``_get_state``'s output (strict about shapes)."""


def _run_fingerprint(params: dict[str, Any], cohort: Cohort) -> str:
    """A digest of the settings and the training data, so a checkpoint resumes only its own run."""
    digest = hashlib.sha256(json.dumps(_json_safe(params), sort_keys=True).encode())
    digest.update(pd.util.hash_pandas_object(cohort.events, index=False).to_numpy().tobytes())
    digest.update(pd.util.hash_pandas_object(cohort.static).to_numpy().tobytes())
    return digest.hexdigest()


def _fresh_prefix(real_ids: pd.Index) -> str:
    """An id prefix that no real patient id starts with, so synthetic ids never equal real ones."""
    as_text = pd.Index(real_ids.astype(str))
    prefix = ID_PREFIX
    while as_text.str.startswith(prefix).any():
        prefix = "x" + prefix
    return prefix


def _check_condition_column(schema: Schema, name: Any, values: pd.Series) -> None:
    if name not in schema.columns:
        raise SchemaError(
            f"condition column {name!r} is not in the model's schema; static columns are "
            f"{schema.static_columns}"
        )
    column = schema[name]
    if not column.is_static:
        raise SchemaError(
            f"condition column {name!r} is temporal; conditions fix static columns only "
            f"({schema.static_columns})"
        )
    given = values.dropna()
    if column.kind == "numeric":
        numbers = pd.to_numeric(given, errors="coerce")
        if numbers.isna().any():
            raise DataError(
                f"condition column {name!r}: {given[numbers.isna()].iloc[0]!r} is not a number"
            )
        lower, upper = column.bounds
        outside = (numbers < lower) | (numbers > upper)
        if outside.any():
            raise DataError(
                f"condition column {name!r}: {numbers[outside].iloc[0]!r} is outside the "
                f"schema's bounds [{column.lower}, {column.upper}]"
            )
        return
    allowed = set(column.categories) | {
        float(c) for c in column.categories if isinstance(c, int | float)
    }
    unknown = [v for v in given if v not in allowed]
    if unknown:
        raise DataError(
            f"condition column {name!r}: category {unknown[0]!r} was never seen in training; "
            f"known categories: {list(column.categories)}"
        )


def _check_conditions(static: pd.DataFrame, frame: pd.DataFrame) -> None:
    """Guard the promise that every patient satisfies its conditions exactly."""
    for name in frame.columns:
        given = frame[name].notna().to_numpy()
        if not given.any():
            continue
        produced = static[name].to_numpy(dtype=object)[given]
        wanted = frame[name].to_numpy(dtype=object)[given]
        equal = (produced == wanted).astype(bool)
        if not equal.all():
            i = int(np.flatnonzero(~equal)[0])
            raise RuntimeError(
                f"internal error: a generated patient has {name}={produced[i]!r} but the "
                f"condition asked for {wanted[i]!r}; please report this"
            )


def _json_safe(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


def _params_from_json(cls: type[Synthesizer], params: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved settings; a ``config`` dict becomes ``cls.config_class``."""
    config_cls = getattr(cls, "config_class", None)
    return {
        name: config_cls(**value)
        if name == "config" and config_cls is not None and isinstance(value, dict)
        else value
        for name, value in params.items()
    }
