"""SDV's PARSynthesizer (probabilistic autoregressive model) behind the synthmed surface."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from synthmed.baselines._sdv import (
    check_no_dp,
    quiet_sdv,
    require_sdv,
    seed_from_generator,
    seeded_sdv,
)
from synthmed.cohort import Cohort
from synthmed.encoding import category_codes
from synthmed.models.base import GeneratedBatch, Synthesizer
from synthmed.schema import Schema

TABLE_NAME = "cohort"


class PARBaseline(Synthesizer):
    """SDV's ``PARSynthesizer`` as a synthmed generator, the reference sequential baseline.

    The cohort's long table (:meth:`Cohort.to_sdv`) is modelled with the patient id as SDV's
    sequence key, the cohort's time column as the sequence index and every static column as a
    *context column*: SDV fits a GaussianCopula to the static rows and DeepEcho's PAR (a GRU) to
    the sequences conditioned on them.

    Args:
        epochs: PAR training epochs (SDV's default is 128).
        batch_size: Not used: DeepEcho trains on all sequences at once. Kept for the shared
            surface.
        seed: Seeds fitting and, unless ``sample`` gets its own, sampling. SDV takes no seed
            argument; synthmed seeds numpy's and torch's global generators, every RDT
            transformer and the context GaussianCopula around each ``fit`` and ``sample`` call,
            so the same data, seed and settings repeat exactly on CPU (not on CUDA).
        device: ``"cuda"`` trains PAR on the GPU (SDV's ``cuda=True``); ``"auto"`` picks it when
            available.
        verbose: Show SDV's progress bars.
        epsilon, delta, max_grad_norm: Differential privacy is not available for SDV models;
            ``epsilon`` must be None.
        rejection_sampling, rejection_stages: See :class:`~synthmed.models.base.Synthesizer`.
        segment_size: SDV's ``segment_size``: cut training sequences into segments of this many
            steps (None keeps whole sequences).
        sample_size: SDV's ``sample_size``: candidates drawn per sequence, the most likely kept.

    Conditions: ``sample(conditions=...)`` fixes context columns through SDV's
    ``sample_sequential_columns``: SDV draws the remaining context columns from its context
    GaussianCopula conditioned on the given ones, then PAR generates each sequence for its
    context. Rows with different sets of given columns are sampled in separate SDV calls.

    Saving: ``save()`` raises ``NotImplementedError``. PAR's fitted state is a graph of Python
    objects (RDT transformers, a Copulas model, DeepEcho's data maps and network) that SDV can
    only persist with pickle, which synthmed model files never contain. Keep the synthetic
    cohort (``sample(...).to_parquet(...)``) or refit from the data instead.

    Sampling is SDV's: one sequence at a time, step by step, in Python, which is why PAR is slow
    to sample (the benchmark measures it).
    """

    model_type = "par"

    def __init__(
        self,
        *,
        epochs: int = 128,
        batch_size: int = 1,
        seed: int | None = 0,
        device: str = "auto",
        verbose: bool = True,
        epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        rejection_sampling: float | None = None,
        rejection_stages: int = 1,
        segment_size: int | None = None,
        sample_size: int = 1,
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
        check_no_dp(type(self).__name__, epsilon)
        self.segment_size = segment_size
        self.sample_size = sample_size

    # -- fitting ---------------------------------------------------------------------------------

    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        require_sdv(type(self).__name__)
        from sdv.sequential import PARSynthesizer

        table, metadata = cohort.to_sdv(TABLE_NAME)
        with quiet_sdv(), seeded_sdv(self.seed_):
            model = PARSynthesizer(
                metadata,
                context_columns=list(cohort.static_columns),
                segment_size=self.segment_size,
                epochs=self.epochs,
                sample_size=self.sample_size,
                cuda=self.device_.type == "cuda",
                verbose=self.verbose,
            )
            model.fit({TABLE_NAME: table})
        self.sdv_synthesizer_ = model
        losses = model.get_loss_values()
        self.history_ = pd.DataFrame(
            {
                "epoch": pd.to_numeric(losses["Epoch"]).astype(int).to_numpy() + 1,
                "loss": pd.to_numeric(losses["Loss"]).to_numpy(dtype=float),
            }
        )

    # -- sampling --------------------------------------------------------------------------------

    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        schema = self.schema_
        static_columns = schema.static_columns
        given = conditions[static_columns].notna()
        patterns = given.apply(lambda row: tuple(row.to_numpy()), axis=1)
        n = len(conditions)
        static = pd.DataFrame(index=pd.RangeIndex(n), columns=static_columns, dtype=object)
        sequences: list[pd.DataFrame | None] = [None] * n
        for pattern in pd.unique(patterns):
            rows = np.flatnonzero((patterns == pattern).to_numpy())
            columns = [c for c, g in zip(static_columns, pattern, strict=True) if g]
            call_seed = seed_from_generator(generator)
            with quiet_sdv(self.verbose), seeded_sdv(call_seed, self.sdv_synthesizer_):
                if columns:
                    context = conditions.iloc[rows][columns].reset_index(drop=True)
                    context = _to_sdv_values(context, schema)
                    long = self.sdv_synthesizer_.sample_sequential_columns(context)[TABLE_NAME]
                else:
                    long = self.sdv_synthesizer_.sample_sequences(len(rows))[TABLE_NAME]
            _assign_sequences(long, rows, conditions, columns, schema, static, sequences)
        return _to_batch(static, sequences, schema)

    # -- persistence -----------------------------------------------------------------------------

    def _get_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotImplementedError(
            "PARBaseline cannot be saved: SDV's PARSynthesizer keeps its fitted state in Python "
            "objects (RDT transformers, a Copulas context model, DeepEcho's network and data "
            "maps) that SDV persists only with pickle, and synthmed model files never contain "
            "pickle. Save the synthetic cohort instead (sample(...).to_parquet(path)) or refit "
            "PARBaseline from the data."
        )

    def _set_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError("PARBaseline models cannot be loaded (they cannot be saved)")


# -- helpers -------------------------------------------------------------------------------------


def _category_lookup(categories: tuple) -> dict[Any, Any]:
    lookup = {c: c for c in categories}
    lookup.update({float(c): c for c in categories if isinstance(c, int | float)})
    return lookup


def _to_sdv_values(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Condition values as SDV saw them in training (numbers as floats, categories as is)."""
    out = frame.copy()
    for name in out.columns:
        if schema[name].kind == "numeric":
            out[name] = pd.to_numeric(out[name]).astype(float)
        else:
            lookup = _category_lookup(schema[name].categories)
            out[name] = out[name].map(lambda v, lookup=lookup: lookup.get(v, v))
    return out


def _schema_value(value: Any, lookup: dict[Any, Any]) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    return lookup.get(value, value)


def _assign_sequences(
    long: pd.DataFrame,
    rows: np.ndarray,
    conditions: pd.DataFrame,
    columns: list[str],
    schema: Schema,
    static: pd.DataFrame,
    sequences: list[pd.DataFrame | None],
) -> None:
    """Give each requested row one generated sequence whose context matches its conditions.

    SDV's conditional context sampling may return sequences in another order than asked; rows
    with equal conditions are interchangeable, so sequences are matched to rows by the values of
    the conditioned columns.
    """
    id_column = schema.id_column
    groups = list(long.groupby(id_column, sort=False))
    if len(groups) != len(rows):
        raise RuntimeError(
            f"SDV returned {len(groups)} sequences for {len(rows)} requested patients"
        )
    lookups = {
        c: _category_lookup(schema[c].categories)
        for c in schema.static_columns
        if schema[c].kind != "numeric"
    }

    def key(values: pd.Series) -> tuple:
        return tuple(
            _schema_value(values[c], lookups[c]) if c in lookups else float(values[c])
            for c in columns
        )

    waiting: dict[tuple, list[int]] = {}
    for row in rows:
        waiting.setdefault(key(conditions.iloc[row]), []).append(int(row))
    for _, sequence in groups:
        first = sequence.iloc[0]
        candidates = waiting.get(key(first))
        if not candidates:
            raise RuntimeError(
                f"SDV returned a sequence whose context {key(first)} matches no condition"
            )
        row = candidates.pop(0)
        for name in schema.static_columns:
            value = first[name]
            static.at[row, name] = (
                _schema_value(value, lookups[name]) if name in lookups else float(value)
            )
        sequences[row] = sequence


def _to_batch(
    static: pd.DataFrame, sequences: list[pd.DataFrame | None], schema: Schema
) -> GeneratedBatch:
    """Pad SDV's long output into arrays; steps where nothing was measured are dropped."""
    variables = schema.temporal_columns
    n = len(sequences)
    long = pd.concat(
        [s.assign(_row=i) for i, s in enumerate(sequences) if s is not None], ignore_index=True
    )
    observed = long[variables].notna().any(axis=1).to_numpy()
    long = long.loc[observed].reset_index(drop=True)
    row = long["_row"].to_numpy()
    step = long.groupby("_row", sort=False).cumcount().to_numpy()
    lengths = np.bincount(row, minlength=n).astype(np.int64)
    max_length = max(int(lengths.max()) if n else 0, 1)
    times = np.zeros((n, max_length))
    raw_times = np.clip(long[schema.time_column].to_numpy(dtype=float), 0.0, None)
    times[row, step] = raw_times
    # PAR's times are a cumulative sum of non-negative gaps; guard the order anyway.
    times = np.maximum.accumulate(times, axis=1)
    values = np.full((n, max_length, len(variables)), np.nan)
    for j, name in enumerate(variables):
        column = schema[name]
        if column.kind == "numeric":
            column_values = pd.to_numeric(long[name]).to_numpy(dtype=float)
            if column.integer:
                column_values = np.round(column_values)
        else:
            codes = category_codes(long[name], column.categories).astype(float)
            column_values = np.where(codes < 0, np.nan, codes)
        values[row, step, j] = column_values
    return GeneratedBatch(static=static, times=times, values=values, lengths=lengths)
