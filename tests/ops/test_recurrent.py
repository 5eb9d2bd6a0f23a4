"""The recurrent layer ops (LSTM, GRU, Elman RNN with tanh and relu) on every backend
against eager PyTorch (seqfuse.reference): outputs, final states and every gradient over
shapes, directions, lengths (length 1 included) and biases; padding; the inference path;
float16/bfloat16 error within twice eager's; gradcheck; opcheck of the forward and
backward ops; torch.export; torch.compile; argument checks. Then what only one backend
has: the Triton ops' registration beside the compiled ones, and, without a GPU, that every
Triton kernel compiles for sm_90 (the interpreter accepts code the compiler rejects).

Each op is described once by a Kind (tests/cases.py), bound to a backend by Kind.on, so
every test body runs on every op and backend. The compiled kernels take the full shape
grid; Triton (under the interpreter without a GPU) the small cases."""
import os
import subprocess
import sys

import pytest
import torch
from cases import KIND_IDS, KINDS, LAYER_SHAPES, LAYER_SMALL_CASES, TOL
from conftest import BACKEND_DEVICE, backend_params

CUDA = torch.cuda.is_available()
BOTH = backend_params("native", "triton")
ALL = backend_params("native", "triton", "reference")


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request, backend):
    return request.param.on(backend)


def outputs_and_grads(kind, args, fn, seed=1):
    """fn(*args) and the gradients of a fixed random weighting of all its outputs with
    respect to every differentiable argument."""
    out = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in out)
    return list(out), list(torch.autograd.grad(loss, kind.tensors(args)))


# (T, B, I, H, D, bias, lengths); "random": lengths in [1, T] with a length-1 row.
MATCH_CASES = {
    "native": [(T, B, I, H, D, bias, lengths) for T, B, I, H in LAYER_SHAPES for D in (1, 2)
               for lengths in (None, "random") for bias in (True, False)],
    "triton": list(LAYER_SMALL_CASES.values()),
}


def _match_id(case):
    for name, small in LAYER_SMALL_CASES.items():
        if case == small:
            return name
    T, B, I, H, D, bias, lengths = case
    return f"{T}x{B}x{I}x{H}-D{D}-{'lengths' if lengths else 'full'}-{'bias' if bias else 'no-bias'}"


@pytest.mark.parametrize("backend,case", backend_params(
    "native", "triton", cases={b: [(c,) for c in cs] for b, cs in MATCH_CASES.items()},
    case_id=lambda c: _match_id(c[0])))
def test_matches_eager(kind, case, device):
    T, B, I, H, D, bias, lengths = case
    if lengths == "random":
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = 1  # always a length-1 row
    args = kind.make_args(T, B, I, H, D, device=device, bias=bias, lengths=lengths,
                          requires_grad=True)
    out, grads = outputs_and_grads(kind, args, kind.op)
    ref_out, ref_grads = outputs_and_grads(kind, args, kind.ref)
    tol = TOL[torch.float32]
    for i, (a, b) in enumerate(zip(out, ref_out, strict=True)):
        torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0,
                                   msg=lambda m, i=i: f"output {i}: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"],
                                   msg=lambda m, i=i: f"gradient {i}: {m}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths).tolist()
        output, h_n = out[0], out[1]
        for b, n in enumerate(lengths):
            assert torch.count_nonzero(output[n:, b]) == 0, "outputs past the length must be zero"
            assert torch.equal(h_n[0, b], output[n - 1, b, :H])  # forward ends at len-1
            if D == 2:
                assert torch.equal(h_n[1, b], output[0, b, H:])  # reverse ends at t = 0
    # Inference: no activations saved (the compiled kernels fuse the projection where it
    # pays). Under the interpreter only one case, for time.
    if kind.backend != "triton" or _match_id(case) == "ragged-bidir":
        with torch.no_grad():
            inference = kind.op(*args)
        for a, b in zip(inference, ref_out, strict=True):
            torch.testing.assert_close(a, b, atol=tol["out_atol"], rtol=0)
        if kind.backend == "triton":  # the same kernels: the same numbers
            for a, b in zip(inference, out, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BOTH)
def test_padding_semantics(kind, device):
    T, B, H = 6, 3, 5
    lengths = torch.tensor([6, 2, 4])
    args = kind.make_args(T, B, 4, H, 2, device=device, lengths=lengths)
    out, h_n = kind.op(*args)[:2]
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out[n:, b]) == 0, "outputs past the length must be zero"
        assert torch.equal(h_n[0, b], out[n - 1, b, :H])  # forward: state at the last valid step
        assert torch.equal(h_n[1, b], out[0, b, H:])      # reverse: ends at t = 0


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("bias_ih,bias_hh", [(False, True), (True, False)])
def test_gru_one_bias(backend, bias_ih, bias_hh, device):
    gru = KINDS[1].on(backend)
    args = gru.make_args(3, 2, 5, 16, 2, device=device, lengths=[3, 2], requires_grad=True)
    if not bias_ih:
        args[3] = None
    if not bias_hh:
        args[4] = None
    out, grads = outputs_and_grads(gru, args, gru.op)
    ref_out, ref_grads = outputs_and_grads(gru, args, gru.ref)
    tol = TOL[torch.float32]
    for a, b in zip(out + grads, ref_out + ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"])


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


_BF16_INTERPRETED = pytest.mark.skipif(
    not CUDA, reason="bfloat16 needs CUDA: Triton's interpreter multiplies bfloat16 operands "
                     "wrongly in tl.dot (results off by ~1e10)")
# The compiled CPU kernels take bfloat16 (float16 only on CUDA, tests/cuda).
HALF_CASES = backend_params("native", "triton", cases={
    "native": [torch.bfloat16],
    "triton": [torch.float16, pytest.param(torch.bfloat16, marks=_BF16_INTERPRETED)]})


@pytest.mark.parametrize("backend,dtype", HALF_CASES)
def test_half_error_within_twice_eager(kind, dtype, device):
    """float16/bfloat16 inputs (float32 accumulation and state): the error against a
    float32 reference stays within twice eager PyTorch's own error in that dtype, for
    outputs and every gradient."""
    args32 = kind.make_args(6, 3, 13, 20, 2, device=device, lengths=[6, 1, 4])

    def cast(dt):
        return [a.detach().to(dt).requires_grad_()
                if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args32]
    ref_out, ref_grads = outputs_and_grads(kind, cast(torch.float32), kind.ref)
    low = cast(dtype)
    out, grads = outputs_and_grads(kind, low, kind.op)
    eager_out, eager_grads = outputs_and_grads(kind, cast(dtype), kind.ref)
    for t, leaf in zip(out + grads, [None] * len(out) + kind.tensors(low)):
        assert t.dtype == dtype and (leaf is None or t.shape == leaf.shape)
    for name, ours, eager, ref in (("outputs", out, eager_out, ref_out),
                                   ("gradients", grads, eager_grads, ref_grads)):
        for i, (a, e, r) in enumerate(zip(ours, eager, ref, strict=True)):
            err, eager_err = _max_err(a, r), _max_err(e, r)
            eps = torch.finfo(dtype).eps
            floor = r.abs().max().item() * eps / 2  # both may round exactly
            assert err <= 2 * max(eager_err, floor), \
                f"{name}[{i}]: {err:.2e} vs eager {eager_err:.2e}"


@pytest.mark.parametrize("backend", backend_params("native"))  # Triton has no float64
@pytest.mark.parametrize("D,bias,lengths", [(2, True, [4, 1, 3]), (1, False, None)])
def test_float64_gradcheck(kind, D, bias, lengths, device):
    args = kind.make_args(4, 3, 3, 2, D, dtype=torch.float64, device=device, bias=bias,
                          lengths=lengths, requires_grad=True)
    present = [i for i in range(kind.lengths_at) if args[i] is not None]

    def fn(*tensors):
        a = list(args)
        for i, t in zip(present, tensors):
            a[i] = t
        return kind.op(*a)
    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in present))


# Under the interpreter one lengths case only: each opcheck runs the kernels many times.
@pytest.mark.parametrize("backend,with_lengths", backend_params(
    "native", "triton", cases={"native": [False, True], "triton": [True]}))
def test_opcheck(kind, with_lengths, device):
    # Under the interpreter the Triton ops stay opaque to AOT autograd (their kernels cannot
    # be traced there), so test_aot_dispatch_dynamic checks the op and its fake, not a
    # decomposition; on CUDA it checks triton_op's decomposition into the kernels.
    lengths = [4, 1, 3] if with_lengths else None
    # keep_activations both ways where the op has the flag (the RNN saves nothing extra)
    for keep in (True, False) if kind.keep_flag else (True,):
        args = kind.make_args(4, 3, 5, 6, 2, device=device, lengths=lengths, requires_grad=keep)
        torch.library.opcheck(kind.raw, kind.raw_args(args, keep))


@pytest.mark.parametrize("backend", BOTH)
def test_backward_op_opcheck(kind, device):
    args = kind.make_args(4, 2, 3, 5, 2, device=device, lengths=[4, 2])
    out = kind.raw(*kind.raw_args(args, True))
    x, w_ih, w_hh = args[:3]
    states = args[3 + len(kind.biases):kind.lengths_at]
    lengths = args[kind.lengths_at]
    n_states = len(kind.states)
    grads = [torch.randn_like(o) for o in out[:1 + n_states]]
    # what the backward reads besides the inputs: the output, and the saved activations
    saved = (out[0], *out[1 + n_states:])
    torch.library.opcheck(kind.backward, (*grads, x, w_ih, w_hh, *states, lengths, *saved, *kind.extra))


@pytest.mark.parametrize("backend", BOTH)
def test_backward_needs_the_saved_activations(backend, device):
    lstm = KINDS[0].on(backend)
    args = lstm.make_args(3, 2, 4, 16, 1, device=device, requires_grad=True)
    out = lstm.raw(*args, False)  # keep_activations=False, yet differentiated
    with pytest.raises(RuntimeError, match="keep_activations=True"):
        out[0].sum().backward()


class _Layer(torch.nn.Module):
    """The weights of `args` as parameters; forward(x, states, lengths)."""

    def __init__(self, kind, args):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.ParameterList(t for t in args[1:3 + len(kind.biases)])

    def forward(self, x, states, lengths):
        return self.kind.op(x, *self.w, *states, lengths, *self.kind.extra)


@pytest.mark.parametrize("backend", BOTH)
def test_torch_export_dynamic_shapes(kind, device):
    args = kind.make_args(6, 3, 4, 5, 2, device=device, lengths=[6, 1, 3])
    layer = _Layer(kind, args)
    T = torch.export.Dim("T", min=1, max=512)
    B = torch.export.Dim("B", min=1, max=512)

    def inputs(a):
        return a[0], tuple(a[3 + len(kind.biases):kind.lengths_at]), a[kind.lengths_at]
    dyn = ({0: T, 1: B}, tuple({1: B} for _ in kind.states), {0: B})
    ep = torch.export.export(layer, inputs(args), dynamic_shapes=dyn)
    assert any(n.target == kind.raw for n in ep.graph.nodes)
    for a, b in zip(ep.module()(*inputs(args)), layer(*inputs(args)), strict=True):
        assert torch.equal(a, b)
    new = kind.make_args(9, 4, 4, 5, 2, device=device, lengths=[9, 2, 5, 1])
    for a, b in zip(ep.module()(*inputs(new)), layer(*inputs(new)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BOTH)
def test_torch_compile_fullgraph_forward_backward(kind, device):
    args = kind.make_args(4, 3, 5, 6, 2, device=device, lengths=[4, 3, 1], requires_grad=True)
    fn = torch.compile(lambda *a: kind.op(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    leaves = kind.tensors(args)
    g_c = torch.autograd.grad(fn(*args), leaves)
    g_e = torch.autograd.grad(kind.ref(*args)[0].sum(), leaves)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _set(i, value):
    return lambda kind, a: a.__setitem__(i if i >= 0 else kind.lengths_at, value(kind))


# (mutation of make_args(5, 3, 4, 6, 2), message): every op on every backend checks the
# same way, with the C++ ops' messages.
BAD = [
    (_set(0, lambda k: torch.randn(5, 3)), "input must be 3-D"),
    (_set(1, lambda k: torch.randn(2, k.gates * 6 + 1, 4)), "weight_ih must be"),
    (_set(2, lambda k: torch.randn(2, k.gates * 6, 7)), "weight_hh must be"),
    (_set(3, lambda k: torch.randn(2, k.gates * 6 - 1)), " must be [2, "),
    (_set(3, lambda k: torch.randn(2, k.gates * 6, dtype=torch.float64)), "must have the input's dtype"),
    (_set(3, lambda k: torch.randn(2, k.gates * 6, dtype=torch.float16)), "must have the input's dtype"),
    (lambda k, a: a.__setitem__(k.lengths_at - 1, torch.randn(2, 4, 6)), " must be [2, 3, 6]"),
    (_set(-1, lambda k: torch.tensor([5, 0, 2])), "every length must be >= 1"),
    (_set(-1, lambda k: torch.tensor([5, 9, 2])), "every length must be <= T=5"),
    (_set(-1, lambda k: torch.tensor([5, 2])), "lengths must be [B=3]"),
    (_set(-1, lambda k: torch.tensor([5, 2, 1], dtype=torch.int32)), "lengths must be int64"),
]
_BAD_IDS = ["input-2d", "weight_ih", "weight_hh", "bias-shape", "bias-float64", "bias-float16",
            "state-shape", "length-0", "length-past-T", "lengths-shape", "lengths-int32"]
# An input dtype the backend does not take: float16 on the compiled CPU kernels, float64
# in Triton (the reference takes every floating dtype).
UNSUPPORTED_DTYPE = {"native": torch.float16, "triton": torch.float64}


def _assert_raises_naming_the_op(kind, args, message):
    with pytest.raises(RuntimeError) as exc:
        kind.op(*args)
    assert message in str(exc.value)
    assert kind.op_name in str(exc.value)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mutate,message", BAD, ids=_BAD_IDS)
def test_bad_arguments_raise(kind, mutate, message):
    args = kind.make_args(5, 3, 4, 6, 2)
    mutate(kind, args)
    _assert_raises_naming_the_op(kind, args, message)


@pytest.mark.parametrize("backend", BOTH)
def test_unsupported_dtype_raises(kind, backend):
    args = kind.make_args(5, 3, 4, 6, 2)
    args[0] = torch.randn(5, 3, 4, dtype=UNSUPPORTED_DTYPE[backend])
    _assert_raises_naming_the_op(kind, args, "dtype")


@pytest.mark.parametrize("backend", ALL)
def test_bad_arguments_name_the_argument(backend):
    lstm, gru, rnn = (k.on(backend) for k in KINDS[:3])
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


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.skipif(not CUDA, reason="needs CUDA: lengths on the GPU")
def test_lengths_must_be_on_cpu(backend, device):
    lstm = KINDS[0].on(backend)
    args = lstm.make_args(5, 3, 4, 6, 2, device=device, lengths=[5, 2, 1])
    args[lstm.lengths_at] = args[lstm.lengths_at].cuda()
    with pytest.raises(RuntimeError, match="lengths must be a CPU tensor"):
        lstm.op(*args)


# ---------------------------------------------------------------------------------------
# Triton only
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_ops_share_the_namespace_with_the_compiled_ones(backend):
    # triton_op registers into a FRAGMENT of the seqfuse library that TORCH_LIBRARY in
    # csrc/ops.cpp defines: both sets of ops must be there.
    from seqfuse import ops

    for kind in KINDS[:3]:
        kind.on(backend).raw  # noqa: B018  (imports seqfuse.triton, which registers them)
        name = kind.op_name
        for suffix in ("_triton", "_backward_triton"):
            assert hasattr(torch.ops.seqfuse, name + suffix)
        if ops.has_native_kernel(name, "cpu"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{name}", "CPU")
    schema = str(torch.ops.seqfuse.rnn_layer_triton.default._schema)
    assert "Tensor? lengths" in schema and "str nonlinearity" in schema
    schema = str(torch.ops.seqfuse.lstm_layer_triton.default._schema)
    assert "Tensor? bias" in schema and "bool keep_activations=True" in schema


# Compiles every kernel for sm_90 in a process without the interpreter, with the block
# sizes _launch_config picks on a GPU for a small batch, and checks that CPU
# tensors without the interpreter fail with a message that says what to set.
_COMPILE_SCRIPT = r"""
import torch, triton
from triton.backends import backends
if "nvidia" not in backends:
    print("SKIP: this triton has no nvidia backend"); raise SystemExit(0)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqfuse.triton import recurrent as R
from seqfuse.triton.common import INTERPRETED

assert not INTERPRETED
F32 = {"xg_ptr", "h_in_ptr", "h_out_ptr", "c_ptr", "cells_ptr", "gates_ptr", "dg_ptr", "dgh_ptr",
       "dgi_ptr", "dc_ptr", "carry_ptr"}  # the float32 buffers; the rest has the input's dtype
KERNELS = {
    R._lstm_forward_step: dict(HAS_LENGTHS=True, KEEP=True),
    R._gru_forward_step: dict(HAS_LENGTHS=True, HAS_BIAS_HH=True, KEEP=True),
    R._rnn_forward_step: dict(HAS_LENGTHS=False, RELU=True),
    R._lstm_backward_step: dict(HAS_LENGTHS=True),
    R._gru_backward_step: dict(HAS_LENGTHS=True),
    R._rnn_backward_step: dict(HAS_LENGTHS=True, RELU=False),
    R._initial_state_grad: dict(HAS_LENGTHS=True, ADD_CARRY=True),
}
# every kernel with bfloat16 operands; float32 (TF32 allowed) for the LSTM step
VARIANTS = [(k, c, "bf16", False) for k, c in KERNELS.items()]
VARIANTS.append((R._lstm_forward_step, KERNELS[R._lstm_forward_step], "fp32", True))
n = 0
for kernel, consts, dt, tf32 in VARIANTS:
    blocks = dict(BLOCK_B=16, BLOCK_H=32, BLOCK_K=16 if dt == "fp32" else 32)
    consts = dict(consts, ALLOW_TF32=tf32, **blocks)
    sig = {a: "constexpr" if a in consts else "*i32" if a == "len_ptr" else
           ("*fp32" if a in F32 else "*" + dt) if a.endswith("_ptr") else "i32"
           for a in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    n += 1
x = torch.randn(2, 1, 3)
try:
    R.rnn_layer(x, torch.randn(1, 4, 3), torch.randn(1, 4, 4), None, torch.zeros(1, 1, 4))
except RuntimeError as e:
    assert "TRITON_INTERPRET=1" in str(e), str(e)
    print("compiled", n)
"""


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.skipif(CUDA, reason="on CUDA the other tests compile and run every kernel")
def test_triton_kernels_compile_for_sm90(backend):
    assert BACKEND_DEVICE[backend] == "cpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert "compiled 8" in r.stdout, r.stdout + r.stderr[-2000:]
