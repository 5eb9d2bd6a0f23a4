"""The fused GRU layer op against eager PyTorch: outputs, gradients, registration."""
import pytest
import torch
from conftest import TOL, requires_native

from seqfuse import ops, reference

pytestmark = requires_native


def make_args(T, B, I, H, D, dtype=torch.float32, bias=True, lengths=None, requires_grad=False):
    def p(*shape):
        return (torch.randn(*shape, dtype=dtype) * 0.3).requires_grad_(requires_grad)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=requires_grad)
    b_ih, b_hh = (p(D, 3 * H), p(D, 3 * H)) if bias else (None, None)
    hx = torch.randn(D, B, H, dtype=dtype, requires_grad=requires_grad)
    return [x, p(D, 3 * H, I), p(D, 3 * H, H), b_ih, b_hh, hx, lengths]


SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (7, 3, 37, 53),   # odd sizes, not multiples of the vector width
    (5, 1, 16, 128),  # batch 1 with two threads splitting H
    (9, 6, 20, 33),   # a full 6-row tile and more
    (6, 30, 20, 40),  # threads split rows
    (4, 13, 9, 70),   # threads split units, ragged last tile in the backward
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
    out = ops.gru_layer(*args)
    ref = reference.gru_layer(*args)
    tol = TOL[torch.float32]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    with torch.no_grad():  # inference: no activations saved
        for a, b in zip(ops.gru_layer(*args), ref):
            torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
    weights = [torch.randn_like(t) for t in out]
    leaves = [t for t in args[:6] if t is not None]
    g_out = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), leaves)
    g_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), leaves)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


def test_padding_semantics():
    lengths = torch.tensor([6, 2, 4])
    args = make_args(6, 3, 4, 5, 2, lengths=lengths)
    out, h_n = ops.gru_layer(*args)
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out[n:, b]) == 0, "outputs past the length must be zero"
        assert torch.equal(h_n[0, b], out[n - 1, b, :5])
        assert torch.equal(h_n[1, b], out[0, b, 5:])


def test_float64_gradcheck():
    args = make_args(4, 3, 3, 2, 2, dtype=torch.float64, lengths=torch.tensor([4, 1, 3]),
                     requires_grad=True)
    inputs = tuple(args[:6])
    assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a, args[6]), inputs)


@pytest.mark.parametrize("keep_activations", [True, False])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(with_lengths, keep_activations):
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    args = make_args(5, 3, 4, 6, 2, lengths=lengths, requires_grad=keep_activations)
    torch.library.opcheck(torch.ops.seqfuse.gru_layer.default, (*args, keep_activations))


def test_backward_op_opcheck():
    args = make_args(4, 2, 3, 5, 2, lengths=torch.tensor([4, 2]))
    out = torch.ops.seqfuse.gru_layer.default(*args)
    x, w_ih, w_hh, _, _, hx, lengths = args
    torch.library.opcheck(torch.ops.seqfuse.gru_layer_backward.default,
                          (torch.randn_like(out[0]), torch.randn_like(out[1]), x, w_ih, w_hh, hx,
                           lengths, out[0], out[2]))


def test_torch_export_dynamic_shapes():
    args = make_args(6, 3, 4, 5, 2, lengths=torch.tensor([6, 1, 3]))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList(args[1:5])

        def forward(self, x, hx, lengths):
            return ops.gru_layer(x, *self.w, hx, lengths)

    layer = Layer()
    T = torch.export.Dim("T", min=1, max=512)
    B = torch.export.Dim("B", min=1, max=512)
    ep = torch.export.export(layer, (args[0], args[5], args[6]),
                             dynamic_shapes=({0: T, 1: B}, {1: B}, {0: B}))
    assert any("seqfuse.gru_layer" in str(n.target) for n in ep.graph.nodes)
    new = make_args(9, 4, 4, 5, 2, lengths=torch.tensor([9, 2, 5, 1]))
    for a, b in zip(ep.module()(new[0], new[5], new[6]), layer(new[0], new[5], new[6])):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_forward_backward():
    args = make_args(5, 3, 4, 6, 2, lengths=torch.tensor([5, 3, 1]), requires_grad=True)
    fn = torch.compile(lambda *a: ops.gru_layer(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    leaves = args[:6]
    g_c = torch.autograd.grad(fn(*args), leaves)
    g_e = torch.autograd.grad(reference.gru_layer(*args)[0].sum(), leaves)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(0, torch.randn(5, 3)), "input must be 3-D"),
    (lambda a: a.__setitem__(1, torch.randn(2, 24, 7)), "weight_ih must be"),
    (lambda a: a.__setitem__(2, torch.randn(2, 24, 6)), "weight_hh must be"),
    (lambda a: a.__setitem__(3, torch.randn(2, 17)), "bias_ih must be [2, 18]"),
    (lambda a: a.__setitem__(4, torch.randn(2, 18, dtype=torch.float64)), "bias_hh must have the input's dtype"),
    (lambda a: a.__setitem__(5, torch.randn(2, 4, 6)), "hx must be"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 0, 2])), "every length must be >= 1"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 9, 2])), "every length must be <= T=5"),
    (lambda a: a.__setitem__(6, torch.tensor([5, 2])), "lengths must be [B=3]"),
])
def test_bad_arguments_raise(mutate, message):
    args = make_args(5, 3, 4, 6, 2)
    mutate(args)
    with pytest.raises(RuntimeError) as exc:
        ops.gru_layer(*args)
    assert message in str(exc.value)
    assert "gru_layer" in str(exc.value)
