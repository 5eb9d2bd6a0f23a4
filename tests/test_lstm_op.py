"""The fused LSTM layer op against eager PyTorch: outputs, gradients, registration."""
import pytest
import torch
from conftest import TOL, requires_native

from seqfuse import ops, reference

pytestmark = requires_native


def make_args(T, B, I, H, D, dtype=torch.float32, bias=True, lengths=None, requires_grad=False):
    g = dict(dtype=dtype, requires_grad=requires_grad)
    x = torch.randn(T, B, I, **g)
    w_ih = (torch.randn(D, 4 * H, I, dtype=dtype) * 0.3).requires_grad_(requires_grad)
    w_hh = (torch.randn(D, 4 * H, H, dtype=dtype) * 0.3).requires_grad_(requires_grad)
    b = (torch.randn(D, 4 * H, dtype=dtype) * 0.3).requires_grad_(requires_grad) if bias else None
    hx = torch.randn(D, B, H, **g)
    cx = torch.randn(D, B, H, **g)
    return [x, w_ih, w_hh, b, hx, cx, lengths]


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
def test_forward_backward_matches_eager(T, B, I, H, D, with_lengths, bias):
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = 1  # always a length-1 row
    args = make_args(T, B, I, H, D, bias=bias, lengths=lengths, requires_grad=True)
    out = ops.lstm_layer(*args)
    ref = reference.lstm_layer(*args)
    tol = TOL[torch.float32]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    with torch.no_grad():  # inference: the input projection is fused into the step tiles
        for a, b in zip(ops.lstm_layer(*args), ref):
            torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    # A loss that weighs every output element differently, so no gradient can cancel.
    weights = [torch.randn_like(t) for t in out]
    leaves = [t for t in args[:6] if t is not None]
    g_out = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), leaves)
    g_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), leaves)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


def test_padding_semantics():
    T, B, H = 6, 3, 5
    lengths = torch.tensor([6, 2, 4])
    args = make_args(T, B, 4, H, 2, lengths=lengths)
    out, h_n, c_n = ops.lstm_layer(*args)
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out[n:, b]) == 0, "outputs past the length must be zero"
        assert torch.equal(h_n[0, b], out[n - 1, b, :H])  # forward: state at the last valid step
        assert torch.equal(h_n[1, b], out[0, b, H:])      # reverse: ends at t = 0


def test_float64_gradcheck():
    args = make_args(4, 3, 3, 2, 2, dtype=torch.float64, lengths=torch.tensor([4, 1, 3]),
                     requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.lstm_layer(*a, args[6]), tuple(args[:6]))


def test_gradcheck_unidirectional_no_bias():
    args = make_args(3, 2, 2, 3, 1, dtype=torch.float64, bias=False, requires_grad=True)
    inputs = (args[0], args[1], args[2], args[4], args[5])
    assert torch.autograd.gradcheck(lambda x, wi, wh, h, c: ops.lstm_layer(x, wi, wh, None, h, c), inputs)


@pytest.mark.parametrize("keep_activations", [True, False])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(with_lengths, keep_activations):
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    args = make_args(5, 3, 4, 6, 2, lengths=lengths, requires_grad=keep_activations)
    torch.library.opcheck(torch.ops.seqfuse.lstm_layer.default, (*args, keep_activations))


def test_backward_op_opcheck():
    args = make_args(4, 2, 3, 5, 2, lengths=torch.tensor([4, 2]))
    out = torch.ops.seqfuse.lstm_layer.default(*args)
    grads = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])]
    x, w_ih, w_hh, _, hx, cx, lengths = args
    torch.library.opcheck(torch.ops.seqfuse.lstm_layer_backward.default,
                          (*grads, x, w_ih, w_hh, hx, cx, lengths, out[0], out[3], out[4]))


class _Layer(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w_ih = torch.nn.Parameter(args[1])
        self.w_hh = torch.nn.Parameter(args[2])
        self.b = torch.nn.Parameter(args[3])

    def forward(self, x, hx, cx, lengths):
        return ops.lstm_layer(x, self.w_ih, self.w_hh, self.b, hx, cx, lengths)


def test_torch_export_dynamic_shapes():
    args = make_args(6, 3, 4, 5, 2, lengths=torch.tensor([6, 1, 3]))
    layer = _Layer(args)
    T = torch.export.Dim("T", min=1, max=512)
    B = torch.export.Dim("B", min=1, max=512)
    ep = torch.export.export(layer, (args[0], args[4], args[5], args[6]),
                             dynamic_shapes=({0: T, 1: B}, {1: B}, {1: B}, {0: B}))
    assert any("seqfuse.lstm_layer" in str(n.target) for n in ep.graph.nodes)
    new = make_args(9, 4, 4, 5, 2, lengths=torch.tensor([9, 2, 5, 1]))
    for a, b in zip(ep.module()(new[0], new[4], new[5], new[6]), layer(new[0], new[4], new[5], new[6])):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_forward_backward():
    args = make_args(5, 3, 4, 6, 2, lengths=torch.tensor([5, 3, 1]), requires_grad=True)
    fn = torch.compile(lambda *a: ops.lstm_layer(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    leaves = [t for t in args[:6]]
    g_c = torch.autograd.grad(fn(*args), leaves)
    g_e = torch.autograd.grad(reference.lstm_layer(*args)[0].sum(), leaves)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(0, torch.randn(5, 3)), "input must be 3-D"),
    (lambda a: a.__setitem__(1, torch.randn(2, 24, 7)), "weight_ih must be"),
    (lambda a: a.__setitem__(4, torch.randn(2, 4, 6)), "hx must be"),
    (lambda a: a.__setitem__(5, torch.randn(2, 3, 6, dtype=torch.float64)), "cx must have the input's dtype"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 0, 2])), "every length must be >= 1"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 9, 2])), "every length must be <= T=5"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 2])), "lengths must be [B=3]"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 2, 1], dtype=torch.int32)), "lengths must be int64"),
    (lambda a: a.__setitem__(0, torch.randn(5, 3, 4, dtype=torch.float16)), "dtype"),
])
def test_bad_arguments_raise(mutate, message):
    args = make_args(5, 3, 4, 6, 2)
    mutate(args)
    with pytest.raises(RuntimeError) as exc:
        ops.lstm_layer(*args)
    assert message in str(exc.value)
