"""The Triton LSTM, GRU and Elman RNN layers (seqfuse.triton.recurrent) against eager
PyTorch (seqfuse.reference): outputs, final states and every gradient; the inference path;
float16/bfloat16 error within twice eager's; opcheck; torch.compile and torch.export;
argument checks; the ops beside the C++ ones in the seqfuse namespace; and, without a GPU,
that every kernel compiles for sm_90 (the interpreter accepts code the compiler rejects).

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): shapes are small, and the block size there is 16, so H=20 spans two
unit blocks and two K-chunks and B=18 two row blocks."""
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

# "triton.language", not "triton": without the package, tests/triton itself would import
# as a namespace package named triton.
pytest.importorskip("triton.language", reason="triton is not installed")

import torch  # noqa: E402
from conftest import TOL  # noqa: E402

from seqfuse import ops, reference  # noqa: E402
from seqfuse.triton import recurrent  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture
def device():
    return "cuda" if CUDA else "cpu"


@dataclass(frozen=True)
class Kind:
    name: str
    gates: int                 # gate blocks in the weights
    op: Callable               # seqfuse.triton.recurrent.*
    ref: Callable              # seqfuse.reference.*
    raw: str                   # the op's name in torch.ops.seqfuse
    biases: tuple[str, ...]    # names of the bias arguments
    states: tuple[str, ...]    # names of the initial-state arguments
    extra: tuple = ()          # trailing non-tensor arguments (the RNN's nonlinearity)
    keep_flag: bool = True     # the raw op takes keep_activations

    def make_args(self, T, B, I, H, D, dtype=torch.float32, device="cpu", bias=True,
                  lengths=None, requires_grad=False):
        """[input, weight_ih, weight_hh, *biases, *states, lengths, *extra]."""
        # Weights at about twice torch.nn's init scale: a stable recurrence, so rounding
        # differences are not amplified step after step.
        def p(*shape):
            return (torch.randn(*shape) * H ** -0.5).to(device, dtype).requires_grad_(requires_grad)

        def r(*shape):
            return torch.randn(*shape).to(device, dtype).requires_grad_(requires_grad)
        G = self.gates * H
        bs = [p(D, G) if bias else None for _ in self.biases]
        lengths = None if lengths is None else torch.tensor(lengths)
        return [r(T, B, I), p(D, G, I), p(D, G, H), *bs, *[r(D, B, H) for _ in self.states],
                lengths, *self.extra]

    @property
    def lengths_at(self) -> int:
        return 3 + len(self.biases) + len(self.states)

    def leaves(self, args):
        """The differentiable arguments (no lengths, no absent biases)."""
        return [t for t in args[:self.lengths_at] if t is not None]

    @property
    def forward_op(self):
        return getattr(torch.ops.seqfuse, self.raw).default

    @property
    def backward_op(self):
        return getattr(torch.ops.seqfuse, self.raw.replace("_triton", "_backward_triton")).default


KINDS = [
    Kind("lstm", 4, recurrent.lstm_layer, reference.lstm_layer, "lstm_layer_triton",
         ("bias",), ("hx", "cx")),
    Kind("gru", 3, recurrent.gru_layer, reference.gru_layer, "gru_layer_triton",
         ("bias_ih", "bias_hh"), ("hx",)),
    Kind("rnn-tanh", 1, recurrent.rnn_layer, reference.rnn_layer, "rnn_layer_triton",
         ("bias",), ("hx",), ("tanh",), keep_flag=False),
    Kind("rnn-relu", 1, recurrent.rnn_layer, reference.rnn_layer, "rnn_layer_triton",
         ("bias",), ("hx",), ("relu",), keep_flag=False),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request):
    return request.param


def outputs_and_grads(kind, args, fn, seed=1):
    """fn(*args) and the gradients of a fixed random weighting of all its outputs with
    respect to every differentiable argument."""
    out = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in out)
    return list(out), list(torch.autograd.grad(loss, kind.leaves(args)))


CASES = {  # T, B, I, H, D, bias, lengths
    # ragged: a length-1 row and a full-length one; H over two unit blocks and K-chunks
    "ragged-bidir": (5, 3, 13, 20, 2, True, [5, 1, 3]),
    "one-direction-no-bias": (5, 3, 13, 24, 1, False, None),
    "T1": (1, 2, 7, 20, 2, True, None),
    "two-row-blocks": (3, 18, 5, 8, 2, True, [3, 1, 2] * 6),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_eager(kind, case, device):
    T, B, I, H, D, bias, lengths = CASES[case]
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
        output, h_n = out[0], out[1]
        for b, n in enumerate(lengths):
            assert torch.count_nonzero(output[n:, b]) == 0, "outputs past the length must be zero"
            assert torch.equal(h_n[0, b], output[n - 1, b, :H])  # forward ends at len-1
            if D == 2:
                assert torch.equal(h_n[1, b], output[0, b, H:])  # reverse ends at t = 0
    if case == "ragged-bidir":
        with torch.no_grad():  # inference: nothing saved, the same numbers
            for a, b in zip(kind.op(*args), out, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("bias_ih,bias_hh", [(False, True), (True, False)])
def test_gru_one_bias(bias_ih, bias_hh, device):
    gru = KINDS[1]
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


HALF = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not CUDA, reason="bfloat16 needs CUDA: Triton's interpreter multiplies bfloat16 "
                         "operands wrongly in tl.dot (results off by ~1e10)")),
]


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
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
    for t, leaf in zip(out + grads, [None] * len(out) + kind.leaves(low)):
        assert t.dtype == dtype and (leaf is None or t.shape == leaf.shape)
    for name, ours, eager, ref in (("outputs", out, eager_out, ref_out),
                                   ("gradients", grads, eager_grads, ref_grads)):
        for i, (a, e, r) in enumerate(zip(ours, eager, ref, strict=True)):
            err, eager_err = _max_err(a, r), _max_err(e, r)
            eps = torch.finfo(dtype).eps
            floor = r.abs().max().item() * eps / 2  # both may round exactly
            assert err <= 2 * max(eager_err, floor), \
                f"{name}[{i}]: {err:.2e} vs eager {eager_err:.2e}"


def test_opcheck(kind, device):
    # Under the interpreter the ops stay opaque to AOT autograd (their kernels cannot be
    # traced there), so test_aot_dispatch_dynamic checks the op and its fake, not a
    # decomposition; on CUDA it checks triton_op's decomposition into the kernels.
    for keep in (True, False) if kind.keep_flag else (None,):
        args = kind.make_args(4, 3, 5, 6, 2, device=device, lengths=[4, 1, 3],
                              requires_grad=keep is not False)
        torch.library.opcheck(kind.forward_op, tuple(args) if keep is None else (*args, keep))


def test_backward_op_opcheck(kind, device):
    args = kind.make_args(4, 2, 3, 5, 2, device=device, lengths=[4, 2])
    out = kind.forward_op(*args) if not kind.keep_flag else kind.forward_op(*args, True)
    n_states = len(kind.states)
    grads = [torch.randn_like(o) for o in out[:1 + n_states]]
    x, w_ih, w_hh = args[:3]
    states = args[3 + len(kind.biases):kind.lengths_at]
    saved = (out[0], *out[1 + n_states:])  # the output, and the saved activations
    lengths = args[kind.lengths_at]
    torch.library.opcheck(kind.backward_op,
                          (*grads, x, w_ih, w_hh, *states, lengths, *saved, *kind.extra))


def test_torch_compile_fullgraph_forward_backward(kind, device):
    args = kind.make_args(4, 3, 5, 6, 2, device=device, lengths=[4, 3, 1], requires_grad=True)
    fn = torch.compile(lambda *a: kind.op(*a)[0].sum(), fullgraph=True, backend="aot_eager")
    leaves = kind.leaves(args)
    g_c = torch.autograd.grad(fn(*args), leaves)
    g_e = torch.autograd.grad(kind.ref(*args)[0].sum(), leaves)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Layer(torch.nn.Module):
    def __init__(self, kind, args):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.ParameterList(t for t in args[1:3 + len(kind.biases)])

    def forward(self, x, states, lengths):
        return self.kind.op(x, *self.w, *states, lengths, *self.kind.extra)


def test_torch_export(kind, device):
    args = kind.make_args(4, 3, 5, 6, 2, device=device, lengths=[4, 1, 3])
    layer = _Layer(kind, args)
    inputs = (args[0], tuple(args[3 + len(kind.biases):kind.lengths_at]), args[kind.lengths_at])
    ep = torch.export.export(layer, inputs)
    assert any(n.target == kind.forward_op for n in ep.graph.nodes)
    for a, b in zip(ep.module()(*inputs), layer(*inputs), strict=True):
        assert torch.equal(a, b)


def test_ops_share_the_namespace_with_the_compiled_ones():
    # triton_op registers into a FRAGMENT of the seqfuse library that TORCH_LIBRARY in
    # csrc/ops.cpp defines: both sets of ops must be there.
    for name in ("lstm_layer", "gru_layer", "rnn_layer"):
        for suffix in ("_triton", "_backward_triton"):
            assert hasattr(torch.ops.seqfuse, name + suffix)
        if ops.has_native_kernel(name, "cpu"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"seqfuse::{name}", "CPU")
    schema = str(torch.ops.seqfuse.rnn_layer_triton.default._schema)
    assert "Tensor? lengths" in schema and "str nonlinearity" in schema
    schema = str(torch.ops.seqfuse.lstm_layer_triton.default._schema)
    assert "Tensor? bias" in schema and "bool keep_activations=True" in schema


def test_backward_needs_the_saved_activations():
    lstm = KINDS[0]
    args = lstm.make_args(3, 2, 4, 16, 1, requires_grad=True)
    out = lstm.forward_op(*args, False)  # keep_activations=False, yet differentiated
    with pytest.raises(RuntimeError, match="keep_activations=True"):
        out[0].sum().backward()


def _set(i, value):
    return lambda kind, a: a.__setitem__(i if i >= 0 else kind.lengths_at, value(kind))


# (mutation of make_args(5, 3, 4, 6, 2), message): the C++ ops' messages.
BAD = [
    (_set(0, lambda k: torch.randn(5, 3)), "input must be 3-D"),
    (_set(1, lambda k: torch.randn(2, k.gates * 6 + 1, 4)), "weight_ih must be"),
    (_set(2, lambda k: torch.randn(2, k.gates * 6, 7)), "weight_hh must be"),
    (_set(3, lambda k: torch.randn(2, k.gates * 6 - 1)), " must be [2, "),
    (_set(3, lambda k: torch.randn(2, k.gates * 6, dtype=torch.float16)),
     "must have the input's dtype"),
    (lambda k, a: a.__setitem__(k.lengths_at - 1, torch.randn(2, 4, 6)), " must be [2, 3, 6]"),
    (_set(-1, lambda k: torch.tensor([5, 0, 2])), "every length must be >= 1"),
    (_set(-1, lambda k: torch.tensor([5, 9, 2])), "every length must be <= T=5"),
    (_set(-1, lambda k: torch.tensor([5, 2])), "lengths must be [B=3]"),
    (_set(-1, lambda k: torch.tensor([5, 2, 1], dtype=torch.int32)), "lengths must be int64"),
    (_set(0, lambda k: torch.randn(5, 3, 4, dtype=torch.float64)), "dtype"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise(kind, mutate, message):
    args = kind.make_args(5, 3, 4, 6, 2)
    mutate(kind, args)
    with pytest.raises(RuntimeError) as exc:
        kind.op(*args)
    assert message in str(exc.value)
    assert kind.raw.removesuffix("_triton") in str(exc.value)


def test_bad_nonlinearity_raises():
    rnn = KINDS[2]
    args = rnn.make_args(5, 3, 4, 6, 2)
    args[-1] = "sigmoid"
    with pytest.raises(RuntimeError, match="nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"):
        rnn.op(*args)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: lengths on the GPU")
def test_lengths_must_be_on_cpu():
    lstm = KINDS[0]
    args = lstm.make_args(5, 3, 4, 6, 2, device="cuda", lengths=[5, 2, 1])
    args[lstm.lengths_at] = args[lstm.lengths_at].cuda()
    with pytest.raises(RuntimeError, match="lengths must be a CPU tensor"):
        lstm.op(*args)


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


@pytest.mark.skipif(CUDA, reason="on CUDA the other tests compile and run every kernel")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert "compiled 8" in r.stdout, r.stdout + r.stderr[-2000:]
