"""The recurrent layer ops, lstm_layer, gru_layer and rnn_layer: their typed wrappers, the
fakes of the compiled ops, and ONE autograd formula per op, registered on the compiled op
(`seqfuse::<op>`, csrc/) and on its Triton twin (`seqfuse::<op>_triton`,
seqfuse/triton/recurrent.py) alike. Both twins save the same tensors in the same layouts,
and each formula calls its twin's backward op through the dispatcher.

Shapes (D directions, T steps, B batch, I input, H hidden; csrc/lstm.h has the details):
  input [T, B, I]; weight_ih [D, G, I]; weight_hh [D, G, H] with G = 4H (LSTM, i f g o),
  3H (GRU, r z n) or H (RNN); biases [D, G]; hx, cx [D, B, H]; lengths [B] int64 on CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import checks
from .checks import NONLINEARITIES  # noqa: F401  (part of this module's interface)


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow: only then do the layers keep their activations
    (inference skips writing them, and the CPU LSTM folds the input projection into its
    recurrent tiles). getattr: a non-tensor argument then reaches the op, whose error
    names it.

    While torch.jit.trace records, the grad mode is left out: a traced graph runs in
    whatever mode its caller is in, and trace's own check re-traces under no_grad (a graph
    that depended on it differed between the two: "Graphs differed across invocations").
    A trace whose inputs or parameters require grad keeps the activations, so its graph
    can train; one traced with frozen parameters (seqfuse.export's) serves inference."""
    requires = any(getattr(t, "requires_grad", False) for t in tensors)
    if torch.jit.is_tracing():
        return requires
    return requires and torch.is_grad_enabled()


def activation_dtype(input: Tensor) -> torch.dtype:
    """The dtype of saved activations (and SDPA's softmax statistics): half-type layers
    (bfloat16; float16 on CUDA) accumulate in float32 and save float32."""
    return torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype


# ---------------------------------------------------------------------------------
# Wrappers. `op` is the compiled op or its Triton twin: seqfuse.triton calls these with its
# own ops, so both backends take and return the same.
# ---------------------------------------------------------------------------------

def _packed_args(op: str, packed_weights: Tensor | None, keep: bool) -> tuple:
    """The trailing packed_weights argument of a compiled op call: () when absent (the
    Triton twins take none). Packed panels serve inference: a backward would read the
    weights themselves, so with a gradient to compute they are refused."""
    if packed_weights is None:
        return ()
    if keep:
        raise ValueError(f"{op}: packed_weights serve inference; a gradient is needed here, so "
                         f"pass the weights alone (or run under torch.no_grad())")
    return (packed_weights,)


def run_lstm(op, input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
             hx: Tensor, cx: Tensor, lengths: Tensor | None,
             packed_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    checks.refuse_forward_ad("lstm_layer", "recurrent", input, weight_ih, weight_hh, bias, hx, cx)
    keep = needs_backward(input, weight_ih, weight_hh, bias, hx, cx)
    output, h_n, c_n, _, _ = op(input, weight_ih, weight_hh, bias, hx, cx, lengths, keep,
                                *_packed_args("lstm_layer", packed_weights, keep))
    return output, h_n, c_n


def run_gru(op, input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
            bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None,
            packed_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    checks.refuse_forward_ad("gru_layer", "recurrent", input, weight_ih, weight_hh, bias_ih, bias_hh, hx)
    keep = needs_backward(input, weight_ih, weight_hh, bias_ih, bias_hh, hx)
    output, h_n, _ = op(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths, keep,
                        *_packed_args("gru_layer", packed_weights, keep))
    return output, h_n


def run_rnn(op, input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
            hx: Tensor, lengths: Tensor | None, nonlinearity: str,
            packed_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    checks.refuse_forward_ad("rnn_layer", "recurrent", input, weight_ih, weight_hh, bias, hx)
    keep = needs_backward(input, weight_ih, weight_hh, bias, hx)
    return op(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity,
              *_packed_args("rnn_layer", packed_weights, keep))


def lstm_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None, packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one or both directions, on the compiled kernel.

    input: [T, B, I]; weight_ih: [D, 4H, I]; weight_hh: [D, 4H, H] (gate order i, f, g, o);
    bias: [D, 4H] (b_ih + b_hh) or None; hx, cx: [D, B, H];
    lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None for all T.
    packed_weights: pack_recurrent_weights(weight_ih, weight_hh), in inference on CPU
    (float32/float64), to skip packing them again; the caller keeps it matched to them.
    Returns output [T, B, D*H] (zero past each length), h_n and c_n [D, B, H]
    (at each sequence's last valid step; the reverse direction starts there).
    """
    return run_lstm(torch.ops.seqfuse.lstm_layer.default, input, weight_ih, weight_hh, bias, hx,
                    cx, lengths, packed_weights)


def lstm_proj_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, weight_hr: Tensor,
    hx: Tensor, cx: Tensor, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer with a projection (torch.nn.LSTM's proj_size P < H), one or both
    directions, on the compiled kernel: h_t = W_hr (o * tanh(c_t)).

    input: [T, B, I]; weight_ih: [D, 4H, I]; weight_hh: [D, 4H, P]; bias: [D, 4H] or None;
    weight_hr: [D, P, H]; hx: [D, B, P]; cx: [D, B, H]; lengths as lstm_layer's.
    Returns output [T, B, D*P] (zero past each length), h_n [D, B, P] and c_n [D, B, H].
    """
    checks.refuse_forward_ad("lstm_proj_layer", "recurrent", input, weight_ih, weight_hh, bias,
                             weight_hr, hx, cx)
    keep = needs_backward(input, weight_ih, weight_hh, bias, weight_hr, hx, cx)
    output, h_n, c_n, _, _ = torch.ops.seqfuse.lstm_proj_layer.default(
        input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths, keep)
    return output, h_n, c_n


def gru_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
    bias_hh: Tensor | None, hx: Tensor, lengths: Tensor | None = None,
    packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer (PyTorch's formula), one or both directions, on the compiled kernel.

    input: [T, B, I]; weight_ih: [D, 3H, I]; weight_hh: [D, 3H, H] (gate order r, z, n);
    bias_ih, bias_hh: [D, 3H] or None; hx: [D, B, H];
    lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None for all T.
    Returns output [T, B, D*H] (zero past each length) and h_n [D, B, H].
    """
    return run_gru(torch.ops.seqfuse.gru_layer.default, input, weight_ih, weight_hh, bias_ih,
                   bias_hh, hx, lengths, packed_weights)


def rnn_layer(
    input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None, hx: Tensor,
    lengths: Tensor | None = None, nonlinearity: str = "tanh", packed_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer, h' = act(x W_ih^T + h W_hh^T + b), one or both directions, on
    the compiled kernel.

    input: [T, B, I]; weight_ih: [D, H, I]; weight_hh: [D, H, H]; bias: [D, H] (b_ih + b_hh)
    or None; hx: [D, B, H]; lengths: [B] int64 on CPU with 1 <= lengths[b] <= T, or None;
    nonlinearity: "tanh" or "relu".
    Returns output [T, B, D*H] (zero past each length) and h_n [D, B, H].
    """
    return run_rnn(torch.ops.seqfuse.rnn_layer.default, input, weight_ih, weight_hh, bias, hx,
                   lengths, nonlinearity, packed_weights)


def pack_recurrent_weights(weight_ih: Tensor, weight_hh: Tensor) -> Tensor:
    """A layer's weights (weight_ih [D, G, I], weight_hh [D, G, H]; CPU, float32/float64)
    in the tile panels the CPU kernels read: the packed_weights argument of the layer ops,
    which then skip packing them (a third of a 16-step BiLSTM call at batch 1). For the
    projected ops, pack with a weight_ih of I = 0: [D, G, 0]. The result depends on the
    values of the weights: pack again after changing them."""
    return torch.ops.seqfuse.pack_recurrent_weights.default(weight_ih, weight_hh)


def lstm_layer_projected(projected: Tensor, weight_hh: Tensor, hx: Tensor, cx: Tensor,
                         lengths: Tensor | None = None,
                         packed_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """An LSTM layer's inference from its input projection (CPU, float32/float64):
    projected [T, B, D, 4H] = x W_ih^T + b_ih + b_hh of each direction (for a first layer
    over an embedding: rows of the folded table, seqfuse.nn.LSTM.forward_tokens). Returns
    what lstm_layer returns. No backward: refused if a gradient is needed. packed_weights:
    pack_recurrent_weights of an empty [D, 4H, 0] weight_ih and weight_hh."""
    _refuse_grad("lstm_layer_projected", projected, weight_hh, hx, cx)
    return torch.ops.seqfuse.lstm_layer_projected.default(projected, weight_hh, hx, cx, lengths,
                                                          packed_weights)


def gru_layer_projected(projected: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, hx: Tensor,
                        lengths: Tensor | None = None,
                        packed_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A GRU layer's inference from its input projection: projected [T, B, D, 3H] =
    x W_ih^T + b_ih of each direction (b_hh stays apart, inside the reset gate). As
    lstm_layer_projected."""
    _refuse_grad("gru_layer_projected", projected, weight_hh, bias_hh, hx)
    return torch.ops.seqfuse.gru_layer_projected.default(projected, weight_hh, bias_hh, hx, lengths,
                                                         packed_weights)


def quantized_rnn_layer(mode: str, input: Tensor, weight_ih: Tensor, scale_ih: Tensor,
                        weight_hh: Tensor, scale_hh: Tensor, bias_ih: Tensor | None,
                        bias_hh: Tensor | None, hx: Tensor, cx: Tensor | None,
                        lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """An int8 dynamically quantised LSTM ("lstm") or GRU ("gru") layer, inference only
    (csrc/quantized.h): int8 weights [D, G, K] with float32 scales [D, G] per row; the
    activations quantised per row and step to int8 inside the kernel (AVX512-VNNI where the
    CPU kernels' capability is avx512_bf16 or amx). bias_ih: the LSTM's b_ih + b_hh, or the
    GRU's b_ih; bias_hh: the GRU's b_hh (None for the LSTM). Returns output [T, B, D*H],
    h_n [D, B, H] and c_n [D, B, H] ([0] for the GRU). Off CPU, or without the compiled
    ops, runs reference.quantized_rnn_layer."""
    _refuse_grad("quantized_rnn_layer", input, hx, cx, bias_ih, bias_hh, scale_ih, scale_hh)
    if input.device.type == "cpu" and ("quantized_rnn_layer", "cpu") in _native():
        return torch.ops.seqfuse.quantized_rnn_layer.default(mode, input, weight_ih, scale_ih, weight_hh,
                                                             scale_hh, bias_ih, bias_hh, hx, cx, lengths)
    return reference.quantized_rnn_layer(mode, input, weight_ih, scale_ih, weight_hh, scale_hh,
                                         bias_ih, bias_hh, hx, cx, lengths)


def _native() -> frozenset:
    from . import NATIVE_KERNELS
    return NATIVE_KERNELS


def _refuse_grad(op: str, *tensors: Tensor | None) -> None:
    checks.refuse_forward_ad(op, "recurrent", *tensors)
    if needs_backward(*tensors):
        raise NotImplementedError(
            f"{op}: has no backward (it serves inference); call the layer op on the input "
            f"instead, or run under torch.no_grad()")


# ---------------------------------------------------------------------------------
# Autograd: one formula per op, for every twin. Saved: the forward's inputs (biases are
# not needed: only whether there was one) and its outputs as the op returns them.
# ---------------------------------------------------------------------------------

def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    # An output that did not reach the loss comes back as None.
    return torch.zeros_like(like) if grad is None else grad


def zero_padding(input: Tensor, lengths: Tensor | None) -> Tensor:
    """input [T, B, I] with the steps past each length set to 0, for the backward ops:
    they form grad_weight_ih = dgates^T x over all T * B rows, and a padding row's zero
    dgates times a NaN or Inf there (garbage padding, a failed sensor's features) made
    every weight_ih gradient NaN. The forward never reads those steps, so nothing else
    changes. A copy only when some sequence is shorter than T."""
    if lengths is None or not checks.has_values(lengths):
        return input
    T = input.shape[0]
    if bool((lengths >= T).all()):
        return input
    pad = torch.arange(T, device=lengths.device)[:, None] >= lengths[None, :]  # [T, B]
    return input.masked_fill(pad.to(input.device)[:, :, None], 0)


def register_lstm_autograd(forward: str, backward: str) -> None:
    """forward, backward: op names in the seqfuse namespace (lstm_layer and
    lstm_layer_backward, or their _triton twins), with lstm_layer's schemas."""

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias, hx, cx, lengths = inputs[:7]  # then keep (, packed)
        out, _, _, gates, cells = output
        ctx.n_inputs = len(inputs)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight_ih, weight_hh, bias, hx, cx, lengths, out, gates, cells)

    def backward_fn(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        input, weight_ih, weight_hh, bias, hx, cx, lengths, out, gates, cells = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient to differentiate again
            inputs = (input, weight_ih, weight_hh, bias, hx, cx)
            return checks.differentiable_backward(
                lambda: reference.lstm_layer(*inputs, lengths), inputs, ctx.needs_input_grad[:6],
                (grad_output, grad_h_n, grad_c_n)) + (None,) * (ctx.n_inputs - 6)
        gi, gw_ih, gw_hh, gb, ghx, gcx = getattr(torch.ops.seqfuse, backward).default(
            _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, hx),
            _zeros_if_none(grad_c_n, cx), zero_padding(input, lengths), weight_ih, weight_hh, hx, cx, lengths, out,
            gates, cells)
        return (gi, gw_ih, gw_hh, (gb if ctx.has_bias else None), ghx, gcx) + (None,) * (ctx.n_inputs - 6)

    torch.library.register_autograd(f"seqfuse::{forward}", backward_fn, setup_context=setup_context)
    checks.refuse_double_backward(forward, backward)


def register_lstm_proj_autograd() -> None:
    """lstm_proj_layer's formula (CPU kernel only). The backward zeroes the input's padding
    rows itself."""

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths = inputs[:8]
        out, _, _, gates, cells = output
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths, out,
                              gates, cells)

    def backward_fn(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        (input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths, out, gates,
         cells) = ctx.saved_tensors
        inputs = (input, weight_ih, weight_hh, bias, weight_hr, hx, cx)
        if torch.is_grad_enabled():  # create_graph=True: a gradient to differentiate again
            return checks.differentiable_backward(
                lambda: reference.lstm_proj_layer(*inputs, lengths), inputs,
                ctx.needs_input_grad[:7], (grad_output, grad_h_n, grad_c_n)) + (None, None)
        gi, gw_ih, gw_hh, gb, gw_hr, ghx, gcx = torch.ops.seqfuse.lstm_proj_layer_backward.default(
            _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, hx),
            _zeros_if_none(grad_c_n, cx), input, weight_ih, weight_hh, weight_hr, hx, cx, lengths,
            out, gates, cells)
        return (gi, gw_ih, gw_hh, (gb if ctx.has_bias else None), gw_hr, ghx, gcx, None, None)

    torch.library.register_autograd("seqfuse::lstm_proj_layer", backward_fn,
                                    setup_context=setup_context)
    checks.refuse_double_backward("lstm_proj_layer", "lstm_proj_layer_backward")


def register_gru_autograd(forward: str, backward: str) -> None:
    """As register_lstm_autograd, for gru_layer's schemas."""

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths = inputs[:7]  # then keep (, packed)
        out, _, gates = output
        ctx.n_inputs = len(inputs)
        ctx.has_bias = (bias_ih is not None, bias_hh is not None)
        ctx.save_for_backward(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths, out, gates)

    def backward_fn(ctx, grad_output, grad_h_n, _grad_gates):
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths, out, gates = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (input, weight_ih, weight_hh, bias_ih, bias_hh, hx)
            return checks.differentiable_backward(
                lambda: reference.gru_layer(*inputs, lengths), inputs, ctx.needs_input_grad[:6],
                (grad_output, grad_h_n)) + (None,) * (ctx.n_inputs - 6)
        gi, gw_ih, gw_hh, gb_ih, gb_hh, ghx = getattr(torch.ops.seqfuse, backward).default(
            _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, hx),
            zero_padding(input, lengths), weight_ih, weight_hh, hx, lengths, out, gates)
        return ((gi, gw_ih, gw_hh, gb_ih if ctx.has_bias[0] else None,
                 gb_hh if ctx.has_bias[1] else None, ghx) + (None,) * (ctx.n_inputs - 6))

    torch.library.register_autograd(f"seqfuse::{forward}", backward_fn, setup_context=setup_context)
    checks.refuse_double_backward(forward, backward)


def register_rnn_autograd(forward: str, backward: str) -> None:
    """As register_lstm_autograd, for rnn_layer's schemas. Nothing but the output is saved:
    act'(pre) is a function of it."""

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity = inputs[:7]  # (, packed)
        ctx.n_inputs = len(inputs)
        ctx.has_bias = bias is not None
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(input, weight_ih, weight_hh, bias, hx, lengths, output[0])

    def backward_fn(ctx, grad_output, grad_h_n):
        input, weight_ih, weight_hh, bias, hx, lengths, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (input, weight_ih, weight_hh, bias, hx)
            return checks.differentiable_backward(
                lambda: reference.rnn_layer(*inputs, lengths, ctx.nonlinearity), inputs,
                ctx.needs_input_grad[:5], (grad_output, grad_h_n)) + (None,) * (ctx.n_inputs - 5)
        gi, gw_ih, gw_hh, gb, ghx = getattr(torch.ops.seqfuse, backward).default(
            _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, hx),
            zero_padding(input, lengths), weight_ih, weight_hh, hx, lengths, out, ctx.nonlinearity)
        return (gi, gw_ih, gw_hh, (gb if ctx.has_bias else None), ghx) + (None,) * (ctx.n_inputs - 5)

    torch.library.register_autograd(f"seqfuse::{forward}", backward_fn, setup_context=setup_context)
    checks.refuse_double_backward(forward, backward)


# ---------------------------------------------------------------------------------
# Fakes of the compiled ops (the Triton ops are their own fakes). The dispatcher sends a
# call with any meta tensor here, so they check what the kernels' C++ checks would not
# reach: devices (a meta/CPU mix must fail, not "succeed" with uninitialised tensors).
# ---------------------------------------------------------------------------------

def _fake_devices(op: str, input: Tensor, lengths: Tensor | None, **tensors) -> None:
    checks.same_device(op, "input", input, **tensors)
    if lengths is not None:
        checks.check(op, lengths.device.type == "cpu"
                     or lengths.device.type == input.device.type == "meta",
                     f"lengths must be a CPU tensor, got device {lengths.device}")


def register_compiled() -> None:
    """Fakes and autograd of the compiled ops (only once seqfuse._C has declared them)."""

    @torch.library.register_fake("seqfuse::quantized_rnn_layer")
    def _quantized_rnn_layer_fake(mode, input, weight_ih, scale_ih, weight_hh, scale_hh, bias_ih,
                                  bias_hh, hx, cx, lengths):
        T, B, _ = input.shape
        D, _, H = weight_hh.shape
        c_n = input.new_empty(D, B, H) if mode == "lstm" else input.new_empty(0)
        return input.new_empty(T, B, D * H), input.new_empty(D, B, H), c_n

    @torch.library.register_fake("seqfuse::lstm_layer")
    def _lstm_layer_fake(input, weight_ih, weight_hh, bias, hx, cx, lengths, keep_activations=True,
                         packed_weights=None):
        _fake_devices("lstm_layer", input, lengths, weight_ih=weight_ih, weight_hh=weight_hh,
                      bias=bias, hx=hx, cx=cx)
        T, B, _ = input.shape
        D, G, _ = weight_ih.shape
        H = weight_hh.shape[2]
        act = activation_dtype(input)
        if keep_activations:
            gates = input.new_empty(T, B, D, G, dtype=act)
            cells = input.new_empty(T, B, D, H, dtype=act)
        else:
            gates, cells = input.new_empty(0, dtype=act), input.new_empty(0, dtype=act)
        return (input.new_empty(T, B, D * H), input.new_empty(D, B, H), input.new_empty(D, B, H),
                gates, cells)

    @torch.library.register_fake("seqfuse::lstm_layer_backward")
    def _lstm_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                  hx, cx, lengths, output, gates, cells):
        _fake_devices("lstm_layer_backward", input, lengths, grad_output=grad_output,
                      grad_h_n=grad_h_n, grad_c_n=grad_c_n, weight_ih=weight_ih,
                      weight_hh=weight_hh, hx=hx, cx=cx, output=output, gates=gates, cells=cells)
        D, G, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, G), torch.empty_like(hx), torch.empty_like(cx))

    @torch.library.register_fake("seqfuse::lstm_proj_layer")
    def _lstm_proj_layer_fake(input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths,
                              keep_activations=True):
        _fake_devices("lstm_proj_layer", input, lengths, weight_ih=weight_ih, weight_hh=weight_hh,
                      bias=bias, weight_hr=weight_hr, hx=hx, cx=cx)
        T, B, _ = input.shape
        D, P, H = weight_hr.shape
        act = activation_dtype(input)
        if keep_activations:
            gates = input.new_empty(T, B, D, 4 * H, dtype=act)
            cells = input.new_empty(T, B, D, H, dtype=act)
        else:
            gates, cells = input.new_empty(0, dtype=act), input.new_empty(0, dtype=act)
        return (input.new_empty(T, B, D * P), input.new_empty(D, B, P), input.new_empty(D, B, H),
                gates, cells)

    @torch.library.register_fake("seqfuse::lstm_proj_layer_backward")
    def _lstm_proj_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                       weight_hh, weight_hr, hx, cx, lengths, output, gates, cells):
        _fake_devices("lstm_proj_layer_backward", input, lengths, grad_output=grad_output,
                      grad_h_n=grad_h_n, grad_c_n=grad_c_n, weight_ih=weight_ih,
                      weight_hh=weight_hh, weight_hr=weight_hr, hx=hx, cx=cx, output=output,
                      gates=gates, cells=cells)
        D, G, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, G), torch.empty_like(weight_hr), torch.empty_like(hx),
                torch.empty_like(cx))

    @torch.library.register_fake("seqfuse::gru_layer")
    def _gru_layer_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, lengths,
                        keep_activations=True, packed_weights=None):
        _fake_devices("gru_layer", input, lengths, weight_ih=weight_ih, weight_hh=weight_hh,
                      bias_ih=bias_ih, bias_hh=bias_hh, hx=hx)
        T, B, _ = input.shape
        D = weight_ih.shape[0]
        H = weight_hh.shape[2]
        act = activation_dtype(input)
        gates = (input.new_empty(T, B, D, 4 * H, dtype=act) if keep_activations
                 else input.new_empty(0, dtype=act))
        return input.new_empty(T, B, D * H), input.new_empty(D, B, H), gates

    @torch.library.register_fake("seqfuse::gru_layer_backward")
    def _gru_layer_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                 output, gates):
        _fake_devices("gru_layer_backward", input, lengths, grad_output=grad_output,
                      grad_h_n=grad_h_n, weight_ih=weight_ih, weight_hh=weight_hh, hx=hx,
                      output=output, gates=gates)
        D, G, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, G), input.new_empty(D, G), torch.empty_like(hx))

    @torch.library.register_fake("seqfuse::rnn_layer")
    def _rnn_layer_fake(input, weight_ih, weight_hh, bias, hx, lengths, nonlinearity="tanh",
                        packed_weights=None):
        _fake_devices("rnn_layer", input, lengths, weight_ih=weight_ih, weight_hh=weight_hh,
                      bias=bias, hx=hx)
        checks.nonlinearity("rnn_layer", nonlinearity)
        T, B, _ = input.shape
        D = weight_ih.shape[0]
        H = weight_hh.shape[2]
        return input.new_empty(T, B, D * H), input.new_empty(D, B, H)

    @torch.library.register_fake("seqfuse::rnn_layer_backward")
    def _rnn_layer_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, hx, lengths,
                                 output, nonlinearity="tanh"):
        _fake_devices("rnn_layer_backward", input, lengths, grad_output=grad_output,
                      grad_h_n=grad_h_n, weight_ih=weight_ih, weight_hh=weight_hh, hx=hx,
                      output=output)
        D, H, _ = weight_ih.shape
        return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
                input.new_empty(D, H), torch.empty_like(hx))

    @torch.library.register_fake("seqfuse::lstm_layer_projected")
    def _lstm_layer_projected_fake(projected, weight_hh, hx, cx, lengths, packed_weights=None):
        _fake_devices("lstm_layer_projected", projected, lengths, weight_hh=weight_hh, hx=hx, cx=cx)
        T, B, D, _ = projected.shape
        H = weight_hh.shape[2]
        return (projected.new_empty(T, B, D * H), projected.new_empty(D, B, H),
                projected.new_empty(D, B, H))

    @torch.library.register_fake("seqfuse::gru_layer_projected")
    def _gru_layer_projected_fake(projected, weight_hh, bias_hh, hx, lengths, packed_weights=None):
        _fake_devices("gru_layer_projected", projected, lengths, weight_hh=weight_hh,
                      bias_hh=bias_hh, hx=hx)
        T, B, D, _ = projected.shape
        H = weight_hh.shape[2]
        return projected.new_empty(T, B, D * H), projected.new_empty(D, B, H)

    # The projected ops have no backward: a graph that reaches them with a gradient to
    # compute raises at backward time instead of returning none.
    for name in ("lstm_layer_projected", "gru_layer_projected"):
        checks.refuse_backward(name)

    register_lstm_autograd("lstm_layer", "lstm_layer_backward")
    register_lstm_proj_autograd()
    register_gru_autograd("gru_layer", "gru_layer_backward")
    register_rnn_autograd("rnn_layer", "rnn_layer_backward")
