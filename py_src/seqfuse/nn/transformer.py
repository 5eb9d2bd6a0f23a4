"""seqfuse.nn.TransformerEncoderLayer and TransformerEncoder: drop-ins for torch's, with
self-attention on seqfuse.nn.MultiheadAttention (the fused SDPA op).

torch's inference fast paths (torch._transformer_encoder_layer_fwd, and the encoder's
nested tensors for key-padding masks) are not mirrored: every mode computes what torch
computes in training. The one visible difference: where torch's encoder takes its
nested-tensor path (eval, no grad, batch_first, a left-aligned src_key_padding_mask), it
writes zeros at padded positions before the final norm; here padded positions hold what
the layers computed for them (as in torch's training mode). Valid positions agree."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention, _check_dropout, _check_positive_int


def _activation_fn(activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    if not callable(activation):
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    return activation


def _is_causal_mask(mask: Tensor | None, is_causal: bool | None, size: int | None) -> bool:
    """torch's _detect_is_causal_mask: the hint if given, else whether `mask` equals the
    square causal mask (float -inf above the diagonal, or bool True above it)."""
    if is_causal is not None:
        return bool(is_causal)
    if mask is None:
        return False
    sz = size if size is not None else mask.size(-2)
    causal = torch.triu(torch.full((sz, sz), float("-inf"), dtype=mask.dtype, device=mask.device),
                        diagonal=1)
    return mask.size() == causal.size() and bool((mask == causal).all())


class TransformerEncoderLayer(nn.Module):
    """Drop-in for torch.nn.TransformerEncoderLayer: same constructor, submodules (self_attn,
    linear1, dropout, linear2, norm1, norm2, dropout1, dropout2), state_dict keys and
    outputs; self_attn is seqfuse.nn.MultiheadAttention.

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False, *, valid_lens=None):
      src: [S, N, E] ([N, S, E] with batch_first) or [S, E] unbatched
      src_mask: [S, S] or [N * nhead, S, S] (bool True = not allowed, or float added)
      src_key_padding_mask: [N, S] (bool True = padding, or float added)
      valid_lens: [N] or [N, S] integer: keys s < valid_lens are attended (right padding)
    Returns [S, N, E] like src. A position whose keys are all masked gets a zero attention
    output (torch: NaN).
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        _check_positive_int("dim_feedforward", dim_feedforward)
        dropout = _check_dropout(dropout)
        factory = {"device": device, "dtype": dtype}
        # Construction order as torch's: from the same seed, the same initial weights.
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **factory, backend=backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        activation = _activation_fn(activation)
        # Kept because code written for torch's layer reads it.
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False, *,
                valid_lens: Tensor | None = None) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal,
                                   valid_lens)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal,
                                              valid_lens))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal, valid_lens):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal, valid_lens=valid_lens)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class TransformerEncoder(nn.Module):
    """Drop-in for torch.nn.TransformerEncoder: num_layers deep copies of encoder_layer (in
    `layers`), then the optional `norm`.

    forward(src, mask=None, src_key_padding_mask=None, is_causal=None, *, valid_lens=None):
      as TransformerEncoderLayer; is_causal None detects a square causal `mask` as torch
      does. valid_lens is passed to every layer (only when given, so layers of another
      type work too).
    enable_nested_tensor and mask_check are kept as attributes but no nested-tensor path is
    taken (see the module docstring for what that changes at padded positions).
    """

    __constants__ = ["norm"]

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True):
        super().__init__()
        if not isinstance(encoder_layer, nn.Module):
            raise TypeError(f"encoder_layer must be an nn.Module, got {type(encoder_layer).__name__}")
        _check_positive_int("num_layers", num_layers)
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False
        self.mask_check = mask_check

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None, *,
                valid_lens: Tensor | None = None) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a Tensor, got {type(src).__name__}")
        first = self.layers[0]
        batch_first = getattr(getattr(first, "self_attn", None), "batch_first", False)
        seq_len = src.shape[0] if src.dim() == 2 else src.shape[1 if batch_first else 0]
        is_causal = _is_causal_mask(mask, is_causal, seq_len)
        extra = {} if valid_lens is None else {"valid_lens": valid_lens}
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal,
                         src_key_padding_mask=src_key_padding_mask, **extra)
        if self.norm is not None:
            output = self.norm(output)
        return output
