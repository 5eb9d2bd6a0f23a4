"""lstm_proj_layer, the LSTM layer with a projection (torch.nn.LSTM's proj_size), on its
compiled CPU kernel and on the reference backend, against eager PyTorch
(seqfuse.reference, torch's own LSTM with projections): outputs, final states and every
gradient over odd sizes, directions, biases and lengths with a length-1 row; padding;
gradcheck and second derivatives; opcheck of the forward and backward ops; torch.export
and torch.compile; bfloat16 within twice eager's error; argument checks with the same
messages on both backends."""
import pytest
import torch
from cases import TOL
from conftest import backend_params

from seqfuse import functional, ops, reference

NATIVE = backend_params("native", op="lstm_proj_layer")
BOTH = backend_params("native", "reference", op="lstm_proj_layer")


def make_args(T, B, I, H, P, D, dtype=torch.float32, bias=True, lengths=None, requires_grad=False):
    """[input, weight_ih, weight_hh, bias, weight_hr, hx, cx, lengths]; weights at about
    twice torch.nn's init scale, so the recurrence is stable and rounding is not amplified."""
    def p(*shape, fan=H):
        return (torch.randn(*shape) * fan ** -0.5).to(dtype).requires_grad_(requires_grad)

    def r(*shape):
        return torch.randn(*shape).to(dtype).requires_grad_(requires_grad)
    lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
    return [r(T, B, I), p(D, 4 * H, I), p(D, 4 * H, P, fan=P), p(D, 4 * H) if bias else None,
            p(D, P, H), r(D, B, P), r(D, B, H), lengths]


def run(backend, args):
    if backend == "native":
        return ops.lstm_proj_layer(*args)
    return functional.lstm_proj_layer(*args, backend=backend)


def differentiable(args):
    return [t for t in args[:7] if t is not None]


def outputs_and_grads(fn, args, seed=1):
    out = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in out)
    return list(out), list(torch.autograd.grad(loss, differentiable(args)))


# (T, B, I, H, P): odd sizes off the vector width, batch 1, a 6-row tile and more, P = 1.
SHAPES = [(1, 1, 1, 2, 1), (7, 3, 37, 53, 19), (5, 1, 16, 128, 64), (9, 6, 20, 33, 17),
          (6, 30, 20, 40, 7), (4, 13, 9, 70, 1)]
CASES = [(s, D, bias, lengths) for s in SHAPES for D in (1, 2) for bias in (True, False)
         for lengths in (None, "random")]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape,D,bias,lengths", CASES,
                         ids=[f"{'x'.join(map(str, s))}-D{D}-{'bias' if b else 'no-bias'}-{ln or 'full'}"
                              for s, D, b, ln in CASES])
def test_matches_eager(backend, shape, D, bias, lengths):
    T, B, I, H, P = shape
    if lengths == "random":
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = 1  # always a length-1 row
    args = make_args(T, B, I, H, P, D, bias=bias, lengths=lengths, requires_grad=True)
    out, grads = outputs_and_grads(lambda *a: run(backend, a), args)
    ref_out, ref_grads = outputs_and_grads(reference.lstm_proj_layer, args)
    tol = TOL[torch.float32]
    for i, (a, b) in enumerate(zip(out, ref_out, strict=True)):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0, msg=lambda m, i=i: f"output {i}: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"],
                                   msg=lambda m, i=i: f"gradient {i}: {m}")
    assert out[0].shape == (T, B, D * P) and out[1].shape == (D, B, P) and out[2].shape == (D, B, H)
    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):
            assert torch.count_nonzero(out[0][n:, b]) == 0, "outputs past the length must be zero"
            assert torch.equal(out[1][0, b], out[0][n - 1, b, :P])  # forward ends at len-1
            if D == 2:
                assert torch.equal(out[1][1, b], out[0][0, b, P:])  # reverse ends at t=0


@pytest.mark.parametrize("backend", NATIVE)
def test_padding_never_reaches_the_gradients(backend):
    """NaN in the padded steps: the forward never reads them, and a weight gradient must
    not become NaN through 0 * NaN."""
    args = make_args(6, 3, 5, 9, 4, 2, lengths=[6, 2, 4], requires_grad=True)
    with torch.no_grad():
        args[0][2:, 1] = float("nan")
        args[0][4:, 2] = float("nan")
    out, grads = outputs_and_grads(lambda *a: run(backend, a), args)
    assert all(torch.isfinite(g).all() for g in grads[1:])  # every weight and state gradient
    clean = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
             else a for a in args]
    with torch.no_grad():
        clean[0][2:, 1] = 0
        clean[0][4:, 2] = 0
    ref_out, ref_grads = outputs_and_grads(reference.lstm_proj_layer, clean)
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(grads[1:], ref_grads[1:], strict=True):  # the input's own gradient aside
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("D,bias,lengths", [(2, True, [4, 1, 3]), (1, False, None)])
def test_float64_gradcheck_and_gradgradcheck(backend, D, bias, lengths):
    args = make_args(4, 3, 3, 3, 2, D, dtype=torch.float64, bias=bias, lengths=lengths,
                     requires_grad=True)
    present = [i for i in range(7) if args[i] is not None]

    def fn(*tensors):
        a = list(args)
        for i, t in zip(present, tensors):
            a[i] = t
        return run(backend, a)
    inputs = tuple(args[i] for i in present)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(backend, with_lengths):
    lengths = [4, 1, 3] if with_lengths else None
    for keep in (True, False):
        args = make_args(4, 3, 5, 6, 3, 2, lengths=lengths, requires_grad=keep)
        torch.library.opcheck(torch.ops.seqfuse.lstm_proj_layer.default, (*args, keep))


@pytest.mark.parametrize("backend", NATIVE)
def test_backward_op_opcheck(backend):
    args = make_args(4, 2, 3, 5, 2, 2, lengths=[4, 2])
    out = torch.ops.seqfuse.lstm_proj_layer.default(*args, True)
    x, w_ih, w_hh, _, w_hr, hx, cx, lengths = args
    grads = [torch.randn_like(o) for o in out[:3]]
    torch.library.opcheck(torch.ops.seqfuse.lstm_proj_layer_backward.default,
                          (*grads, x, w_ih, w_hh, w_hr, hx, cx, lengths, out[0], out[3], out[4]))


@pytest.mark.parametrize("backend", NATIVE)
def test_backward_needs_the_saved_activations(backend):
    args = make_args(3, 2, 4, 6, 2, 1, requires_grad=True)
    out = torch.ops.seqfuse.lstm_proj_layer.default(*args, False)
    with pytest.raises(RuntimeError, match="keep_activations=True"):
        out[0].sum().backward()


class _Layer(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w = torch.nn.ParameterList(args[1:5])

    def forward(self, x, hx, cx, lengths):
        return ops.lstm_proj_layer(x, *self.w, hx, cx, lengths)


@pytest.mark.parametrize("backend", NATIVE)
def test_torch_export_dynamic_shapes(backend):
    args = make_args(6, 3, 4, 7, 3, 2, lengths=[6, 1, 3])
    layer = _Layer(args)
    T, B = torch.export.Dim("T", min=1, max=512), torch.export.Dim("B", min=1, max=512)
    inputs = (args[0], args[5], args[6], args[7])
    ep = torch.export.export(layer, inputs, dynamic_shapes=({0: T, 1: B}, {1: B}, {1: B}, {0: B}))
    assert any(n.target == torch.ops.seqfuse.lstm_proj_layer.default for n in ep.graph.nodes)
    new = make_args(9, 4, 4, 7, 3, 2, lengths=[9, 2, 5, 1])
    new_inputs = (new[0], new[5], new[6], new[7])
    for a, b in zip(ep.module()(*new_inputs), layer(*new_inputs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", NATIVE)
def test_torch_compile_fullgraph_forward_backward(backend):
    args = make_args(4, 3, 5, 6, 2, 2, lengths=[4, 3, 1], requires_grad=True)
    fn = torch.compile(lambda *a: ops.lstm_proj_layer(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(fn(*args), differentiable(args))
    g_e = torch.autograd.grad(reference.lstm_proj_layer(*args)[0].sum(), differentiable(args))
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", NATIVE)
def test_bfloat16_error_within_twice_eager(backend):
    """bfloat16 in, float32 accumulation: its error against a float64 reference stays within
    twice eager PyTorch's own bfloat16 error (floor: one bfloat16 rounding of the scale)."""
    args = make_args(7, 5, 12, 24, 9, 2, dtype=torch.float64, lengths=[7, 1, 4, 7, 2],
                     requires_grad=True)
    exact_out, exact_grads = outputs_and_grads(reference.lstm_proj_layer, args)
    half = [a.detach().to(torch.bfloat16).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in args]
    out, grads = outputs_and_grads(lambda *a: run(backend, a), half)
    eager_out, eager_grads = outputs_and_grads(reference.lstm_proj_layer, half)
    for got, eager, exact in zip(out + grads, eager_out + eager_grads, exact_out + exact_grads):
        assert got.dtype == torch.bfloat16
        floor = 2.0 ** -9 * exact.abs().max().item()
        assert _max_err(got, exact) <= max(2 * _max_err(eager, exact), floor)


# (mutation of make_args(5, 3, 4, 6, 2, 2), message): both backends check alike, with the
# C++ op's messages.
BAD = [
    (0, torch.randn(5, 3), "input must be 3-D"),
    (1, torch.randn(2, 25, 4), "weight_ih must be [2, 24, 4]"),
    (2, torch.randn(2, 24, 6), "weight_hh must be [2, 24, 2] for hidden size H=6 and proj_size P=2"),
    (3, torch.randn(2, 23), "bias must be [2, 24]"),
    (4, torch.randn(2, 6, 6), "weight_hr must be [D, P, H] with D in {1, 2} and 1 <= P < H"),
    (4, torch.randn(2, 2, 6, dtype=torch.float64), "weight_hr must have the input's dtype"),
    (5, torch.randn(2, 3, 6), "hx must be [2, 3, 2]"),
    (6, torch.randn(2, 3, 2), "cx must be [2, 3, 6]"),
    (7, torch.tensor([5, 0, 2]), "every length must be >= 1"),
    (7, torch.tensor([5, 9, 2]), "every length must be <= T=5"),
    (7, torch.tensor([5, 2, 1], dtype=torch.int32), "lengths must be int64"),
]


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("index,value,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_raise_naming_the_argument(backend, index, value, message):
    args = make_args(5, 3, 4, 6, 2, 2)
    args[index] = value
    with pytest.raises(RuntimeError) as exc:
        run(backend, args)
    assert message in str(exc.value) and "lstm_proj_layer" in str(exc.value)


def test_triton_backend_refuses_clearly():
    args = make_args(3, 2, 4, 6, 2, 1)
    with pytest.raises(RuntimeError, match="no lstm_proj_layer kernel"):
        functional.lstm_proj_layer(*args, backend="triton")
