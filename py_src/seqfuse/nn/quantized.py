"""int8 dynamically quantised LSTM and GRU modules, and quantize_dynamic for whole models.

torch.ao.quantization.quantize_dynamic, the usual way to an int8 LSTM on CPU, is deprecated
(pytorch/pytorch#153892), torchao has no recurrent path, and onnxruntime has no quantised
GRU. seqfuse.quantize_dynamic(model) returns a copy of the model whose LSTM and GRU layers
(torch.nn's or seqfuse.nn's) hold int8 weights, one symmetric scale per weight row, and run
ops.quantized_rnn_layer: the activations are quantised per row and step inside the kernel.
Inference only: the quantised modules have no parameters and refuse gradients.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import ops

__all__ = ["QuantizedLSTM", "QuantizedGRU", "quantize_dynamic", "quantize_weight"]


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of each row of a float weight [..., K]: scale =
    max|row| / 127 (1 for an all-zero row). Returns int8 weights and float32 scales [...]."""
    w = weight.detach().float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp((w / scale.unsqueeze(-1)).round(), -127, 127).to(torch.int8)
    return q, scale


class _QuantizedRecurrent(nn.Module):
    _mode = ""
    _gates = 0

    def __init__(self, source: nn.Module):
        super().__init__()
        if getattr(source, "proj_size", 0):
            raise ValueError(f"{type(self).__name__}: an LSTM with proj_size has no int8 kernel")
        self.input_size, self.hidden_size = source.input_size, source.hidden_size
        self.num_layers, self.bias = source.num_layers, source.bias
        self.batch_first, self.bidirectional = source.batch_first, source.bidirectional
        D = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            sfx = [f"_l{layer}"] + ([f"_l{layer}_reverse"] if D == 2 else [])
            w_ih = torch.stack([getattr(source, "weight_ih" + s) for s in sfx])
            w_hh = torch.stack([getattr(source, "weight_hh" + s) for s in sfx])
            for name, w in (("ih", w_ih), ("hh", w_hh)):
                q, scale = quantize_weight(w)
                self.register_buffer(f"weight_{name}_l{layer}", q)
                self.register_buffer(f"scale_{name}_l{layer}", scale)
            if self.bias:
                b_ih = torch.stack([getattr(source, "bias_ih" + s) for s in sfx]).detach().float()
                b_hh = torch.stack([getattr(source, "bias_hh" + s) for s in sfx]).detach().float()
                if self._mode == "lstm":  # one combined bias, as the float kernels take it
                    b_ih, b_hh = b_ih + b_hh, None
                self.register_buffer(f"bias_ih_l{layer}", b_ih.clone())
                self.register_buffer(f"bias_hh_l{layer}", None if b_hh is None else b_hh.clone())
            else:
                self.register_buffer(f"bias_ih_l{layer}", None)
                self.register_buffer(f"bias_hh_l{layer}", None)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}, dtype=int8")

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        """torch.nn.LSTM's (GRU's) forward, plus seqfuse.nn's `lengths` [B] for a padded
        input (zeros past each length, states at each last valid step)."""
        packed = isinstance(input, PackedSequence)
        if packed and lengths is not None:
            raise ValueError(f"{type(self).__name__}: lengths= is for a padded input; a PackedSequence carries its own")
        if packed:
            x, lengths = pad_packed_sequence(input)  # [T, B, I], in the original order
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"{type(self).__name__}: input must be a Tensor or PackedSequence, "
                                f"got {type(input).__name__}")
            x = input.transpose(0, 1) if self.batch_first else input
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__}: input must be 3-D (or a PackedSequence), got "
                             f"shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__}: input must be float32, got {x.dtype}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input.size(-1) must be {self.input_size}, "
                             f"got {x.shape[-1]}")
        D, B, H = 2 if self.bidirectional else 1, x.shape[1], self.hidden_size
        if lengths is not None and not packed:
            if not isinstance(lengths, Tensor) or lengths.dtype != torch.long or tuple(lengths.shape) != (B,):
                raise ValueError(f"{type(self).__name__}: lengths must be an int64 tensor [B={B}]")
            lengths = lengths.cpu()
        lstm = self._mode == "lstm"
        h0, c0 = self._initial_state(hx, D, B, x)
        h_out, c_out = [], []
        layer_in = x.contiguous()
        for layer in range(self.num_layers):
            sl = slice(layer * D, (layer + 1) * D)
            out, h_n, c_n = ops.quantized_rnn_layer(
                self._mode, layer_in, getattr(self, f"weight_ih_l{layer}"), getattr(self, f"scale_ih_l{layer}"),
                getattr(self, f"weight_hh_l{layer}"), getattr(self, f"scale_hh_l{layer}"),
                getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}"),
                h0[sl].contiguous(), c0[sl].contiguous() if lstm else None, lengths)
            h_out.append(h_n)
            c_out.append(c_n)
            layer_in = out
        h_n = torch.cat(h_out)
        state = (h_n, torch.cat(c_out)) if lstm else h_n
        if packed:  # pad_packed_sequence restored the batch order: the states are in it too
            return pack_padded_sequence(layer_in, lengths, enforce_sorted=False), state
        out = layer_in.transpose(0, 1) if self.batch_first else layer_in
        return out, state

    def _initial_state(self, hx, D, B, x):
        shape = (self.num_layers * D, B, self.hidden_size)
        zeros = x.new_zeros(shape)
        if hx is None:
            return zeros, zeros
        if self._mode == "lstm":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
        else:
            h0, c0 = hx, zeros
        for name, t in (("h_0", h0), ("c_0", c0)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{type(self).__name__}: {name} must be {list(shape)}, got {list(t.shape)}")
        return h0.float(), c0.float()


class QuantizedLSTM(_QuantizedRecurrent):
    """An int8 dynamically quantised LSTM made from a float one (torch.nn.LSTM or
    seqfuse.nn.LSTM): `QuantizedLSTM(lstm)`. Inference only; torch.nn.LSTM's forward."""
    _mode = "lstm"


class QuantizedGRU(_QuantizedRecurrent):
    """An int8 dynamically quantised GRU made from a float one. As QuantizedLSTM."""
    _mode = "gru"


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every LSTM and GRU (torch.nn's or seqfuse.nn's; an LSTM
    with proj_size stays float) is replaced by its int8 counterpart (QuantizedLSTM,
    QuantizedGRU), in eval mode. The model itself is left unchanged. Everything else
    (embeddings, linear heads, attention) stays float32."""
    from . import rnn as seqfuse_rnn
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_dynamic: model must be an nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model).eval()
    kinds = ((QuantizedLSTM, (nn.LSTM, seqfuse_rnn.LSTM)), (QuantizedGRU, (nn.GRU, seqfuse_rnn.GRU)))

    def swap(module: nn.Module) -> nn.Module:
        for cls, sources in kinds:
            if isinstance(module, sources) and not getattr(module, "proj_size", 0):
                return cls(module)
        for name, child in module.named_children():
            new = swap(child)
            if new is not child:
                setattr(module, name, new)
        return module

    return swap(out)
