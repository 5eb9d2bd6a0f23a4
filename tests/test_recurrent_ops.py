"""The fused recurrent layer ops (LSTM, GRU, Elman RNN with tanh and relu) against eager
PyTorch: outputs, final states and every gradient over a grid of shapes, directions,
lengths and biases; gradcheck; opcheck; torch.export; torch.compile; argument checks.

Each op is described once by a Kind (its argument list and where things sit in it), so
every test runs on every op."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import TOL, requires_native

from seqfuse import ops, reference

pytestmark = requires_native


@dataclass(frozen=True)
class Kind:
    name: str
    gates: int                 # gate blocks in the weights
    op: Callable               # ops.* wrapper
    ref: Callable              # reference.* (eager PyTorch)
    raw: object                # torch.ops.seqfuse.*.default
    biases: tuple[str, ...]    # names of the bias arguments
    states: tuple[str, ...]    # names of the initial-state arguments
    extra: tuple = ()          # trailing non-tensor arguments (the RNN's nonlinearity)
    keep_flag: bool = True     # the raw op takes keep_activations

    def make_args(self, T, B, I, H, D, dtype=torch.float32, bias=True, lengths=None,
                  requires_grad=False):
        """[input, weight_ih, weight_hh, *biases, *states, lengths, *extra]."""
        # Weights at about twice torch.nn's init scale (U(+-1/sqrt(H))): the recurrence is
        # stable, so float32 rounding differences are not amplified step after step.
        def p(*shape):
            return (torch.randn(*shape, dtype=dtype) * H ** -0.5).requires_grad_(requires_grad)
        G = self.gates * H
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=requires_grad)
        bs = [p(D, G) if bias else None for _ in self.biases]
        hs = [torch.randn(D, B, H, dtype=dtype, requires_grad=requires_grad) for _ in self.states]
        return [x, p(D, G, I), p(D, G, H), *bs, *hs, lengths, *self.extra]

    @property
    def lengths_at(self) -> int:
        return 3 + len(self.biases) + len(self.states)

    def tensors(self, args):
        """The differentiable arguments (no lengths, no absent biases)."""
        return [t for t in args[:self.lengths_at] if t is not None]


KINDS = [
    Kind("lstm", 4, ops.lstm_layer, reference.lstm_layer, torch.ops.seqfuse.lstm_layer.default,
         ("bias",), ("hx", "cx")),
    Kind("gru", 3, ops.gru_layer, reference.gru_layer, torch.ops.seqfuse.gru_layer.default,
         ("bias_ih", "bias_hh"), ("hx",)),
    Kind("rnn-tanh", 1, ops.rnn_layer, reference.rnn_layer, torch.ops.seqfuse.rnn_layer.default,
         ("bias",), ("hx",), ("tanh",), keep_flag=False),
    Kind("rnn-relu", 1, ops.rnn_layer, reference.rnn_layer, torch.ops.seqfuse.rnn_layer.default,
         ("bias",), ("hx",), ("relu",), keep_flag=False),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request):
    return request.param


SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (7, 3, 37, 53),   # odd sizes, not multiples of the vector width
    (5, 1, 16, 128),  # batch 1 with two threads splitting H
    (9, 6, 20, 33),   # a full 6-row tile and more
    (4, 2, 8, 17),
    (6, 30, 20, 40),  # enough rows for threads to split rows instead of units
    (4, 13, 9, 70),   # units split over threads, ragged last tile in the backward
]


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_matches_eager(kind, T, B, I, H, D, with_lengths, bias):
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = 1  # always a length-1 row
    args = kind.make_args(T, B, I, H, D, bias=bias, lengths=lengths, requires_grad=True)
    out = kind.op(*args)
    ref = kind.ref(*args)
    tol = TOL[torch.float32]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    with torch.no_grad():  # inference: no activations saved, projection fused where it pays
        for a, b in zip(kind.op(*args), ref, strict=True):
            torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    weights = [torch.randn_like(t) for t in out]
    leaves = kind.tensors(args)
    g_out = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), leaves)
    g_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), leaves)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


def test_padding_semantics(kind):
    T, B, H = 6, 3, 5
    lengths = torch.tensor([6, 2, 4])
    args = kind.make_args(T, B, 4, H, 2, lengths=lengths)
    out, h_n = kind.op(*args)[:2]
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out[n:, b]) == 0, "outputs past the length must be zero"
        assert torch.equal(h_n[0, b], out[n - 1, b, :H])  # forward: state at the last valid step
        assert torch.equal(h_n[1, b], out[0, b, H:])      # reverse: ends at t = 0


@pytest.mark.parametrize("D,bias,lengths", [(2, True, [4, 1, 3]), (1, False, None)])
def test_float64_gradcheck(kind, D, bias, lengths):
    lengths = torch.tensor(lengths) if lengths else None
    args = kind.make_args(4, 3, 3, 2, D, dtype=torch.float64, bias=bias, lengths=lengths,
                          requires_grad=True)
    present = [i for i in range(kind.lengths_at) if args[i] is not None]

    def fn(*tensors):
        a = list(args)
        for i, t in zip(present, tensors):
            a[i] = t
        return kind.op(*a)
    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in present))


@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(kind, with_lengths):
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    # keep_activations both ways where the op has the flag (the RNN saves nothing extra)
    for keep in (True, False) if kind.keep_flag else (True,):
        args = kind.make_args(5, 3, 4, 6, 2, lengths=lengths, requires_grad=keep)
        torch.library.opcheck(kind.raw, (*args, keep) if kind.keep_flag else tuple(args))


def test_backward_op_opcheck(kind):
    args = kind.make_args(4, 2, 3, 5, 2, lengths=torch.tensor([4, 2]))
    raw_args = (*args, True) if kind.keep_flag else tuple(args)
    out = kind.raw(*raw_args)
    x, w_ih, w_hh = args[:3]
    states = args[3 + len(kind.biases):kind.lengths_at]
    lengths = args[kind.lengths_at]
    n_state_outs = len(kind.states)
    grads = [torch.randn_like(out[0])] + [torch.randn_like(o) for o in out[1:1 + n_state_outs]]
    # what the backward reads besides the inputs: output, and the saved activations
    saved = (out[0], *out[1 + n_state_outs:])
    backward = getattr(torch.ops.seqfuse, kind.raw.name().split("::")[1] + "_backward").default
    torch.library.opcheck(backward, (*grads, x, w_ih, w_hh, *states, lengths, *saved, *kind.extra))


class _Layer(torch.nn.Module):
    """The weights of `args` as parameters; forward(x, states, lengths)."""

    def __init__(self, kind, args):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.ParameterList(t for t in args[1:3 + len(kind.biases)])

    def forward(self, x, states, lengths):
        return self.kind.op(x, *self.w, *states, lengths, *self.kind.extra)


def test_torch_export_dynamic_shapes(kind):
    args = kind.make_args(6, 3, 4, 5, 2, lengths=torch.tensor([6, 1, 3]))
    layer = _Layer(kind, args)
    T = torch.export.Dim("T", min=1, max=512)
    B = torch.export.Dim("B", min=1, max=512)
    def inputs(a):
        return a[0], tuple(a[3 + len(kind.biases):kind.lengths_at]), a[kind.lengths_at]
    dyn = ({0: T, 1: B}, tuple({1: B} for _ in kind.states), {0: B})
    ep = torch.export.export(layer, inputs(args), dynamic_shapes=dyn)
    assert any(kind.raw.name().replace("::", ".") in str(n.target) for n in ep.graph.nodes)
    new = kind.make_args(9, 4, 4, 5, 2, lengths=torch.tensor([9, 2, 5, 1]))
    for a, b in zip(ep.module()(*inputs(new)), layer(*inputs(new)), strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_forward_backward(kind):
    args = kind.make_args(5, 3, 4, 6, 2, lengths=torch.tensor([5, 3, 1]), requires_grad=True)
    fn = torch.compile(lambda *a: kind.op(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    leaves = kind.tensors(args)
    g_c = torch.autograd.grad(fn(*args), leaves)
    g_e = torch.autograd.grad(kind.ref(*args)[0].sum(), leaves)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _set(i, value):
    return lambda kind, a: a.__setitem__(i if i >= 0 else kind.lengths_at, value(kind))


# (mutation of make_args(5, 3, 4, 6, 2), message): every op checks the same way.
BAD = [
    (_set(0, lambda k: torch.randn(5, 3)), "input must be 3-D"),
    (_set(1, lambda k: torch.randn(2, k.gates * 6 + 1, 4)), "weight_ih must be"),
    (_set(2, lambda k: torch.randn(2, k.gates * 6, 7)), "weight_hh must be"),
    (_set(3, lambda k: torch.randn(2, k.gates * 6 - 1)), " must be [2, "),
    (_set(3, lambda k: torch.randn(2, k.gates * 6, dtype=torch.float64)), "must have the input's dtype"),
    (lambda k, a: a.__setitem__(k.lengths_at - 1, torch.randn(2, 4, 6)), " must be [2, 3, 6]"),
    (_set(-1, lambda k: torch.tensor([5, 0, 2])), "every length must be >= 1"),
    (_set(-1, lambda k: torch.tensor([5, 9, 2])), "every length must be <= T=5"),
    (_set(-1, lambda k: torch.tensor([5, 2])), "lengths must be [B=3]"),
    (_set(-1, lambda k: torch.tensor([5, 2, 1], dtype=torch.int32)), "lengths must be int64"),
    (_set(0, lambda k: torch.randn(5, 3, 4, dtype=torch.float16)), "dtype"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_arguments_raise(kind, mutate, message):
    args = kind.make_args(5, 3, 4, 6, 2)
    mutate(kind, args)
    with pytest.raises(RuntimeError) as exc:
        kind.op(*args)
    assert message in str(exc.value)
    assert kind.raw.name().split("::")[1] in str(exc.value)


def test_bad_arguments_name_the_argument():
    lstm, gru, rnn = KINDS[0], KINDS[1], KINDS[2]
    a = lstm.make_args(5, 3, 4, 6, 2)
    a[5] = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cx must have the input's dtype"):
        lstm.op(*a)
    a = gru.make_args(5, 3, 4, 6, 2)
    a[4] = torch.randn(2, 17)
    with pytest.raises(RuntimeError, match=r"bias_hh must be \[2, 18\]"):
        gru.op(*a)
    a = rnn.make_args(5, 3, 4, 6, 2)
    a[-1] = "sigmoid"
    with pytest.raises(RuntimeError, match="nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        rnn.op(*a)
