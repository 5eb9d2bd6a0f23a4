"""Functional forms of seqfuse's layers: each picks the backend (backend.py) and calls
the compiled op (ops.py) or the reference implementation (reference.py)."""
from __future__ import annotations

from torch import Tensor

from . import ops, reference
from .backend import resolve


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (shapes in ops.lstm_layer) on the chosen backend."""
    impl = ops if resolve(backend, "lstm_layer", input.device.type) == "native" else reference
    return impl.lstm_layer(input, weight_ih, weight_hh, bias, hx, cx, lengths)


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One GRU layer (shapes in ops.gru_layer) on the chosen backend."""
    impl = ops if resolve(backend, "gru_layer", input.device.type) == "native" else reference
    return impl.gru_layer(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths)


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh", backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (shapes in ops.rnn_layer) on the chosen backend."""
    impl = ops if resolve(backend, "rnn_layer", input.device.type) == "native" else reference
    return impl.rnn_layer(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity)
