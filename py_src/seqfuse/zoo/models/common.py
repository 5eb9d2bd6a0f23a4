"""Pieces the zoo models share: running a recurrent layer over padded batches whether it
is seqfuse's (lengths go to the fused op) or torch.nn's (packed), masks from lengths,
and the pooling heads."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_TORCH_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def _reads_values() -> bool:
    """Whether data-dependent checks may run: not while torch.compile/export or a
    TorchScript trace records the model (they would bake one input's values in)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def check_tokens(input_ids: Tensor, lengths: Tensor | None, name: str = "input_ids",
                 vocab_size: int | None = None) -> None:
    """input_ids: [B, T] integer ids in [0, vocab_size), B, T >= 1; lengths: [B] int64 or None."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{name} must be a [B, T] tensor, got shape {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"{name} must have at least one row and one token, got shape {tuple(input_ids.shape)}")
    reads = _reads_values() and input_ids.device.type != "meta"
    if vocab_size is not None and reads:
        # Out-of-range ids would fail inside nn.Embedding ("index out of range in self"), or
        # on CUDA as a device-side assert that breaks the whole CUDA context.
        lo, hi = torch.aminmax(input_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must be token ids in [0, vocab_size={vocab_size}), got min {lo} "
                             f"and max {hi}")
    if lengths is None:
        return
    if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an int64 tensor, got {getattr(lengths, 'dtype', type(lengths).__name__)}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape [B={B}], got {tuple(lengths.shape)}")
    if lengths.device.type == "meta":
        if input_ids.device.type != "meta":
            raise ValueError(f"lengths is a meta tensor (it has no values) but {name} is on "
                             f"{input_ids.device}")
        return
    if not torch.compiler.is_compiling():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise ValueError(f"lengths must be in [1, T={T}], got min {lo} and max {hi}")


def check_dense(x: Tensor, features: int, name: str) -> None:
    """x: [B, T, features] floating point, B, T >= 1."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != features:
        raise ValueError(f"{name} must be [B, T, {features}], got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one step, got shape {tuple(x.shape)}")


def lengths_from_padding(input_ids: Tensor, pad_idx: int) -> Tensor:
    """[B] count of non-pad tokens (right padding); an empty row counts as one token, so
    that it still gets a prediction."""
    return (input_ids != pad_idx).sum(dim=1).clamp(min=1)


def run_recurrent(rnn: nn.Module, x: Tensor, lengths: Tensor, hx=None):
    """x: [B, T, I] (batch_first layer), lengths: [B] int64 -> (output [B, T, D*H] with
    zeros past each length, final state as the layer returns it). seqfuse layers take the
    lengths; torch.nn layers get a PackedSequence (what eager PyTorch users write)."""
    if isinstance(rnn, _TORCH_RECURRENT):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = rnn(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state
    return rnn(x, hx, lengths=lengths)


def run_embedded(rnn: nn.Module, embedding: nn.Embedding, input_ids: Tensor, lengths: Tensor,
                 dropout: nn.Module | None = None):
    """run_recurrent over dropout(embedding(input_ids)). A seqfuse layer reads the tokens
    itself (forward_tokens), which in inference folds the embedding into its first
    layer's input projection; a torch.nn layer, or dropout that is active, gets the
    embedded input."""
    active = dropout is not None and dropout.training and getattr(dropout, "p", 1) > 0
    if hasattr(rnn, "forward_tokens") and not active:
        return rnn.forward_tokens(embedding, input_ids, lengths=lengths)
    x = embedding(input_ids)
    return run_recurrent(rnn, dropout(x) if dropout is not None else x, lengths)


def padding_mask(lengths: Tensor, T: int) -> Tensor:
    """[B, T] bool, True at padded positions (torch's key_padding_mask convention)."""
    return torch.arange(T, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def last_valid(output: Tensor, lengths: Tensor) -> Tensor:
    """output: [B, T, F] -> [B, F], each row at step lengths-1."""
    idx = (lengths.to(output.device) - 1).view(-1, 1, 1).expand(-1, 1, output.shape[2])
    return output.gather(1, idx).squeeze(1)


def final_hidden(h_n: Tensor, num_directions: int) -> Tensor:
    """h_n: [L*D, B, H] -> the last layer's directions concatenated, [B, D*H]."""
    return torch.cat(list(h_n[-num_directions:].unbind(0)), dim=1)


def sinusoidal_positions(max_len: int, dim: int) -> Tensor:
    """[max_len, dim] sin/cos position encodings (Vaswani et al.)."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe
