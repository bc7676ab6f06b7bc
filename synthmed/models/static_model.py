"""A model of the joint distribution of static attributes that can be conditioned on any subset.

:class:`ConditionalStaticModel` is an order-agnostic autoregressive network (Uria, Murray &
Larochelle, 2014, "A deep and tractable density estimator"): one MLP reads the columns known so
far (values times a "known" flag, plus the flags) and outputs a distribution for every column.
Training picks, for every patient, a random order of the columns and a random number of them to
reveal, and scores the hidden ones, so the single network learns ``p(column | any subset of the
other columns)``. Sampling fills the free cells of each row one column at a time in a fixed
order, each draw conditioned on the given cells and on those drawn before it: conditioning on
any subset of columns, different for every row, is exact by construction.

The model works on the encoded matrix of :class:`synthmed.models.transforms.StaticEncoder`
(standardised numbers with a missing slot, one-hot categories with a missing slot) and returns
rows in the same layout, so ``encoder.inverse(model.sample(...))`` gives a static table. Numeric
columns use a Gaussian mixture plus a "missing" Bernoulli, categorical columns a softmax over
their categories (and "missing"). It is reusable by any generator that encodes static attributes
with ``StaticEncoder`` (``LSTMSynthesizer`` trains it by maximum likelihood with
:func:`fit_static_model` before its sequence model; under DP with
:func:`fit_static_model_privately`, on a share of the privacy budget).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synthmed.models.base import moving_average
from synthmed.models.heads import GaussianMixture, sample_categorical


@dataclasses.dataclass(frozen=True)
class StaticColumn:
    """One column's slice of the encoded static vector (see ``StaticEncoder.blocks_``).

    A numeric column occupies ``[value]`` or ``[value, missing]``; a categorical or binary
    column its one-hot categories, followed by a "missing" slot when ``has_missing``.
    """

    name: str
    kind: str
    start: int
    width: int
    has_missing: bool

    @property
    def numeric(self) -> bool:
        return self.kind == "numeric"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def columns_from_blocks(blocks: Iterable[Any]) -> list[StaticColumn]:
    """:class:`StaticColumn` list from ``StaticEncoder.blocks_`` (or dicts with the same keys)."""
    out = []
    for block in blocks:
        data = block if isinstance(block, dict) else dataclasses.asdict(block)
        out.append(
            StaticColumn(
                str(data["name"]),
                "numeric" if data["kind"] == "numeric" else "categorical",
                int(data["start"]),
                int(data["width"]),
                bool(data["has_missing"]),
            )
        )
    return out


class ConditionalStaticModel(nn.Module):
    """``p(static columns)``, conditionable on any subset of columns (see the module docstring).

    Args:
        columns: The encoded layout, one :class:`StaticColumn` per static column.
        hidden_size: Width of the MLP's hidden layers.
        num_layers: Number of hidden layers.
        n_components: Gaussian mixture components of each numeric column.
        min_scale: Smallest standard deviation of a component, in standardised units.
    """

    def __init__(
        self,
        columns: Sequence[StaticColumn],
        hidden_size: int = 128,
        num_layers: int = 2,
        n_components: int = 5,
        min_scale: float = 1e-2,
    ) -> None:
        super().__init__()
        self.columns = list(columns)
        self.width = sum(c.width for c in self.columns)
        self.numeric = [c for c in self.columns if c.numeric]
        self.categorical = [c for c in self.columns if not c.numeric]
        self.mixture = GaussianMixture(len(self.numeric), n_components, min_scale)
        per_numeric = 1 + 3 * n_components
        self._numeric_params = per_numeric * len(self.numeric)
        n_out = self._numeric_params + sum(c.width for c in self.categorical)
        layers: list[nn.Module] = []
        size = self.width + len(self.columns)
        for _ in range(num_layers):
            layers += [nn.Linear(size, hidden_size), nn.ReLU()]
            size = hidden_size
        layers.append(nn.Linear(size, max(n_out, 1)))
        self.net = nn.Sequential(*layers)
        # Which encoded entries belong to which column, to zero out unknown columns.
        owner = torch.zeros(self.width, dtype=torch.int64)
        for j, column in enumerate(self.columns):
            owner[column.start : column.start + column.width] = j
        self.register_buffer("_owner", owner, persistent=False)
        self.register_buffer(
            "_value_index",
            torch.tensor([c.start for c in self.numeric], dtype=torch.int64),
            persistent=False,
        )
        self.register_buffer(
            "_missing_index",
            torch.tensor(
                [c.start + 1 if c.has_missing else c.start for c in self.numeric], dtype=torch.int64
            ),
            persistent=False,
        )
        self.register_buffer(
            "_can_miss",
            torch.tensor([c.has_missing for c in self.numeric], dtype=torch.bool),
            persistent=False,
        )
        # Position of each column's NLL in the [numeric..., categorical...] stack.
        self._order = [
            self.numeric.index(c) if c.numeric else len(self.numeric) + self.categorical.index(c)
            for c in self.columns
        ]
        self._hidden_size, self._num_layers = hidden_size, num_layers

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    def _inputs(self, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        known_f = known.to(x.dtype)
        return torch.cat([x * known_f[:, self._owner], known_f], dim=1)

    def _column_nll(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[n, S]`` negative log-likelihood of every column of ``x`` under ``raw``."""
        n = x.shape[0]
        nll = []
        if self.numeric:
            params = raw[:, : self._numeric_params].reshape(n, len(self.numeric), -1)
            miss_logit = params[..., 0]
            value = x[:, self._value_index]
            missing = (x[:, self._missing_index] > 0.5) & self._can_miss
            log_value = self.mixture.log_prob(params[..., 1:].reshape(n, -1), value)
            # Columns that never miss do not score the missing logit at all.
            log_present = torch.where(
                self._can_miss, F.logsigmoid(-miss_logit), torch.zeros_like(value)
            )
            log_p = torch.where(missing, F.logsigmoid(miss_logit), log_present + log_value)
            nll.append(-log_p)
        start = self._numeric_params
        for column in self.categorical:
            logits = raw[:, start : start + column.width]
            target = x[:, column.start : column.start + column.width].argmax(dim=1)
            nll.append(F.cross_entropy(logits, target, reduction="none").unsqueeze(1))
            start += column.width
        return torch.cat(nll, dim=1)[:, self._order]

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        dequantize: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-row negative log-likelihood ``[n]``, an unbiased estimate over random orders.

        Args:
            x: ``[n, width]`` encoded rows.
            generator: Source of the random orders (and of the dequantisation noise).
            dequantize: ``[n, n_numeric]`` widths in standardised units; each present numeric
                value gets uniform noise of its width (for columns recorded on a grid, such as
                whole years, so the mixture models a density rather than spikes). 0 for none.
        """
        n, s = x.shape[0], self.n_columns
        if s == 0:
            return x.new_zeros(n)
        if dequantize is not None and self.numeric:
            noise = torch.rand(
                (n, len(self.numeric)), generator=generator, device=x.device, dtype=x.dtype
            )
            x = x.clone()
            for i, column in enumerate(self.numeric):
                present = x[:, column.start + 1] < 0.5 if column.has_missing else 1.0
                x[:, column.start] += (noise[:, i] - 0.5) * dequantize[:, i] * present
        u = torch.rand((n, s), generator=generator, device=x.device)
        rank = u.argsort(dim=1).argsort(dim=1)
        revealed = torch.randint(0, s, (n, 1), generator=generator, device=x.device)
        known = rank < revealed
        raw = self.net(self._inputs(x, known))
        nll = self._column_nll(raw, x)
        weight = s / (s - revealed.squeeze(1)).to(x.dtype)
        return weight * (nll * (~known).to(x.dtype)).sum(dim=1)

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        known: torch.Tensor,
        generator: torch.Generator,
        numeric_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Fill the unknown columns of ``x``.

        Args:
            x: ``[n, width]`` encoded rows; entries of unknown columns are ignored.
            known: ``[n, n_columns]`` bool, True where the column is given (conditioned).
            generator: Source of randomness.
            numeric_bounds: ``(lower, upper)`` tensors ``[n_numeric]`` in standardised units;
                drawn numbers are clamped into them.

        Returns:
            ``[n, width]`` encoded rows; known columns are returned unchanged.
        """
        x = x.clone()
        known = known.clone()
        numeric_index = {id(c): i for i, c in enumerate(self.numeric)}
        for j, column in enumerate(self.columns):
            rows = (~known[:, j]).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            raw = self.net(self._inputs(x[rows], known[rows]))
            block = torch.zeros((len(rows), column.width), dtype=x.dtype, device=x.device)
            if column.numeric:
                i = numeric_index[id(column)]
                params = raw[:, : self._numeric_params].reshape(len(rows), len(self.numeric), -1)
                single = GaussianMixture(1, self.mixture.n_components, self.mixture.min_scale)
                value = single.sample(params[:, i, 1:], generator).squeeze(-1)
                if numeric_bounds is not None:
                    value = torch.maximum(
                        torch.minimum(value, numeric_bounds[1][i]), numeric_bounds[0][i]
                    )
                if column.has_missing:
                    u = torch.rand(len(rows), generator=generator, device=x.device)
                    missing = u < torch.sigmoid(params[:, i, 0])
                    block[:, 0] = torch.where(missing, torch.zeros_like(value), value)
                    block[:, 1] = missing.to(x.dtype)
                else:
                    block[:, 0] = value
            else:
                start = self._numeric_params
                for other in self.categorical:
                    if other is column:
                        break
                    start += other.width
                code = sample_categorical(raw[:, start : start + column.width], generator)
                block[torch.arange(len(rows), device=x.device), code] = 1.0
            x[rows, column.start : column.start + column.width] = block
            known[rows, j] = True
        return x

    def spec(self) -> dict[str, Any]:
        """JSON-friendly constructor arguments (to rebuild the module before loading weights)."""
        return {
            "columns": [c.to_dict() for c in self.columns],
            "hidden_size": self._hidden_size,
            "num_layers": self._num_layers,
            "n_components": self.mixture.n_components,
            "min_scale": self.mixture.min_scale,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ConditionalStaticModel:
        return cls(
            [StaticColumn(**c) for c in spec["columns"]],
            hidden_size=spec["hidden_size"],
            num_layers=spec["num_layers"],
            n_components=spec["n_components"],
            min_scale=spec["min_scale"],
        )


def fit_static_model(
    model: ConditionalStaticModel,
    train: torch.Tensor,
    validation: torch.Tensor,
    generator: torch.Generator,
    dequantize: torch.Tensor | None = None,
    *,
    max_epochs: int = 400,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    patience: int = 40,
    validation_orders: int = 8,
    plateau_patience: int = 10,
    average_epochs: float = 15.0,
) -> dict[str, Any]:
    """Train ``model`` alone by maximum likelihood, stopping early on ``validation`` rows.

    The static attributes' likelihood does not share parameters with a sequence model, so it is
    trained on its own schedule: this small network needs many more (cheap) passes than the
    sequence model, and trained jointly it stays miscalibrated (e.g. too many missing values).
    The validation loss averages ``validation_orders`` fixed random column orders, so epochs
    compare fairly; the weights of the best epoch are kept. Without validation rows, all
    ``max_epochs`` run.

    What is validated and kept is an exponential moving average of the weights over about the
    last ``average_epochs`` epochs, and the learning rate halves after ``plateau_patience``
    epochs without a better validation loss. Without them the kept weights were one noisy
    step of Adam's, and the predictions made with few columns known, which few training rows
    score, were off by several points (PhysioNet 2012: women 0.38-0.41 of the generated
    patients against 0.44).

    Args:
        model: The model to train (in place).
        train, validation: ``[n, width]`` encoded rows.
        generator: Source of the shuffles, orders and dequantisation noise, on the rows'
            device.
        dequantize: As in :meth:`ConditionalStaticModel.forward`, one row per row of
            ``train``.

    Returns:
        ``{"epochs": run, "best_epoch": ..., "validation_loss": best}`` (loss per row; None
        without validation rows).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=plateau_patience
    )
    averaged = moving_average(model, average_epochs, math.ceil(len(train) / batch_size))
    device = train.device
    seeds = torch.randint(
        2**31 - 1, (validation_orders,), generator=generator, device=device
    ).tolist()
    best, best_state, best_epoch, epoch = float("inf"), None, 0, 0
    model.train()
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(train), generator=generator, device=device)
        for rows in order.split(batch_size):
            widths = dequantize[rows] if dequantize is not None else None
            loss = model(train[rows], generator, widths).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            averaged.update_parameters(model)
        if len(validation) == 0:
            continue
        with torch.no_grad():
            score = sum(
                float(averaged(validation, torch.Generator(device=device).manual_seed(s)).mean())
                for s in seeds
            ) / len(seeds)
        scheduler.step(score)
        if score < best - 1e-4:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in averaged.module.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state if best_state is not None else averaged.module.state_dict())
    return {
        "epochs": epoch,
        "best_epoch": best_epoch or epoch,
        "validation_loss": best if best_state is not None else None,
    }


#: ``Synthesizer._make_private`` bound to a budget share: (module, optimizer, loader, epochs).
MakePrivate = Callable[
    [nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, int],
    tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader],
]


def fit_static_model_privately(
    model: ConditionalStaticModel,
    train: torch.Tensor,
    generator: torch.Generator,
    make_private: MakePrivate,
    dequantize: torch.Tensor | None = None,
    *,
    epochs: int = 50,
    batch_size: int = 1024,
    learning_rate: float = 5e-3,
    loss_scale: float = 0.02,
) -> dict[str, Any]:
    """Train ``model`` by DP-SGD for exactly ``epochs``, through ``make_private``.

    The private counterpart of :func:`fit_static_model`: one item per patient, Poisson batches
    (at least four per epoch), no validation (a held-out loss would not be private). Trained
    jointly with a sequence model under one per-patient clipping bound, the static terms get a
    small share of each clipped gradient and the model stays untrained (in PhysioNet 2012 at
    epsilon 10, Age came out missing for 47 % of patients, never in the data); its own phase
    gives it the whole bound.

    The loss is multiplied by ``loss_scale`` (the same as clipping at ``max_grad_norm /
    loss_scale``; the noise follows the clipping bound, so the guarantee is unchanged).
    Per-patient gradient norms of this model are heavy-tailed (PhysioNet 2012: median 27,
    99th percentile 840, from the importance weights of random column orders and the wide
    declared ranges of outcomes such as Survival), and clipping them all to 1 biases the fit:
    with no noise at all, it generated a Survival value for 2 % of patients (37 % in the data)
    and hence in-hospital death for 0.7 % (14 %). At ``loss_scale`` 0.02 with large batches the
    bias shrinks (at epsilon 2 for this phase: death 9 %).

    Returns:
        ``{"epochs": epochs, "best_epoch": epochs, "validation_loss": None}``.
    """
    device = train.device
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(len(train))),
        batch_size=max(1, min(batch_size, len(train) // 4)),
        shuffle=True,
        generator=generator if device.type == "cpu" else None,
    )
    module, optimizer, loader = make_private(model, optimizer, loader, epochs)
    module.train()
    for _ in range(epochs):
        for (rows,) in loader:
            if len(rows) == 0:  # Poisson sampling can draw an empty batch
                continue
            rows = rows.to(device)
            widths = dequantize[rows] if dequantize is not None else None
            loss = module(train[rows], generator, widths).mean() * loss_scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"epochs": epochs, "best_epoch": epochs, "validation_loss": None}
