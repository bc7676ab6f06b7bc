"""Glue shared by the SDV baselines: the optional import, RNG control, quiet SDV calls.

SDV (and its RDT, Copulas and DeepEcho dependencies) is an optional extra under the BUSL-1.1
licence, so nothing here imports it at module import time: :func:`require_sdv` does, on first use,
and turns its absence into a :class:`~synthmed.errors.MissingDependencyError`.

Randomness in SDV lives in several places, none of which takes a seed argument:

- numpy's and torch's *global* generators (DeepEcho's PAR samples with ``torch.distributions``;
  Copulas and RDT draw with ``np.random``);
- one ``numpy.random.RandomState`` per RDT transformer (missing-value insertion, category
  encoding), reset by SDV to fixed seeds after ``fit``;
- the Copulas model's own random state, which SDV fixes on the first ``sample`` call.

:func:`seeded_sdv` sets all of them from one integer for the duration of a call and restores the
global generators afterwards, so the caller's own random streams are left untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from synthmed.errors import MissingDependencyError

INSTALL_HINT = "pip install synthmed[sdv]"


def require_sdv(feature: str) -> Any:
    """Import and return the ``sdv`` package, or raise a clear error naming the extra.

    Args:
        feature: What needs SDV, for the message (e.g. ``"PARBaseline"``).

    Raises:
        MissingDependencyError: SDV is not installed (or cannot be imported).
    """
    try:
        return importlib.import_module("sdv")
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the optional SDV dependency (BUSL-1.1 licence), which is not "
            f"installed: {INSTALL_HINT}  ({exc})"
        ) from None


def seed_from_generator(generator: torch.Generator) -> int:
    """A 31-bit integer seed drawn from a torch generator (so each call gets its own stream)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def _transformers(synthesizer: Any) -> list[Any]:
    processor = getattr(synthesizer, "_data_processor", None)
    hyper = getattr(processor, "_hyper_transformer", None)
    fields = getattr(hyper, "field_transformers", None) or {}
    return [t for t in fields.values() if t is not None and hasattr(t, "reset_randomization")]


def reseed_synthesizer(synthesizer: Any, seed: int) -> None:
    """Reseed an SDV single-table or PAR synthesizer's private random states from ``seed``.

    Covers every RDT transformer of its data processor, the Copulas model (single-table
    synthesizers) and, for PAR, the context synthesizer and its transformers.
    """
    streams = np.random.SeedSequence(seed).generate_state(64)
    for i, transformer in enumerate(_transformers(synthesizer)):
        transformer.random_seed = int(streams[i % len(streams)] % (2**31 - 2))
        transformer.reset_randomization()
    if getattr(synthesizer, "_model", None) is not None and hasattr(
        synthesizer._model, "set_random_state"
    ):
        synthesizer._set_random_state(int(streams[-1] % (2**31 - 1)))
    context = getattr(synthesizer, "_context_synthesizer", None)
    if context is not None:
        reseed_synthesizer(context, int(streams[-2] % (2**31 - 1)))


@contextlib.contextmanager
def seeded_sdv(seed: int, synthesizer: Any | None = None) -> Iterator[None]:
    """Seed numpy's and torch's global generators (and ``synthesizer``'s own states) for a block.

    The global generators are restored on exit. CUDA kernels are not bitwise deterministic, so
    only CPU runs are guaranteed to repeat exactly.
    """
    saved = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(seed % (2**32 - 1))
            torch.manual_seed(seed)
            if synthesizer is not None:
                reseed_synthesizer(synthesizer, seed)
            yield
    finally:
        np.random.set_state(saved)


@contextlib.contextmanager
def quiet_sdv(verbose: bool = True) -> Iterator[None]:
    """Silence SDV's warnings and INFO logs; without ``verbose`` also its progress bars."""
    loggers = [logging.getLogger(name) for name in ("sdv", "rdt", "copulas", "deepecho")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.WARNING))
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if not verbose:
                # SDV draws some tqdm bars it offers no switch for (conditional sampling).
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_no_dp(name: str, epsilon: float | None) -> None:
    """The SDV baselines cannot train with differential privacy; say so at construction."""
    if epsilon is not None:
        raise ValueError(
            f"{name} does not support differential privacy (epsilon={epsilon!r}); SDV trains "
            "without DP-SGD. Use LSTMSynthesizer or CGANSynthesizer with epsilon=... instead"
        )
