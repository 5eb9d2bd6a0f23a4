"""The CUDA kernels of the recurrent layer ops (csrc/cuda/recurrent_cuda.cu) against eager
PyTorch in float64 on CPU (seqfuse.reference on the same values, rounded to the tested
dtype): outputs, final states and the gradients of every input, over LSTM, GRU and Elman
RNN (tanh, relu) x one or two directions x bias or not x lengths (none, ragged with
length 1 and ties, all shorter than T) x hidden sizes (odd; 256, in the persistent
kernel's range; 1024, past it for the LSTM and GRU in float32) x float32, float64,
bfloat16 and float16. Also: each recurrence path forced with SEQFUSE_CUDA_RECURRENCE
(persistent, stepwise), including more batch rows than the persistent kernel stages at
once; the raw ops (saved activations, and the backward on the same saved activations)
against the CPU op; float64 gradcheck; opcheck on CUDA tensors.

The reference runs on CPU: eager CUDA would be cuDNN, whose float32 RNNs may use TF32."""
import functools

import pytest
import torch
from cases import CUDA_LAYER_TOL as TOL
from cases import KIND_IDS, LAYER_HIDDEN, LAYER_LENGTHS
from cases import KINDS as _KINDS

from seqfuse import ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.has_native_kernel("lstm_layer", "cuda")),
    reason="needs a CUDA device and seqfuse._C built with its CUDA kernels "
           "(SEQFUSE_CUDA=1 `make install` on a machine with nvcc and a CUDA torch)")

DTYPES = list(TOL)
KINDS = [k.on("native") for k in _KINDS]  # the compiled ops (here: their CUDA kernels)


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request):
    return request.param


def make_args(kind, T, B, I, H, D, dtype, device, bias=True, lengths=None, requires_grad=True,
              seed=0):
    """kind's arguments [input, weight_ih, weight_hh, *biases, *states, lengths, *extra] on
    `device`, and the same values in float64 on CPU (the reference's arguments)."""
    g = torch.Generator().manual_seed(seed)

    # Weights at about twice torch.nn's init scale: a stable recurrence, so rounding
    # differences are not amplified step after step.
    def p(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * H ** -0.5

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    G = kind.gates * H
    values = [r(T, B, I), p(D, G, I), p(D, G, H), *[p(D, G) if bias else None for _ in kind.biases],
              *[r(D, B, H) for _ in kind.states]]
    rounded = [None if v is None else v.to(dtype) for v in values]
    lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)

    def leaf(v, to_device, to_dtype):
        return None if v is None else v.to(to_device, to_dtype).requires_grad_(requires_grad)
    args = [leaf(v, device, dtype) for v in rounded] + [lengths, *kind.extra]
    ref_args = [leaf(v, "cpu", torch.float64) for v in rounded] + [lengths, *kind.extra]
    return args, ref_args


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    # The kernels' float32 GEMMs go through cuBLAS: with TF32 allowed they would round
    # their operands to 10 mantissa bits, which no float32 tolerance here allows.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@functools.cache
def _float16_problem() -> str | None:
    """Why float16 layers cannot run yet, or None. The kernels take float16; the shared
    argument checks and the fakes must let them."""
    x = torch.zeros(1, 1, 1, device="cuda", dtype=torch.float16)
    w = torch.zeros(1, 4, 1, device="cuda", dtype=torch.float16)
    h = torch.zeros(1, 1, 1, device="cuda", dtype=torch.float16)
    try:
        ops.lstm_layer(x, w, w, None, h, h)
    except RuntimeError as exc:
        if "dtype must be" in str(exc):
            return ("csrc/layer_checks.cpp rejects float16; it must accept it for CUDA inputs "
                    f"({exc})")
        raise
    if ops.activation_dtype(x) != torch.float32:
        return ("ops.activation_dtype must give float32 for float16 inputs too: the CUDA "
                "kernels save float32 activations for both half types")
    return None


def require_dtype(dtype):
    if dtype == torch.float16 and _float16_problem():
        pytest.fail(_float16_problem())


def assert_close(actual, expected, tol, what):
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x scale {scale:.3g}"


def outputs_and_grads(kind, fn, args, cotangents):
    """Outputs of fn(*args), and the gradients of every differentiable argument of a fixed
    weighting of the outputs."""
    out = fn(*args)
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(out, cotangents, strict=True))
    return [o.detach() for o in out], torch.autograd.grad(loss, kind.tensors(args))


def check_against_reference(kind, T, B, I, H, D, dtype, bias=True, lengths=None):
    require_dtype(dtype)
    args, ref_args = make_args(kind, T, B, I, H, D, dtype, "cuda", bias=bias, lengths=lengths)
    with torch.no_grad():
        shapes = [o.shape for o in kind.ref(*ref_args)]
    g = torch.Generator().manual_seed(1)
    # rounded to the dtype, so that the cotangent reaching the op is the reference's
    cotangents = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).double() for s in shapes]
    out, grads = outputs_and_grads(kind, kind.op, args, cotangents)
    ref_out, ref_grads = outputs_and_grads(kind, kind.ref, ref_args, cotangents)
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(out, ref_out, strict=True)):
        assert a.dtype == dtype and a.is_cuda, f"output {i}: {a.dtype} on {a.device}"
        assert_close(a, b, tol["out"], f"output {i}")
    for leaf, a, b in zip(kind.tensors(args), grads, ref_grads, strict=True):
        assert a.dtype == dtype and a.shape == leaf.shape
    names = [n for n, t in zip(("input", "weight_ih", "weight_hh", *kind.biases, *kind.states),
                               args[:kind.lengths_at]) if t is not None]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_close(a, b, tol["grad"], f"grad {name}")
    # Inference: nothing saved (the LSTM and GRU skip writing their activations).
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(kind.op(*args), ref_out, strict=True)):
            assert_close(a, b, tol["out"], f"inference output {i}")


T_, B_, I_ = 6, 4, 24  # LAYER_LENGTHS' T and B


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", LAYER_HIDDEN)
@pytest.mark.parametrize("lengths", list(LAYER_LENGTHS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("D", [1, 2])
def test_matches_reference(kind, D, bias, lengths, H, dtype):
    check_against_reference(kind, T_, B_, I_, H, D, dtype, bias=bias, lengths=LAYER_LENGTHS[lengths])


# (T, B, I, H, lengths): H=1; odd H with fewer units than a block slice; 40 rows, more
# than the 32 the persistent kernel stages at once, with random lengths.
FORCED_SHAPES = [
    (1, 1, 2, 1, None),
    (5, 3, 7, 33, [5, 1, 3]),
    (4, 40, 9, 256, "random"),
]


@pytest.mark.parametrize("mode", ["persistent", "stepwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B,I,H,lengths", FORCED_SHAPES)
def test_forced_path_matches_reference(kind, mode, dtype, T, B, I, H, lengths, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CUDA_RECURRENCE", mode)
    if lengths == "random":
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2))
        lengths[0] = 1
    try:
        check_against_reference(kind, T, B, I, H, 2, dtype, lengths=lengths)
    except RuntimeError as exc:
        # These shapes fit A100/H100-class GPUs (>= 160 KiB of shared memory per block);
        # a smaller GPU may have to refuse the float64 ones.
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        if "does not fit" in str(exc) and getattr(props, "shared_memory_per_block_optin", 0) < 160 * 1024:
            pytest.skip(f"the persistent kernel does not fit H={H} {dtype} on {props.name}")
        raise


def test_forced_persistent_raises_when_it_does_not_fit(monkeypatch):
    # W_hh of one direction in float64 at H=2048 is 128 MiB: no GPU holds it on chip.
    monkeypatch.setenv("SEQFUSE_CUDA_RECURRENCE", "persistent")
    args, _ = make_args(KINDS[0], 2, 1, 4, 2048, 2, torch.float64, "cuda", requires_grad=False)
    with pytest.raises(RuntimeError, match="persistent recurrent kernel does not fit"):
        KINDS[0].op(*args)


def test_bad_recurrence_mode_raises(monkeypatch):
    monkeypatch.setenv("SEQFUSE_CUDA_RECURRENCE", "fastest")
    args, _ = make_args(KINDS[0], 2, 1, 4, 8, 1, torch.float32, "cuda", requires_grad=False)
    with pytest.raises(RuntimeError, match="SEQFUSE_CUDA_RECURRENCE must be"):
        KINDS[0].op(*args)


def _raw_outputs_and_grads(kind, args, seed=3):
    """The raw forward op's outputs (saved activations included) and its backward op's
    results for random output gradients."""
    out = kind.raw(*kind.raw_args(args, True))
    x, w_ih, w_hh = args[:3]
    states = args[3 + len(kind.biases):kind.lengths_at]
    lengths = args[kind.lengths_at]
    n_states = len(kind.states)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in out[:1 + n_states]]
    saved = (out[0], *out[1 + n_states:])
    return out, grads, (x, w_ih, w_hh, *states, lengths, *saved, *kind.extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("mode", ["auto", "stepwise"])
def test_raw_ops_match_cpu_op(kind, D, dtype, mode, monkeypatch):
    """Same saved-activation layouts as the CPU kernels (ops.py's fakes and autograd are
    shared), and the same backward for the same saved activations."""
    monkeypatch.setenv("SEQFUSE_CUDA_RECURRENCE", mode)
    cpu_args, _ = make_args(kind, 6, 4, 9, 20, D, dtype, "cpu", lengths=[5, 1, 3, 2], requires_grad=False)
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in cpu_args]
    tol = TOL[dtype]["out"]
    cpu_out, cpu_grads, cpu_rest = _raw_outputs_and_grads(kind, cpu_args)
    expected = cpu_out
    if dtype == torch.bfloat16:
        # The CUDA kernels compute in float32 and round the results once; the CPU's
        # bfloat16 RNN may multiply bfloat16 operands. Compare with its float32 results,
        # rounded the same way (saved activations stay float32).
        f32_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in cpu_args]
        n_rounded = 1 + len(kind.states)
        expected = [o.to(dtype) if i < n_rounded else o
                    for i, o in enumerate(kind.raw(*kind.raw_args(f32_args, True)))]
    cuda_out = kind.raw(*kind.raw_args(cuda_args, True))
    for i, (a, b) in enumerate(zip(cuda_out, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"forward result {i}: {a.dtype}{tuple(a.shape)}"
        assert_close(a, b, tol, f"forward result {i}")
    # The backward on the CPU op's own saved activations, moved to the GPU.
    to_cuda = [t.cuda() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
               for t in (*cpu_grads, *cpu_rest)]
    cuda_back = kind.backward(*to_cuda)
    cpu_back = kind.backward(*cpu_grads, *cpu_rest)
    for i, (a, b) in enumerate(zip(cuda_back, cpu_back, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"backward result {i}: {a.dtype}{tuple(a.shape)}"
        assert_close(a, b, TOL[dtype]["grad"], f"backward result {i}")


@pytest.mark.parametrize("mode", ["persistent", "stepwise"])
@pytest.mark.parametrize("D,bias,lengths", [(2, True, [4, 1, 3]), (1, False, None)])
def test_float64_gradcheck(kind, mode, D, bias, lengths, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CUDA_RECURRENCE", mode)
    args, _ = make_args(kind, 4, 3, 3, 5, D, torch.float64, "cuda", bias=bias, lengths=lengths)
    present = [i for i in range(kind.lengths_at) if args[i] is not None]

    def fn(*tensors):
        a = list(args)
        for i, t in zip(present, tensors):
            a[i] = t
        return kind.op(*a)
    assert torch.autograd.gradcheck(fn, tuple(args[i] for i in present))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(kind, with_lengths, dtype):
    require_dtype(dtype)
    lengths = [5, 2, 4] if with_lengths else None
    # keep_activations both ways where the op has the flag (the RNN saves nothing extra)
    for keep in (True, False) if kind.keep_flag else (True,):
        args, _ = make_args(kind, 5, 3, 4, 6, 2, dtype, "cuda", lengths=lengths, requires_grad=keep)
        torch.library.opcheck(kind.raw, kind.raw_args(args, keep))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backward_op_opcheck(kind, dtype):
    require_dtype(dtype)
    args, _ = make_args(kind, 4, 2, 3, 5, 2, dtype, "cuda", lengths=[4, 2], requires_grad=False)
    _, grads, rest = _raw_outputs_and_grads(kind, args)
    torch.library.opcheck(kind.backward, (*grads, *rest))
