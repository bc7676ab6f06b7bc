"""PrivateLSTM: nn.LSTM's recurrence, with per-patient gradients that Opacus can clip."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from synthmed.models.privacy import check_module
from synthmed.models.private_lstm import PrivateLSTM

BATCH, STEPS, INPUTS, HIDDEN, LAYERS = 5, 6, 4, 7, 2


class _Model(nn.Module):
    """An initial state from static features, a two-layer LSTM and a per-step head."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(3, 2 * LAYERS * HIDDEN)
        self.lstm = PrivateLSTM(INPUTS, HIDDEN, LAYERS)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        state = torch.tanh(self.init(static)).reshape(len(static), 2, LAYERS, HIDDEN)
        out = self.lstm(x, state[:, 0], state[:, 1])
        return self.head(out).pow(2).sum((1, 2))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, STEPS, INPUTS, generator=generator)
    static = torch.randn(BATCH, 3, generator=generator)
    return x, static


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_patient_gradients_equal_each_patients_own_gradient(reduction):
    torch.manual_seed(0)
    model = _Model()
    x, static = _inputs()
    expected = []
    for row in range(BATCH):
        model.zero_grad()
        model(x[row : row + 1], static[row : row + 1]).sum().backward()
        expected.append({name: p.grad.clone() for name, p in model.lstm.named_parameters()})

    wrapped = GradSampleModule(model, loss_reduction=reduction)
    losses = wrapped(x, static)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    for name, parameter in model.lstm.named_parameters():
        assert parameter.grad_sample.shape == (BATCH, *parameter.shape)
        for row in range(BATCH):
            torch.testing.assert_close(
                parameter.grad_sample[row], expected[row][name], rtol=1e-4, atol=1e-6
            )
    wrapped._close()


def test_outputs_and_weights_are_nn_lstms():
    torch.manual_seed(0)
    private = PrivateLSTM(INPUTS, HIDDEN, LAYERS)
    twin = nn.LSTM(INPUTS, HIDDEN, LAYERS, batch_first=True)
    twin.load_state_dict(private.state_dict(), strict=True)
    x, _ = _inputs()
    h0, c0 = torch.randn(2, BATCH, LAYERS, HIDDEN).unbind(0)
    expected, _ = twin(x, (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()))
    torch.testing.assert_close(private(x, h0, c0), expected)


def test_a_constant_initial_state_is_refused_instead_of_wrong_gradients():
    torch.manual_seed(0)
    lstm = PrivateLSTM(INPUTS, HIDDEN, 1)
    wrapped = GradSampleModule(lstm)
    x, _ = _inputs()
    zeros = torch.zeros(BATCH, 1, HIDDEN)
    with pytest.raises(RuntimeError, match="h0/c0 must require grad"):
        wrapped(x, zeros, zeros).sum().backward()
    wrapped._close()


def test_opacus_accepts_it():
    check_module(_Model())
