"""The one Python check layer: the argument checks of every seqfuse op, for the backends
that run in Python (the reference, eager PyTorch; the Triton kernels).

The compiled ops check the same arguments in C++ (csrc/layer_checks.cpp,
csrc/attention_checks.cpp). Every message here is the C++ TORCH_CHECK's word for word, and
the error is RuntimeError as TORCH_CHECK raises, so a caller that switches backends sees
the same exception type and text (tests/ops/test_checks.py sends the same bad call to
every backend). Shapes print as lists ([2, 3]), dtypes under their Python names
(torch.float32; C++ prints them through check_format.h), floats as C++ streams them (%g).

What a backend supports beyond the common contract (its dtypes) is the `dtypes` argument:
the message lists them, so it differs only there.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.autograd import forward_ad

# Every op's dtypes, per backend (the compiled kernels: float32, float64, bfloat16, and
# float16 on CUDA, checked in C++).
REFERENCE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# No float64 in Triton: states, cell math and softmax statistics are float32 by design.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

NONLINEARITIES = ("tanh", "relu")
_MAX_INT32 = 2**31 - 1


def fail(op: str, message: str):
    raise RuntimeError(f"{op}: {message}")


def check(op: str, cond: bool, message: str) -> None:
    if not cond:
        fail(op, message)


def is_trace_tensor(t: Tensor) -> bool:
    """Whether t stands for a tensor without holding its values: meta, fake (torch.export,
    torch.compile, opcheck) or functional (AOT autograd)."""
    return (t.device.type == "meta" or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def has_values(t: Tensor) -> bool:
    """Whether t's values can be read here: not a trace's tensor (is_trace_tensor), and not
    while torch.compile or torch.jit trace. Value checks, such as a length's range, then
    wait for the eager call (the compiled ops check them in C++ at run time)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_trace_tensor(t))


def require_tensors(op: str, **tensors) -> None:
    """TypeError for an argument that is neither a Tensor nor None (what the dispatcher
    raises for a compiled op, before any check)."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def shape(t: Tensor) -> list[int]:
    return list(t.shape)


def number(x: float) -> str:
    """A float as C++'s ostream prints it (1, 1.5, 1e-07, inf, nan)."""
    return format(float(x), "g")


def _dtype_list(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def floating(op: str, name: str, t: Tensor, dtypes) -> None:
    check(op, t.dtype in dtypes, f"{name} dtype must be {_dtype_list(dtypes)}, got {t.dtype}")


def same_dtype_device(op: str, ref_name: str, ref: Tensor, dtypes_too: bool = True,
                      **tensors) -> None:
    """Each tensor has ref's dtype (unless not dtypes_too) and device."""
    for name, t in tensors.items():
        if t is None:
            continue
        check(op, not dtypes_too or t.dtype == ref.dtype,
              f"{name} must have the {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        check(op, t.device == ref.device,
              f"{name} must be on the {ref_name}'s device {ref.device}, got {t.device}")


def same_device(op: str, ref_name: str, ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check(op, t.device == ref.device,
                  f"{name} must be on the {ref_name}'s device {ref.device}, got {t.device}")


# ---------------------------------------------------------------------------------
# Recurrent layers (csrc/layer_checks.cpp)
# ---------------------------------------------------------------------------------

def layer_args(op: str, NG: int, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               biases: dict, hx: Tensor, cx: Tensor | None, lengths: Tensor | None, dtypes,
               dtypes_must_match: bool = True) -> None:
    """One recurrent layer's arguments. NG: gate blocks (4 LSTM, 3 GRU, 1 RNN); biases:
    {"bias": b} or {"bias_ih": b, "bias_hh": b} (None entries skipped); cx: the LSTM's only.
    Shapes: input [T, B, I], weight_ih [D, NG*H, I], weight_hh [D, NG*H, H], biases
    [D, NG*H], hx/cx [D, B, H], lengths [B] int64 on the CPU with 1 <= lengths <= T."""
    T, B, I = _layer_input(op, input, dtypes)
    check(op, weight_ih.dim() == 3 and weight_ih.shape[0] in (1, 2),
          f"weight_ih must be [D, {NG}H, I] with D in {{1, 2}}, got {shape(weight_ih)}")
    D = weight_ih.shape[0]
    check(op, weight_hh.dim() == 3 and weight_hh.shape[0] == D and weight_hh.shape[2] >= 1
          and weight_hh.shape[1] == NG * weight_hh.shape[2],
          f"weight_hh must be [D={D}, {NG}H, H], got {shape(weight_hh)}")
    H = weight_hh.shape[2]
    check(op, H <= _MAX_INT32, f"weight_hh must have a hidden size H below 2^31, got H={H}")
    check(op, tuple(weight_ih.shape[1:]) == (NG * H, I),
          f"weight_ih must be [{D}, {NG * H}, {I}] for input features I={I} and hidden size "
          f"H={H}, got {shape(weight_ih)}")
    check(op, tuple(hx.shape) == (D, B, H), f"hx must be [{D}, {B}, {H}], got {shape(hx)}")
    if cx is not None:
        check(op, tuple(cx.shape) == (D, B, H), f"cx must be [{D}, {B}, {H}], got {shape(cx)}")
    same_dtype_device(op, "input", input, dtypes_must_match, weight_ih=weight_ih,
                      weight_hh=weight_hh, hx=hx, cx=cx, **biases)
    for name, b in biases.items():
        if b is not None:
            check(op, tuple(b.shape) == (D, NG * H), f"{name} must be [{D}, {NG * H}], got {shape(b)}")
    _layer_lengths(op, lengths, input, T, B)


def _layer_input(op: str, input: Tensor, dtypes) -> tuple[int, int, int]:
    """input [T, B, I] of a layer op; returns (T, B, I)."""
    check(op, input.dim() == 3,
          f"input must be 3-D [T, B, I], got {input.dim()}-D with shape {shape(input)}")
    floating(op, "input", input, dtypes)
    T, B, I = input.shape
    check(op, T >= 1, f"input must have at least one time step, got T={T}")
    check(op, B >= 1, f"input must have a batch of at least 1, got B={B}")
    check(op, I <= _MAX_INT32, f"input must have fewer than 2^31 features, got I={I}")
    return T, B, I


def _layer_lengths(op: str, lengths: Tensor | None, input: Tensor, T: int, B: int) -> None:
    if lengths is None:
        return
    check(op, lengths.dtype == torch.int64, f"lengths must be int64, got {lengths.dtype}")
    # A meta `lengths` goes only with a meta input (shape inference: nothing is read).
    check(op, lengths.device.type == "cpu" or lengths.device.type == input.device.type == "meta",
          f"lengths must be a CPU tensor, got device {lengths.device}")
    check(op, lengths.dim() == 1 and lengths.shape[0] == B,
          f"lengths must be [B={B}], got shape {shape(lengths)}")
    if has_values(lengths):
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        check(op, lo >= 1, f"every length must be >= 1, got min(lengths)={lo}")
        check(op, hi <= T, f"every length must be <= T={T}, got max(lengths)={hi}")


def lstm_proj_args(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                   weight_hr: Tensor, hx: Tensor, cx: Tensor, lengths: Tensor | None, dtypes,
                   dtypes_must_match: bool = True) -> None:
    """lstm_proj_layer's arguments (csrc/layer_checks.cpp): input [T, B, I], weight_ih
    [D, 4H, I], weight_hh [D, 4H, P], bias [D, 4H], weight_hr [D, P, H] with 1 <= P < H,
    hx [D, B, P], cx [D, B, H], lengths as layer_args'."""
    op = "lstm_proj_layer"
    T, B, I = _layer_input(op, input, dtypes)
    check(op, weight_hr.dim() == 3 and weight_hr.shape[0] in (1, 2) and weight_hr.shape[1] >= 1
          and weight_hr.shape[2] > weight_hr.shape[1],
          f"weight_hr must be [D, P, H] with D in {{1, 2}} and 1 <= P < H (torch.nn.LSTM's "
          f"proj_size < hidden_size), got {shape(weight_hr)}")
    D, P, H = weight_hr.shape
    check(op, H <= _MAX_INT32, f"weight_hr must have a hidden size H below 2^31, got H={H}")
    check(op, tuple(weight_ih.shape) == (D, 4 * H, I),
          f"weight_ih must be [{D}, {4 * H}, {I}] for input features I={I} and hidden size H={H}, "
          f"got {shape(weight_ih)}")
    check(op, tuple(weight_hh.shape) == (D, 4 * H, P),
          f"weight_hh must be [{D}, {4 * H}, {P}] for hidden size H={H} and proj_size P={P}, "
          f"got {shape(weight_hh)}")
    check(op, tuple(hx.shape) == (D, B, P), f"hx must be [{D}, {B}, {P}], got {shape(hx)}")
    check(op, tuple(cx.shape) == (D, B, H), f"cx must be [{D}, {B}, {H}], got {shape(cx)}")
    same_dtype_device(op, "input", input, dtypes_must_match, weight_ih=weight_ih,
                      weight_hh=weight_hh, weight_hr=weight_hr, hx=hx, cx=cx, bias=bias)
    if bias is not None:
        check(op, tuple(bias.shape) == (D, 4 * H), f"bias must be [{D}, {4 * H}], got {shape(bias)}")
    _layer_lengths(op, lengths, input, T, B)


def nonlinearity(op: str, value: str) -> None:
    check(op, value in NONLINEARITIES, f"nonlinearity must be 'tanh' or 'relu', got '{value}'")


def layer_backward_args(op: str, forward: str, input: Tensor, weight_ih: Tensor,
                        weight_hh: Tensor, grad_output: Tensor, output: Tensor,
                        grad_h_n: Tensor, hx: Tensor, **more: Tensor) -> None:
    """A backward op's own arguments, after its forward's (layer_args): the forward's
    output [T, B, D*H] and the incoming gradients in its shapes, on the input's device."""
    T, B = input.shape[:2]
    DH = weight_ih.shape[0] * weight_hh.shape[2]
    check(op, tuple(output.shape) == (T, B, DH),
          f"output must come from {forward} on the same input, [{T}, {B}, {DH}], got {shape(output)}")
    check(op, grad_output.shape == output.shape,
          f"grad_output must have shape {shape(output)}, got {shape(grad_output)}")
    check(op, grad_h_n.shape == hx.shape,
          f"grad_h_n must have shape {shape(hx)}, got {shape(grad_h_n)}")
    same_device(op, "input", input, grad_output=grad_output, output=output, grad_h_n=grad_h_n,
                **more)


def lstm_activations(op: str, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                     grad_c_n: Tensor, cx: Tensor, gates: Tensor, cells: Tensor) -> None:
    T, B = input.shape[:2]
    D, H = weight_ih.shape[0], weight_hh.shape[2]
    check(op, grad_c_n.shape == cx.shape,
          f"grad_c_n must have shape {shape(cx)}, got {shape(grad_c_n)}")
    check(op, tuple(gates.shape) == (T, B, D, 4 * H) and tuple(cells.shape) == (T, B, D, H),
          "gates/cells must come from lstm_layer on the same input with keep_activations=True; "
          f"got gates {shape(gates)} and cells {shape(cells)}")


def gru_activations(op: str, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    gates: Tensor) -> None:
    T, B = input.shape[:2]
    D, H = weight_ih.shape[0], weight_hh.shape[2]
    check(op, tuple(gates.shape) == (T, B, D, 4 * H),
          "gates must come from gru_layer on the same input with keep_activations=True; "
          f"got gates {shape(gates)}")


# ---------------------------------------------------------------------------------
# Attention (csrc/attention_checks.cpp)
# ---------------------------------------------------------------------------------

def _valid_lens(op: str, lens: Tensor, query: Tensor, B: int, Q: int, K: int) -> None:
    """valid_lens: [B] or [B, Q], integer, on the query's device, values in [0, K]."""
    check(op, not (lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool),
          f"valid_lens must be an integer tensor, got {lens.dtype}")
    check(op, lens.device == query.device,
          f"valid_lens must be on the query's device {query.device}, got {lens.device}")
    check(op, tuple(lens.shape) in ((B,), (B, Q)),
          f"valid_lens must be [B={B}] or [B, Q]=[{B}, {Q}], got shape {shape(lens)}")
    if lens.numel() and has_values(lens):
        lo, hi = (int(v) for v in torch.aminmax(lens))
        check(op, lo >= 0 and hi <= K, f"valid_lens must be in [0, K={K}], got values in [{lo}, {hi}]")


def _mask_shape(op: str, name: str, mask: Tensor, target: tuple[int, ...]) -> None:
    ok = mask.dim() <= len(target) and all(
        m == 1 or m == t for m, t in zip(reversed(mask.shape), reversed(target)))
    check(op, ok, f"{name} must be broadcastable to {list(target)}, got shape {shape(mask)}")


def additive_args(query: Tensor, key: Tensor, w_v: Tensor, value: Tensor,
                  valid_lens: Tensor | None, mask: Tensor | None, dtypes,
                  dtypes_must_match: bool = True) -> None:
    """query [B, Q, A], key [B, K, A], w_v [A], value [B, K, Dv]; valid_lens [B] or
    [B, Q]; mask bool broadcastable to [B, Q, K]."""
    op = "additive_attention"
    check(op, query.dim() == 3, f"query must be 3-D [B, Q, A], got shape {shape(query)}")
    floating(op, "query", query, dtypes)
    B, Q, A = query.shape
    check(op, B >= 1 and Q >= 1 and A >= 1, f"query must have B, Q, A >= 1, got shape {shape(query)}")
    check(op, key.dim() == 3 and key.shape[0] == B and key.shape[2] == A and key.shape[1] >= 1,
          f"key must be [B={B}, K>=1, A={A}], got shape {shape(key)}")
    K = key.shape[1]
    check(op, w_v.dim() == 1 and w_v.shape[0] == A, f"w_v must be [A={A}], got shape {shape(w_v)}")
    check(op, value.dim() == 3 and tuple(value.shape[:2]) == (B, K),
          f"value must be [B={B}, K={K}, Dv], got shape {shape(value)}")
    same_dtype_device(op, "query", query, dtypes_must_match, key=key, w_v=w_v, value=value)
    if valid_lens is not None:
        _valid_lens(op, valid_lens, query, B, Q, K)
    if mask is not None:
        check(op, mask.dtype == torch.bool, f"mask must be bool (True = attend), got {mask.dtype}")
        same_device(op, "query", query, mask=mask)
        _mask_shape(op, "mask", mask, (B, Q, K))


def additive_backward_args(grad_context: Tensor, grad_weights: Tensor, query: Tensor,
                           key: Tensor, w_v: Tensor, value: Tensor, weights: Tensor,
                           dtypes) -> None:
    op = "additive_attention_backward"
    additive_args(query, key, w_v, value, None, None, dtypes)
    B, Q = query.shape[:2]
    K, Dv = key.shape[1], value.shape[2]
    check(op, tuple(grad_context.shape) == (B, Q, Dv),
          f"grad_context must be [{B}, {Q}, {Dv}], got {shape(grad_context)}")
    check(op, tuple(grad_weights.shape) == (B, Q, K) and weights.shape == grad_weights.shape,
          f"weights and grad_weights must be [{B}, {Q}, {K}], got {shape(weights)} and "
          f"{shape(grad_weights)}")
    same_device(op, "query", query, grad_context=grad_context, grad_weights=grad_weights,
                weights=weights)


def sdpa_args(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
              valid_lens: Tensor | None, scale: float | None, dropout_p: float, dtypes,
              dtypes_must_match: bool = True) -> None:
    """query [B, H, Q, D], key [B, H, K, D], value [B, H, K, Dv]; attn_mask bool or
    floating, broadcastable to [B, H, Q, K]; valid_lens [B] or [B, Q]."""
    op = "scaled_dot_product_attention"
    check(op, query.dim() == 4, f"query must be 4-D [B, H, Q, D], got shape {shape(query)}")
    floating(op, "query", query, dtypes)
    B, H, Q, D = query.shape
    # Each size on its own rather than min(): under torch.compile that would guard on the
    # sizes' order.
    check(op, B >= 1 and H >= 1 and Q >= 1 and D >= 1,
          f"query must have B, H, Q, D >= 1, got shape {shape(query)}")
    check(op, key.dim() == 4 and tuple(key.shape[:2]) == (B, H) and key.shape[2] >= 1
          and key.shape[3] == D, f"key must be [B={B}, H={H}, K>=1, D={D}], got shape {shape(key)}")
    K = key.shape[2]
    check(op, value.dim() == 4 and tuple(value.shape[:3]) == (B, H, K) and value.shape[3] >= 1,
          f"value must be [B={B}, H={H}, K={K}, Dv>=1], got shape {shape(value)}")
    same_dtype_device(op, "query", query, dtypes_must_match, key=key, value=value)
    if attn_mask is not None:
        check(op, attn_mask.dtype == torch.bool or attn_mask.is_floating_point(),
              "attn_mask must be bool (True = attend) or floating (added to the scores), got "
              f"{attn_mask.dtype}")
        same_device(op, "query", query, attn_mask=attn_mask)
        _mask_shape(op, "attn_mask", attn_mask, (B, H, Q, K))
    if valid_lens is not None:
        _valid_lens(op, valid_lens, query, B, Q, K)
    check(op, scale is None or float("-inf") < scale < float("inf"),
          f"scale must be finite, got {number(scale) if scale is not None else ''}")
    check(op, 0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {number(dropout_p)}")


def sdpa_backward_args(grad_output: Tensor, query: Tensor, key: Tensor, value: Tensor,
                       attn_mask: Tensor | None, valid_lens: Tensor | None, output: Tensor,
                       softmax_stats: Tensor, scale: float | None, dropout_p: float,
                       dtypes) -> None:
    """softmax_stats: [B, H, Q, 2], the forward's (row max, log row sum)."""
    op = "scaled_dot_product_attention_backward"
    sdpa_args(query, key, value, attn_mask, valid_lens, scale, dropout_p, dtypes)
    B, H, Q = query.shape[:3]
    Dv = value.shape[3]
    check(op, grad_output.shape == output.shape and tuple(output.shape) == (B, H, Q, Dv),
          f"grad_output and output must be [{B}, {H}, {Q}, {Dv}], got {shape(grad_output)} and "
          f"{shape(output)}")
    check(op, tuple(softmax_stats.shape) == (B, H, Q, 2),
          f"softmax_stats must be [{B}, {H}, {Q}, 2], got {shape(softmax_stats)}")
    same_device(op, "query", query, grad_output=grad_output, output=output,
                softmax_stats=softmax_stats)


# ---------------------------------------------------------------------------------
# What the ops' autograd cannot compute is refused, never returned as zeros or None:
# forward-mode AD, double backward, and a gradient for a floating attention mask.
# NotImplementedError (a RuntimeError, as torch's own "not implemented" derivatives).
# ---------------------------------------------------------------------------------

def _in_jvp_transform() -> bool:
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack)


_FORWARD_AD_HINT = {
    # The reference runs torch's own recurrent kernels, which have no forward AD either.
    "recurrent": "torch's own recurrent kernels (the reference backend) have none either",
    "attention": "use backend='reference' for it",
}


def refuse_forward_ad(op: str, kind: str, *tensors: Tensor | None) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no rule for the
    fused ops: without this refusal the tangents came out as zeros. kind: "recurrent" or
    "attention" (what the message suggests instead)."""
    if torch.compiler.is_compiling():  # a trace: no tangents there, and dynamo cannot
        return                         # trace the interpreter stack
    dual = forward_ad._current_level >= 0 and any(
        isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if dual or _in_jvp_transform():
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
            f"supported by the fused kernels; {_FORWARD_AD_HINT[kind]}")


def differentiable_backward(reference, inputs: tuple, needs: tuple, outputs_grads: tuple) -> tuple:
    """The backward of a fused op when the gradient must itself be differentiable
    (create_graph=True: gradient penalties, MAML, Hessian-vector products), on every
    backend: the op's forward recomputed by `reference` (seqfuse.reference: PyTorch's own
    differentiable ops, the same semantics) from the saved inputs, then differentiated with
    create_graph=True, so a second backward reaches every input through PyTorch's formulas.
    It costs one eager forward and backward, only in such calls; first-order backwards
    stay on the fused kernels.

    reference() -> the outputs that outputs_grads are the gradients of (None: an output
    that did not reach the loss). inputs: the op's tensor inputs in its argument order
    (None for absent ones); needs: ctx.needs_input_grad for them. Returns one gradient per
    input (None where not needed)."""
    wrt = [t for t, n in zip(inputs, needs) if n and t is not None]
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN has
        outs = reference()                                                 # no double backward
        pairs = [(o, g) for o, g in zip(outs, outputs_grads) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True, materialize_grads=True)
    it = iter(grads)
    return tuple(next(it) if (n and t is not None) else None for t, n in zip(inputs, needs))


def refuse_double_backward(forward: str, backward: str) -> None:
    """Gives the backward op `seqfuse::<backward>` an autograd formula that refuses. The
    forward ops' own backwards never reach it with a gradient to build
    (differentiable_backward serves create_graph=True); a direct call of the backward op
    with create_graph=True does, and raises instead of silently missing the fused op's
    share (it came out 10% off for weight_ih and None for weight_hh)."""

    def setup_context(ctx, inputs, output):
        pass

    op = forward.removesuffix("_triton")  # the message is the same on every backend

    def backward_fn(ctx, *grads):
        raise NotImplementedError(
            f"{op}: the backward op itself has no derivative; differentiate the forward op "
            f"instead (its gradient under create_graph=True is differentiable)")

    torch.library.register_autograd(f"seqfuse::{backward}", backward_fn, setup_context=setup_context)


def refuse_backward(op: str) -> None:
    """An inference-only op (`seqfuse::<op>`): its autograd formula raises, so a gradient
    through it is an error, never a silent None."""

    def setup_context(ctx, inputs, output):
        pass

    def backward_fn(ctx, *grads):
        raise NotImplementedError(f"{op}: has no backward (it serves inference); call the "
                                  f"layer op on the input instead")

    torch.library.register_autograd(f"seqfuse::{op}", backward_fn, setup_context=setup_context)


def refuse_mask_grad(op: str, attn_mask: Tensor | None) -> None:
    """A floating attn_mask that requires grad (a learned attention bias) would get no
    gradient from the fused backward: refused, where torch would give it one."""
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{op}: attn_mask requires grad (a learned attention bias), but the fused "
            f"kernels give no gradient for the mask; detach it, or use backend='reference'")
