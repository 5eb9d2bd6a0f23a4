"""Functional forms of seqfuse's layers: each picks the backend (backend.py) and calls
the compiled op (ops.py), the Triton op (triton/) or the reference (reference.py)."""
from __future__ import annotations

from torch import Tensor

from .backend import implementation


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (shapes in ops.lstm_layer) on the chosen backend."""
    impl = implementation(backend, "lstm_layer", input.device.type)
    return impl.lstm_layer(input, weight_ih, weight_hh, bias, hx, cx, lengths)


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One GRU layer (shapes in ops.gru_layer) on the chosen backend."""
    impl = implementation(backend, "gru_layer", input.device.type)
    return impl.gru_layer(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths)


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh", backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer (shapes in ops.rnn_layer) on the chosen backend."""
    impl = implementation(backend, "rnn_layer", input.device.type)
    return impl.rnn_layer(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity)


def additive_attention(
    query: Tensor, key: Tensor, w_v: Tensor, value: Tensor, valid_lens: Tensor | None = None,
    mask: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Masked additive attention (shapes in ops.additive_attention) on the chosen backend.
    Returns (context [B, Q, Dv], weights [B, Q, K])."""
    impl = implementation(backend, "additive_attention", query.device.type)
    return impl.additive_attention(query, key, w_v, value, valid_lens, mask)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
    valid_lens: Tensor | None = None, is_causal: bool = False, scale: float | None = None,
    dropout_p: float = 0.0, seed: int = 0, backend: str = "auto",
) -> Tensor:
    """Masked scaled dot-product attention (shapes in ops.scaled_dot_product_attention) on
    the chosen backend. Returns output [B, H, Q, Dv]."""
    impl = implementation(backend, "scaled_dot_product_attention", query.device.type)
    return impl.scaled_dot_product_attention(query, key, value, attn_mask, valid_lens, is_causal,
                                             scale, dropout_p, seed)
