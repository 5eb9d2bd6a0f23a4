"""Run-time choice of the CPU kernels' capability (csrc/cpu/kernels.h, dispatch.cpp).

- Every capability this machine and build support (seqfuse.cpu_capabilities()) gives the
  reference's outputs and gradients for every op: odd sizes, length-1 rows, fully padded
  attention rows, float64, bfloat16, packed weights.
- SEQFUSE_CPU_CAPABILITY picks one per process (a higher one than the CPU has runs the best
  below it, with a warning; an unknown name raises, naming the variable).
- The library executes no instruction a CPU without AVX-512 (or without AVX2) lacks outside
  those capabilities' kernels: checked on its disassembly, since no such CPU is at hand.
- bfloat16 on AMX tiles (blocks of 16 rows) where the CPU has them, and on the AVX512-BF16
  register tiles otherwise, both within twice eager bfloat16's own error.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import requires_native

import seqfuse
from seqfuse import ops, reference

pytestmark = requires_native

CAPABILITIES = ("default", "avx2", "avx512", "avx512_bf16", "amx")


@pytest.fixture(params=seqfuse.cpu_capabilities() or ["none"])
def capability(request):
    previous = seqfuse.set_cpu_capability(request.param)
    assert seqfuse.cpu_capability() == request.param
    yield request.param
    seqfuse.set_cpu_capability(previous)


def _close(got, want, tol):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"output {i}"
            continue
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        assert err <= tol * max(1.0, w.double().abs().max().item() if w.numel() else 0.0), f"output {i}: {err:.3e}"


def _grads(outputs, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [o for o in outputs if o.requires_grad]
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True)


def _recurrent_case(kind, dtype, B=7, T=5, I=5, H=19, D=2):
    torch.manual_seed(hash((kind, B, H)) % 1000)
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[kind]
    x = torch.randn(T, B, I, dtype=dtype)
    wi = torch.randn(D, G * H, I, dtype=dtype) * H ** -0.5
    wh = torch.randn(D, G * H, H, dtype=dtype) * H ** -0.5
    b = torch.randn(D, G * H, dtype=dtype) * 0.1
    hx = torch.randn(D, B, H, dtype=dtype)
    cx = torch.randn(D, B, H, dtype=dtype)
    L = torch.randint(1, T + 1, (B,))
    L[0], L[-1] = 1, T  # a length-1 row and a full one
    if kind == "lstm":
        args = [x, wi, wh, b, hx, cx]
        return args, L, ops.lstm_layer, reference.lstm_layer, {}
    if kind == "gru":
        args = [x, wi, wh, b, b.flip(-1).clone(), hx]
        return args, L, ops.gru_layer, reference.gru_layer, {}
    args = [x, wi, wh, b, hx]
    nl = {"nonlinearity": kind.split("_")[1]}
    return args, L, ops.rnn_layer, reference.rnn_layer, nl


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_recurrent_layers_match_the_reference(capability, kind):
    args, L, op, ref, kw = _recurrent_case(kind, torch.float32)
    args = [a.requires_grad_() for a in args]
    got, want = op(*args, L, **kw), ref(*args, L, **kw)
    _close(got, want, 2e-5)
    _close(_grads(got, args), _grads(want, args), 5e-5)
    # float64, no lengths, one direction, batch 1
    args64, _, op, ref, kw = _recurrent_case(kind, torch.float64, B=1, D=1, H=17)
    with torch.no_grad():
        _close(op(*args64, None, **kw), ref(*args64, None, **kw), 1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_bfloat16_and_packed_weights_match(capability, kind):
    args, L, op, ref, kw = _recurrent_case(kind, torch.float32, B=37)  # two 16-row AMX blocks + 5
    with torch.no_grad():
        exact = ref(*(a.double() for a in args), L, **kw)
        got = op(*(a.bfloat16() for a in args), L, **kw)
        eager = ref(*(a.bfloat16() for a in args), L, **kw)
        for g, e, x in zip(got, eager, exact):
            err, err_eager = [(t.double() - x).abs().max().item() for t in (g, e)]
            assert err <= 2 * max(err_eager, x.abs().max().item() * 2 ** -9), (err, err_eager)
        # the packed panels of this capability give the unpacked results exactly
        packed = ops.pack_recurrent_weights(args[1], args[2])
        _close(op(*args, L, packed_weights=packed, **kw), op(*args, L, **kw), 0.0)


def test_proj_layer_matches(capability):
    torch.manual_seed(3)
    T, B, D, H, P, I = 6, 5, 2, 11, 7, 9
    L = torch.tensor([6, 1, 3, 6, 2])
    # lstm_proj_layer, forward and backward
    x = torch.randn(T, B, I, requires_grad=True)
    wi = (torch.randn(D, 4 * H, I) * 0.3).requires_grad_()
    whp = (torch.randn(D, 4 * H, P) * 0.3).requires_grad_()
    b = (torch.randn(D, 4 * H) * 0.1).requires_grad_()
    wr = (torch.randn(D, P, H) * 0.3).requires_grad_()
    h0 = torch.randn(D, B, P, requires_grad=True)
    c0 = torch.randn(D, B, H, requires_grad=True)
    inputs = [x, wi, whp, b, wr, h0, c0]
    got = ops.lstm_proj_layer(*inputs, L)
    want = reference.lstm_proj_layer(*inputs, L)
    _close(got, want, 2e-5)
    _close(_grads(got, inputs), _grads(want, inputs), 5e-5)


def test_projected_layers_equal_the_layers_with_their_projection(capability):
    # lstm_layer_projected(x W_ih^T + b) is lstm_layer(x); gru_layer_projected likewise
    torch.manual_seed(4)
    T, B, D, I, H = 5, 3, 2, 6, 13
    x, wi = torch.randn(T, B, I), torch.randn(D, 4 * H, I) * 0.3
    wh, b = torch.randn(D, 4 * H, H) * 0.3, torch.randn(D, 4 * H) * 0.1
    hx, cx = torch.randn(D, B, H), torch.randn(D, B, H)
    L = torch.tensor([5, 1, 4])
    with torch.no_grad():
        proj = torch.einsum("tbi,dgi->tbdg", x, wi) + b
        _close(ops.lstm_layer_projected(proj, wh, hx, cx, L), reference.lstm_layer(x, wi, wh, b, hx, cx, L), 2e-5)
        wi3, wh3 = wi[:, : 3 * H], wh[:, : 3 * H]
        b_ih, b_hh = b[:, : 3 * H], b[:, H:]
        proj = torch.einsum("tbi,dgi->tbdg", x, wi3) + b_ih
        _close(ops.gru_layer_projected(proj, wh3, b_hh, hx, L), reference.gru_layer(x, wi3, wh3, b_ih, b_hh, hx, L), 2e-5)


def test_attention_matches_the_reference(capability):
    torch.manual_seed(5)
    B, Q, K, A, Dv = 3, 4, 7, 10, 5
    q, k = torch.randn(B, Q, A, requires_grad=True), torch.randn(B, K, A, requires_grad=True)
    w, v = torch.randn(A, requires_grad=True), torch.randn(B, K, Dv, requires_grad=True)
    lens = torch.tensor([7, 1, 0])  # a full row, one key, a fully padded row (zeros)
    got, want = ops.additive_attention(q, k, w, v, lens), reference.additive_attention(q, k, w, v, lens)
    _close(got, want, 2e-5)
    _close(_grads(got[:1], [q, k, w, v]), _grads(want[:1], [q, k, w, v]), 5e-5)
    H, D = 2, 9
    q = torch.randn(B, H, Q, D, requires_grad=True)
    k, v = torch.randn(B, H, K, D, requires_grad=True), torch.randn(B, H, K, D, requires_grad=True)
    for causal in (False, True):
        got = ops.scaled_dot_product_attention(q, k, v, valid_lens=lens, is_causal=causal)
        want = reference.scaled_dot_product_attention(q, k, v, valid_lens=lens, is_causal=causal)
        _close([got], [want], 2e-5)
        _close(_grads([got], [q, k, v]), _grads([want], [q, k, v]), 5e-5)


def test_packed_weights_of_another_width_are_refused_and_modules_repack():
    caps = seqfuse.cpu_capabilities()
    if not ({"avx2", "default"} & set(caps) and {"avx512", "avx512_bf16"} & set(caps)):
        pytest.skip(f"needs capabilities of two vector widths, this machine runs {caps}")
    wide, narrow = [c for c in caps if c.startswith("avx512")][0], "avx2" if "avx2" in caps else "default"
    wi, wh = torch.randn(1, 4 * 16, 8), torch.randn(1, 4 * 16, 16)
    x, h = torch.randn(3, 2, 8), torch.zeros(1, 2, 16)
    previous = seqfuse.set_cpu_capability(wide)
    try:
        packed = ops.pack_recurrent_weights(wi, wh)
        lstm = seqfuse.nn.LSTM(8, 16).eval()
        with torch.no_grad():
            before = lstm(x)[0]
        seqfuse.set_cpu_capability(narrow)
        with pytest.raises(RuntimeError, match="vector width 16.*pack them again"):
            ops.lstm_layer(x, wi, wh, None, h, h, None, packed_weights=packed)
        with torch.no_grad():  # the module's cached packing is for the wide kernels: repacked
            _close([lstm(x)[0]], [before], 1e-6)
    finally:
        seqfuse.set_cpu_capability(previous)


def test_set_cpu_capability_errors():
    with pytest.raises(ValueError, match="'avx9' is not a CPU capability: use one of default, avx2"):
        seqfuse.set_cpu_capability("avx9")
    with pytest.raises(TypeError, match="name must be a str"):
        seqfuse.set_cpu_capability(2)
    assert seqfuse.cpu_capability() in CAPABILITIES
    assert seqfuse.cpu_capabilities()[0] == "default"
    assert seqfuse.cpu_capabilities()[-1] == seqfuse.cpu_capability()  # the best by default
    if "amx" not in seqfuse.cpu_capabilities():
        previous = seqfuse.cpu_capability()
        try:
            with pytest.warns(UserWarning, match="asks for the CPU capability 'amx', which this CPU or build"):
                seqfuse.set_cpu_capability("amx")
            assert seqfuse.cpu_capability() == seqfuse.cpu_capabilities()[-1]
        finally:
            seqfuse.set_cpu_capability(previous)


# Runs in a child process: SEQFUSE_CPU_CAPABILITY is read at the first kernel call.
_PROBE = r"""
import json, warnings, torch, seqfuse
from seqfuse import ops
x = torch.randn(3, 2, 4); w = torch.randn(1, 8, 4); h = torch.zeros(1, 2, 2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        ops.lstm_layer(x, w, torch.randn(1, 8, 2), None, h, h)
        result = {"capability": seqfuse.cpu_capability()}
    except Exception as exc:
        result = {"error": type(exc).__name__ + ": " + str(exc).splitlines()[0]}
result["warnings"] = [str(w.message).splitlines()[0] for w in caught]
print(json.dumps(result))
"""


def _probe(capability):
    env = dict(os.environ, SEQFUSE_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the C++ warning goes to stderr (c10's handler: the op is not called from Python)
    result["warnings"] += [line for line in out.stderr.splitlines() if "Warning" in line]
    return result


def test_environment_variable_chooses_the_capability():
    caps = seqfuse.cpu_capabilities()
    assert _probe(caps[0].upper()) == {"capability": caps[0], "warnings": []}  # any case
    best = _probe("amx")
    assert best["capability"] == caps[-1]
    assert ("amx" in caps) == (best["warnings"] == [])
    if "amx" not in caps:
        assert f"SEQFUSE_CPU_CAPABILITY asks for the CPU capability 'amx', which this CPU does not support: running '{caps[-1]}'" in best["warnings"][0]
    bad = _probe("sse9")
    assert bad["error"].startswith("ValueError: SEQFUSE_CPU_CAPABILITY 'sse9' is not a CPU capability")


def test_amx_runs_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "amx_bf16" not in flags:
        pytest.skip("this CPU has no AMX-BF16: the AMX kernels can only run on one that has")
    assert "amx" in seqfuse.cpu_capabilities()


# The disassembly check. Instructions that need AVX-512 (EVEX encodings: zmm, the upper 16
# vector registers, mask registers, EVEX-only mnemonics), and those that need AVX/AVX2/FMA.
_AVX512 = re.compile(
    r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{evex\}|\b(vpternlog|vdpbf16ps|vcvtne2?ps2bf16|"
    r"vpermt2|vpermi2|vscalef|vrcp14|vrsqrt14|vrndscale|vfixupimm|vgetexp|vgetmant|"
    r"vmovdq[au](8|16|32|64)|vp(and|andn|or|xor)[dq]\b|v?p?compress|vexpand|valign[dq]|"
    r"vextract[fi](32x8|64x2|64x4)|vinsert[fi](32x8|64x2|64x4)|vbroadcast[fi](32x2|32x8|64x2|64x4)|"
    r"vpmov(db|dw|qb|qw|qd|wb)|k(mov|and|or|xor|not|shift|test|ortest|unpck)[bwdq])")
_AVX = re.compile(r"%ymm|\bv(fn?m(add|sub)|pbroadcast|perm|gather|pmask|insert|extract|broadcast)")
_AMX = re.compile(r"\b(tileloadd|tileloaddt1|tilestored|tdpbf16ps|tdpb[su][su]d|ldtilecfg|tilerelease|tilezero)\b")
# Names (demangled or not) of the code compiled for a capability.
_IN_AVX512 = re.compile(r"seqfuse::AVX512(_BF16)?::|at::vec::AVX512(_BF16)?::|7seqfuse(6AVX512|11AVX512_BF16)|3vec(6AVX512|11AVX512_BF16)")
_IN_AVX2 = re.compile(r"seqfuse::AVX2::|at::vec::AVX2::|7seqfuse4AVX2|3vec4AVX2")


def _functions(path):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True,
                         text=True, check=True).stdout
    name, addr, body = None, 0, []
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if m:
            if name is not None:
                yield name, addr, body
            name, addr, body = m.group(2), int(m.group(1), 16), []
        elif name is not None and "\t" in line:
            body.append(line.split("\t", 1)[1])
    if name is not None:
        yield name, addr, body


def test_no_capability_instruction_runs_outside_its_kernels():
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    if not sys.platform.startswith("linux") or not re.match(r"x86_64|amd64", os.uname().machine, re.I):
        pytest.skip("the capabilities are x86-64 ISAs")
    funcs = list(_functions(seqfuse.ops._C.__file__))
    caps = set(seqfuse.cpu_capabilities())

    def first(pattern):  # the lowest address of a capability's own code (hot text and .cold)
        hot = [a for n, a, _ in funcs if pattern.search(n) and ".cold" not in n]
        cold = [a for n, a, _ in funcs if pattern.search(n) and ".cold" in n]
        return min(hot, default=None), min(cold, default=None)

    bounds = {"avx512": first(_IN_AVX512), "avx2": first(_IN_AVX2)}
    assert bounds["avx512"][0] is not None and bounds["avx2"][0] is not None, "no capability kernels found"
    problems = []
    for name, addr, body in funcs:
        text = "\n".join(body)
        if _AMX.search(text) and "panel_product" not in name:
            problems.append(f"AMX outside the panel product: {name[:160]}")
        for isa, needs, inside in (("avx512", _AVX512, _IN_AVX512), ("avx2", _AVX, _IN_AVX2)):
            if not needs.search(text) or inside.search(name) or (isa == "avx2" and _IN_AVX512.search(name)):
                continue
            if "panel_product" in name:  # AMX code (target attributes), called from AVX512_BF16 only
                continue
            # Otherwise only a copy the compiler made for one object file ("[clone .constprop]",
            # ".isra"...), local to it, that lies among that capability's objects: the linker
            # kept the lowest object's copy of every function several objects share.
            lo = bounds[isa][1 if ".cold" in name else 0]
            if "[clone" not in name or lo is None or addr < lo:
                problems.append(f"{isa} instructions in {name[:160]} at {addr:#x}")
    assert not problems, "\n".join(problems[:20])
    assert caps >= {"default"}


# The backward's large GEMMs run on oneDNN or on at::mm's BLAS (csrc/cpu/gemm.h): both
# give the reference's gradients, whichever this machine picks by default.
_GEMM_PROBE = r"""
import json, torch
from seqfuse import ops, reference
torch.manual_seed(0)
T, B, I, H, D = 7, 5, 6, 13, 2
args = [torch.randn(T, B, I), torch.randn(D, 4 * H, I) * 0.3, torch.randn(D, 4 * H, H) * 0.3,
        torch.randn(D, 4 * H) * 0.1, torch.randn(D, B, H), torch.randn(D, B, H)]
args = [a.requires_grad_() for a in args]
L = torch.tensor([7, 1, 4, 7, 2])
err = []
for fn in (ops.lstm_layer, reference.lstm_layer):
    out = fn(*args, L)
    err.append(torch.autograd.grad(out[0].sum() + out[1].sum(), args))
print(json.dumps(max((a - b).abs().max().item() for a, b in zip(*err))))
"""


@pytest.mark.parametrize("gemm", ["blas", "onednn"])
def test_backward_gemms_match_on_either_library(gemm):
    env = dict(os.environ, SEQFUSE_GEMM=gemm)
    out = subprocess.run([sys.executable, "-c", _GEMM_PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) < 1e-4
