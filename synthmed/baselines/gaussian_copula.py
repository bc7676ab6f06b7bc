"""A flattened single-table GaussianCopula (SDV) behind the synthmed surface."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from synthmed.baselines._sdv import (
    check_no_dp,
    quiet_sdv,
    require_sdv,
    seed_from_generator,
    seeded_sdv,
)
from synthmed.cohort import Cohort
from synthmed.encoding import category_codes, decode_codes
from synthmed.errors import DataError, ModelFileError, SchemaError
from synthmed.models.base import GeneratedBatch, Synthesizer
from synthmed.schema import Schema

TABLE_NAME = "flat"
GRID_SEPARATOR = "@"
# Copulas clips probabilities to this before the inverse normal CDF.
EPSILON = float(np.finfo(np.float32).eps)


class GaussianCopulaBaseline(Synthesizer):
    """SDV's ``GaussianCopulaSynthesizer`` on a one-row-per-patient table, the simple baseline.

    Each patient becomes one row: the static columns, then every temporal variable's value on a
    fixed time grid of ``n_steps`` bins over ``[0, horizon]`` (the mean of the observations that
    fall in a bin, or the last one for categorical variables; NaN when the bin has none).
    SDV fits its GaussianCopula to that table with its defaults (RDT ``FloatFormatter`` with
    random missing values for numbers, ``UniformEncoder`` for categories, ``beta`` marginals).
    Sampling reverses the layout: every bin in which at least one variable is observed becomes
    one event at the bin's centre, so synthetic sequences have at most ``n_steps`` events on a
    regular grid; that coarseness is part of what this baseline measures.

    Sampling does not call SDV. After ``fit`` the learned model is exported as plain numbers:
    the copula's correlation matrix, each column's marginal (Copulas' ``to_dict``) and each RDT
    transformer's learned facts (null rate, min/max, rounding digits, category intervals).
    :meth:`sample` draws from that export with the same maths as SDV (a multivariate normal, the
    normal CDF, each marginal's inverse CDF, then the reverse transforms), which makes the model
    savable without pickle, exactly reproducible from ``seed`` and vectorised. Conditions are
    exact Gaussian conditioning: a given static value is mapped through its transform and
    marginal to the normal space (a category to the centre of its ``UniformEncoder`` interval)
    and the other columns are drawn from the conditional multivariate normal, as SDV's own
    GaussianCopula conditional sampling does.

    Args:
        n_steps: Number of time bins of the grid.
        horizon: End of the grid in the cohort's time unit; None uses the latest observation
            time in the training cohort. Later observations fall in the last bin.
        default_distribution: SDV's ``default_distribution`` for numerical marginals.
        epochs, batch_size: Not used (the copula is fitted in closed form); kept for the shared
            surface.
        seed: Seeds fitting (SDV draws a few random numbers while fitting) and, unless
            ``sample`` gets its own, sampling. Same data, seed and settings give identical
            output.
        device: Not used (numpy on CPU); kept for the shared surface.
        verbose: Show SDV's messages while fitting.
        epsilon, delta, max_grad_norm: Differential privacy is not available; ``epsilon`` must
            be None.
        rejection_sampling, rejection_stages: See :class:`~synthmed.models.base.Synthesizer`.
    """

    model_type = "gaussian-copula"

    def __init__(
        self,
        *,
        n_steps: int = 24,
        horizon: float | None = None,
        default_distribution: str = "beta",
        epochs: int = 1,
        batch_size: int = 1,
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
        check_no_dp(type(self).__name__, epsilon)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        if horizon is not None and not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a positive number or None, got {horizon!r}")
        self.n_steps = n_steps
        self.horizon = horizon
        self.default_distribution = default_distribution

    # -- fitting ---------------------------------------------------------------------------------

    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        require_sdv(type(self).__name__)
        from sdv.metadata import Metadata
        from sdv.single_table import GaussianCopulaSynthesizer

        schema = cohort.schema
        arrays = cohort.arrays
        horizon = self.horizon
        if horizon is None:
            latest = float(arrays.times.max()) if arrays.times.size else 0.0
            horizon = latest if latest > 0 else 1.0
        flat, grid_columns = flatten(cohort, self.n_steps, horizon)
        columns = {name: {"sdtype": _sdtype(schema[name].kind)} for name in schema.static_columns}
        for name, (variable, _) in grid_columns.items():
            columns[name] = {"sdtype": _sdtype(schema[variable].kind)}
        metadata = Metadata.load_from_dict(
            {"METADATA_SPEC_VERSION": "V1", "tables": {TABLE_NAME: {"columns": columns}}}
        )
        with quiet_sdv(self.verbose), seeded_sdv(self.seed_):
            model = GaussianCopulaSynthesizer(
                metadata, default_distribution=self.default_distribution
            )
            model.fit({TABLE_NAME: flat})
        copula = model._model.to_dict()
        transformers = model.get_transformers()
        self.horizon_ = float(horizon)
        self.grid_columns_ = grid_columns
        self.columns_ = list(copula["columns"])
        self.univariates_ = [_plain_dict(u) for u in copula["univariates"]]
        self.transforms_ = [
            _export_transformer(transformers[name], name, schema, grid_columns)
            for name in self.columns_
        ]
        correlation = np.nan_to_num(np.asarray(copula["correlation"], dtype=np.float64))
        np.fill_diagonal(correlation, 1.0)
        self.correlation_ = correlation
        self._build_marginals()
        self.history_ = pd.DataFrame(
            {"epoch": [1], "n_columns": [len(self.columns_)], "n_rows": [len(flat)]}
        )

    def _build_marginals(self) -> None:
        require_sdv(type(self).__name__)
        from copulas.univariate import Univariate

        self._marginals = [Univariate.from_dict(dict(u)) for u in self.univariates_]
        self._position = {name: i for i, name in enumerate(self.columns_)}

    # -- sampling --------------------------------------------------------------------------------

    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        schema = self.schema_
        rng = np.random.default_rng(seed_from_generator(generator))
        n, d = len(conditions), len(self.columns_)
        static_columns = [c for c in schema.static_columns if c in self._position]
        given = conditions[static_columns].notna().to_numpy()
        normal = np.empty((n, d))
        if given.shape[1]:
            patterns, pattern_of_row = np.unique(given, axis=0, return_inverse=True)
        else:  # no static columns: one unconditioned pattern
            patterns, pattern_of_row = np.zeros((1, 0), dtype=bool), np.zeros(n, dtype=np.int64)
        for p, pattern in enumerate(patterns):
            rows = np.flatnonzero(pattern_of_row.reshape(-1) == p)
            fixed = [self._position[c] for c, g in zip(static_columns, pattern, strict=True) if g]
            fixed_values = conditions.iloc[rows][
                [c for c, g in zip(static_columns, pattern, strict=True) if g]
            ]
            normal[rows] = self._draw_normal(rng, len(rows), fixed, fixed_values)
        uniform = stats.norm.cdf(normal)
        decoded = {
            name: self._reverse(j, self._marginals[j].percent_point(uniform[:, j]), rng)
            for j, name in enumerate(self.columns_)
        }
        static = pd.DataFrame(index=pd.RangeIndex(n))
        for name in schema.static_columns:
            column = schema[name]
            values = decoded.get(name)
            if values is None:
                values = np.full(n, np.nan if column.kind == "numeric" else None, dtype=object)
            if column.kind == "numeric":
                values = np.asarray(values, dtype=float)
                if column.integer:
                    values = np.round(values)
            free = conditions[name].isna().to_numpy()
            wanted = conditions[name].to_numpy(dtype=object)
            if column.kind == "numeric":
                static[name] = np.where(free, values, wanted).astype(float)
            else:
                canonical = {_key(c): c for c in column.categories}
                wanted = np.array([canonical.get(_key(v), v) for v in wanted], dtype=object)
                static[name] = pd.Series(np.where(free, values, wanted), dtype=object)
        return self._unflatten(static, decoded)

    def _draw_normal(
        self, rng: np.random.Generator, k: int, fixed: list[int], fixed_values: pd.DataFrame
    ) -> np.ndarray:
        """``k`` rows from the copula's normal, conditioned on the ``fixed`` columns' values."""
        d = len(self.columns_)
        noise = rng.standard_normal((k, d))
        if not fixed:
            return noise @ _psd_root(self.correlation_).T
        free = [j for j in range(d) if j not in fixed]
        fixed_normal = np.column_stack(
            [self._to_normal(j, fixed_values.iloc[:, i]) for i, j in enumerate(fixed)]
        )
        sigma = self.correlation_
        s_gg = sigma[np.ix_(fixed, fixed)]
        s_fg = sigma[np.ix_(free, fixed)]
        weights = s_fg @ np.linalg.pinv(s_gg)
        covariance = sigma[np.ix_(free, free)] - weights @ s_fg.T
        out = np.empty((k, d))
        out[:, fixed] = fixed_normal
        out[:, free] = fixed_normal @ weights.T + noise[:, : len(free)] @ _psd_root(covariance).T
        return out

    def _to_normal(self, j: int, values: pd.Series) -> np.ndarray:
        """Given static values of column ``j`` → the copula's standard-normal space."""
        transform = self.transforms_[j]
        if transform["kind"] == "float":
            x = pd.to_numeric(values).to_numpy(dtype=float)
        else:
            lookup = _category_index(transform["categories"])
            starts = np.asarray(transform["starts"] + [1.0])
            unknown = [v for v in values if _key(v) not in lookup]
            if unknown:
                raise DataError(
                    f"condition column {self.columns_[j]!r}: category {unknown[0]!r} never "
                    "occurred in the training data, so the copula cannot condition on it"
                )
            index = np.array([lookup[_key(v)] for v in values])
            x = (starts[index] + starts[index + 1]) / 2
        u = np.clip(self._marginals[j].cumulative_distribution(x), EPSILON, 1 - EPSILON)
        return stats.norm.ppf(u)

    def _reverse(self, j: int, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """RDT's reverse transform of column ``j`` from its learned facts."""
        transform = self.transforms_[j]
        if transform["kind"] == "float":
            missing = rng.random(len(x)) < transform["null_rate"]
            x = np.clip(x, transform["min"], transform["max"])
            if transform["digits"] is not None:
                x = np.round(x, transform["digits"])
            return np.where(missing, np.nan, x)
        starts = np.asarray(transform["starts"])
        index = np.clip(np.searchsorted(starts, np.clip(x, 0, 1), side="right") - 1, 0, None)
        return np.array(transform["categories"] + [None], dtype=object)[index]

    def _unflatten(self, static: pd.DataFrame, decoded: dict[str, np.ndarray]) -> GeneratedBatch:
        """Grid rows → events at bin centres; bins in which nothing is observed are dropped."""
        schema = self.schema_
        variables = schema.temporal_columns
        n = len(static)
        grid = np.full((n, self.n_steps, len(variables)), np.nan)
        for name, (variable, step) in self.grid_columns_.items():
            column = schema[variable]
            values = decoded[name]
            j = variables.index(variable)
            if column.kind == "numeric":
                values = np.asarray(values, dtype=float)
                grid[:, step, j] = np.round(values) if column.integer else values
            else:
                codes = category_codes(pd.Series(values, dtype=object), column.categories)
                grid[:, step, j] = np.where(codes < 0, np.nan, codes)
        observed = ~np.isnan(grid).all(axis=2)
        order = np.argsort(~observed, axis=1, kind="stable")
        lengths = observed.sum(axis=1).astype(np.int64)
        width = self.horizon_ / self.n_steps
        centres = (np.arange(self.n_steps) + 0.5) * width
        times = np.where(np.arange(self.n_steps)[None, :] < lengths[:, None], centres[order], 0.0)
        values = np.take_along_axis(grid, order[:, :, None], axis=1)
        return GeneratedBatch(static=static, times=times, values=values, lengths=lengths)

    # -- persistence -----------------------------------------------------------------------------

    def _get_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "horizon": self.horizon_,
            "grid_columns": {k: list(v) for k, v in self.grid_columns_.items()},
            "columns": self.columns_,
            "univariates": self.univariates_,
            "transforms": self.transforms_,
        }
        return config, {"correlation": torch.from_numpy(self.correlation_.copy())}

    def _set_state(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        correlation = tensors["correlation"].numpy().astype(np.float64)
        d = len(config["columns"])
        if correlation.shape != (d, d) or len(config["univariates"]) != d:
            raise ModelFileError(
                f"the copula has {d} columns but a correlation of shape {correlation.shape}"
            )
        self.horizon_ = float(config["horizon"])
        self.grid_columns_ = {k: (v[0], int(v[1])) for k, v in config["grid_columns"].items()}
        self.columns_ = list(config["columns"])
        self.univariates_ = list(config["univariates"])
        self.transforms_ = list(config["transforms"])
        self.correlation_ = correlation
        self._build_marginals()


# -- flattening ----------------------------------------------------------------------------------


def grid_column(variable: str, step: int) -> str:
    """Name of the flattened column holding ``variable`` in time bin ``step``."""
    return f"{variable}{GRID_SEPARATOR}{step}"


def flatten(
    cohort: Cohort, n_steps: int, horizon: float
) -> tuple[pd.DataFrame, dict[str, tuple[str, int]]]:
    """One row per patient: static columns, then each variable's value in each time bin.

    Returns the table and, for every grid column kept, its ``(variable, bin)``. Grid columns
    never observed in the cohort are left out (the copula cannot fit an empty column).
    """
    schema = cohort.schema
    arrays = cohort.arrays
    n, _, v = arrays.values.shape
    width = horizon / n_steps
    inside = arrays.step_mask
    patient, step = np.nonzero(inside)
    bins = np.clip((arrays.times[patient, step] / width).astype(np.int64), 0, n_steps - 1)
    values = arrays.values[patient, step].astype(np.float64)
    observed = ~np.isnan(values)
    sums = np.zeros((n, n_steps, v))
    counts = np.zeros((n, n_steps, v))
    np.add.at(sums, (patient, bins), np.where(observed, values, 0.0))
    np.add.at(counts, (patient, bins), observed)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = sums / counts
    last = np.full((n, n_steps, v), np.nan)
    for j in range(v):
        # Events are sorted by time, so the last assignment to a bin is its last observation.
        seen = observed[:, j]
        last[patient[seen], bins[seen], j] = values[seen, j]
    table: dict[str, Any] = {name: cohort.static[name].to_numpy() for name in schema.static_columns}
    grid_columns: dict[str, tuple[str, int]] = {}
    for j, variable in enumerate(schema.temporal_columns):
        column = schema[variable]
        for b in range(n_steps):
            name = grid_column(variable, b)
            if name in table:
                raise SchemaError(f"static column {name!r} collides with a flattened grid column")
            if not counts[:, b, j].any():
                continue
            if column.kind == "numeric":
                table[name] = grid[:, b, j]
            else:
                codes = np.where(np.isnan(last[:, b, j]), -1, last[:, b, j]).astype(np.int64)
                table[name] = decode_codes(codes, column.categories)
            grid_columns[name] = (variable, b)
    return pd.DataFrame(table), grid_columns


# -- helpers -------------------------------------------------------------------------------------


def _sdtype(kind: str) -> str:
    return "numerical" if kind == "numeric" else "categorical"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _plain_dict(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in values.items()}


def _key(value: Any) -> Any:
    """A hashable key under which 1, 1.0 and np.int64(1) agree and NaN is None."""
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _category_index(categories: list[Any]) -> dict[Any, int]:
    return {_key(c): i for i, c in enumerate(categories)}


def _export_transformer(
    transformer: Any, name: str, schema: Schema, grid_columns: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    """The learned facts of one fitted RDT transformer, as JSON."""
    kind = type(transformer).__name__
    if kind == "FloatFormatter":
        nulls = transformer.null_transformer
        null_rate = 0.0
        if nulls is not None and getattr(nulls, "nulls", False):
            null_rate = float(getattr(nulls, "_null_percentage", 0.0) or 0.0)
        digits = transformer._rounding_digits if transformer.learn_rounding_scheme else None
        return {
            "kind": "float",
            "min": float(transformer._min_value),
            "max": float(transformer._max_value),
            "digits": None if digits is None else int(digits),
            "null_rate": null_rate,
        }
    if kind == "UniformEncoder":
        variable = grid_columns[name][0] if name in grid_columns else name
        schema_values = {_key(c): c for c in schema[variable].categories}
        categories = [schema_values.get(_key(c)) for c in transformer.intervals]
        starts = [float(interval[0]) for interval in transformer.intervals.values()]
        return {"kind": "uniform", "categories": categories, "starts": starts}
    raise ModelFileError(
        f"column {name!r}: SDV chose a {kind} transformer, which GaussianCopulaBaseline cannot "
        "export; only FloatFormatter and UniformEncoder are supported"
    )


def _psd_root(matrix: np.ndarray) -> np.ndarray:
    """A matrix ``R`` with ``R @ R.T == matrix`` for a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))[None, :]
