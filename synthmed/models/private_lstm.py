"""An LSTM whose per-patient gradients Opacus gets in one pass over the sequence.

Opacus' ``DPLSTM`` unrolls the recurrence into one ``RNNLinear`` call per step and computes and
accumulates per-sample gradients in a Python hook at every step: for a 48-step stay that is
~100 hooks and ~100 ``[B, 4H, H]`` outer products per batch, and it made private training cost
5.5× the non-private loop. :class:`PrivateLSTM` runs the same recurrence, but each layer's input
projection is one ``[B, T, 4H]`` tensor whose gradient is the gate gradient of every step; from
it the per-patient gradients of all four weights are two batched matrix products per layer
(:func:`_per_patient_gradients`, registered with Opacus as this layer's grad sampler).

Its parameters carry ``nn.LSTM``'s names and layout, so a trained state dict loads into
``nn.LSTM`` (or :class:`synthmed.models.lstm_network.SequenceSampler`) for fast sampling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn


@dataclasses.dataclass
class _LayerTrace:
    """What one layer's per-patient gradients need from a forward pass."""

    inputs: torch.Tensor  # [B, T, I] the layer's inputs
    previous: torch.Tensor  # [B, T, H] the hidden state entering each step
    gate_grad: torch.Tensor | None = None  # [B, T, 4H] filled during backward


@dataclasses.dataclass
class _Trace:
    layers: list[_LayerTrace]
    output_grad: torch.Tensor | None = None  # gradient of the output, to read Opacus' scaling


class PrivateLSTM(nn.Module):
    """A batch-first ``nn.LSTM`` twin with fast per-patient gradients under Opacus.

    Args:
        input_size: Features per step.
        hidden_size: Hidden units per layer.
        num_layers: Stacked layers.
        dropout: Dropout on the outputs of every layer but the last, as in ``nn.LSTM``.

    ``forward(input, h0, c0)`` takes ``input [B, T, I]`` and the initial states **batch first**,
    ``[B, num_layers, H]`` each (Opacus reads the batch size from a layer's inputs), and returns
    the last layer's outputs ``[B, T, H]``.

    Per-patient gradients need the gradient to flow into ``h0`` or ``c0`` (e.g. an initial state
    computed from the patient's static attributes): Opacus calls the grad sampler when the
    gradients of the layer's inputs are complete, and only then are all gate gradients known.
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size
            shapes = {
                "weight_ih": (4 * hidden_size, width),
                "weight_hh": (4 * hidden_size, hidden_size),
                "bias_ih": (4 * hidden_size,),
                "bias_hh": (4 * hidden_size,),
            }
            for name, shape in shapes.items():
                self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape)))
        self._traces: list[_Trace] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s initialisation: every weight uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        """``(weight_ih, weight_hh, bias_ih, bias_hh)`` of one layer."""
        return tuple(
            getattr(self, f"{name}_l{layer}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def forward(self, input: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        tracing = self.training and torch.is_grad_enabled()
        trace = _Trace(layers=[])
        x, hidden = input, self.hidden_size
        for layer in range(self.num_layers):
            if layer > 0:
                x = F.dropout(x, self.dropout, self.training)
            weight_ih, weight_hh, bias_ih, bias_hh = self.layer_parameters(layer)
            projected = F.linear(x, weight_ih, bias_ih + bias_hh)
            h, c = h0[:, layer], c0[:, layer]
            outputs = []
            for step in range(x.shape[1]):
                gates = torch.addmm(projected[:, step], h, weight_hh.t())
                # One sigmoid over all four gates (g's is unused) costs less than three calls.
                i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
                g = torch.tanh(gates[:, 2 * hidden : 3 * hidden])
                c = torch.addcmul(f * c, i, g)
                h = o * torch.tanh(c)
                outputs.append(h)
            sequence = torch.stack(outputs, 1)
            if tracing and projected.requires_grad:
                previous = torch.cat([h0[:, layer, None], sequence[:, :-1]], 1)
                entry = _LayerTrace(x.detach(), previous.detach())
                projected.register_hook(_keep_grad(entry, "gate_grad"))
                trace.layers.append(entry)
            x = sequence
        if tracing and x.requires_grad:
            x.register_hook(_keep_grad(trace, "output_grad"))
            self._traces.append(trace)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}"
        )


def _keep_grad(holder: _LayerTrace | _Trace, field: str) -> Callable[[torch.Tensor], None]:
    def keep(grad: torch.Tensor) -> None:
        setattr(holder, field, grad.detach())

    return keep


@register_grad_sampler(PrivateLSTM)
def _per_patient_gradients(
    module: PrivateLSTM, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' grad sampler for :class:`PrivateLSTM`: per-patient gradients of every weight.

    ``backprops`` is the output gradient as Opacus scales it (times the batch size for a mean
    loss); the traced gate gradients are those of the loss itself, so they are rescaled by the
    same factor.
    """
    trace = module._traces.pop()
    if trace.output_grad is None or any(e.gate_grad is None for e in trace.layers):
        raise RuntimeError(
            "PrivateLSTM's gate gradients were not complete when Opacus asked for per-patient "
            "gradients: the initial state h0/c0 must require grad (compute it from parameters)"
        )
    reference = trace.output_grad.flatten()
    peak = int(reference.abs().argmax())
    scale = float(backprops.flatten()[peak] / reference[peak]) if reference[peak] != 0 else 1.0
    grads: dict[nn.Parameter, torch.Tensor] = {}
    for layer, entry in enumerate(trace.layers):
        weight_ih, weight_hh, bias_ih, bias_hh = module.layer_parameters(layer)
        gate_grad = entry.gate_grad * scale
        per_step = gate_grad.transpose(1, 2)  # [B, 4H, T]
        bias = gate_grad.sum(1)
        grads[weight_ih] = torch.bmm(per_step, entry.inputs.to(gate_grad.dtype))
        grads[weight_hh] = torch.bmm(per_step, entry.previous.to(gate_grad.dtype))
        grads[bias_ih] = bias
        grads[bias_hh] = bias.clone()
    return grads
