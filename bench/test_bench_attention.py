"""Attention: each group times the same inputs in every implementation, after checking
that they agree.

Additive (Bahdanau) attention. seqfuse.nn.AdditiveAttention on the fused op ("seqfuse")
vs the same module on the "reference" backend ("eager": the classic unfused composition
that forms the [B, Q, K, A] tanh features):
  additive-self-{device}-B..-Q..-K..: self-attention (values = keys), forward and train,
    at the issue shape (B32, Q=K=256, A128, Dv256) and a length sweep Q=K=16..256 at B8
    (the eager module's [B, Q, K, A] features make 1024 a 4 GiB tensor: not swept further);
  additive-decoder-step-{device}-B..-K..: one decoder query over cached projected keys
    (the op itself), K = 16..1024 at B32 and B = 1..64 at K256, lengths uniform in [1, K].
Scaled dot-product attention with a boolean key-padding mask [B, 1, 1, K], baseline
torch's F.scaled_dot_product_attention ("torch_sdpa") with the same mask, and "unfused":
bmm + masked softmax + bmm:
  sdpa-keypad-... lengths uniform in [1, T] (seqfuse skips the padded keys);
  sdpa-nopad-...  a mask that keeps every key (no work to skip: the kernels' own speed);
  at B32-H8-T256-D64 (the issue shape), a length sweep T = 16..1024 at B8-H8-D64,
  forward and forward + backward.
GPU rows (skipped without one): seqfuse-cuda, seqfuse-triton against the same baselines
on CUDA tensors. Peak memory of the additive module: bench/memory.py.
"""
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import cases, record, require_backend, require_device, rounds_for, sweep, timed

from seqfuse import functional, reference
from seqfuse.nn import AdditiveAttention

GPU_IMPLS = ["seqfuse-cuda", "seqfuse-triton"]


def _impls(base: list[str]) -> list[tuple[str, str]]:
    cpu = [("cpu", i) for i in base]
    return cpu + [("cuda", i) for i in base if i != "seqfuse" and i != "unfused"] + [("cuda", i) for i in GPU_IMPLS]


def _ids(pairs):
    return [f"{d}-{i}" for d, i in pairs]


def _backend(impl: str, op: str, device: str) -> str:
    if impl in ("eager", "torch_sdpa", "unfused"):
        require_device(device)
        return "reference"
    return require_backend(impl, op, device)


def _time(benchmark, fn, device, budget=1.5):
    t0 = time.perf_counter()
    fn()
    timed(benchmark, fn, rounds_for(time.perf_counter() - t0, budget), device, warmup=1)


# --- additive attention -----------------------------------------------------------

ADD_IMPLS = _impls(["eager", "seqfuse"])
# (B, Q=K, A, Dv, sweep axis)
ADD_SELF = [(32, 256, 128, 256, None)] + [(8, T, 128, 256, "T") for T in (16, 64, 256)]
ADD_SELF_QUICK = [(2, 3, 4, 5, "T")]


def _add_id(c):
    return f"B{c[0]}-Q{c[1]}-K{c[1]}-A{c[2]}-Dv{c[3]}"


def _add_sweep(kind, device, c):
    return sweep(f"additive-self-{kind}-{device}-B{c[0]}-A{c[2]}-Dv{c[3]}", "T", c[1]) if c[4] else {}


def _additive_case(impl, device, c, requires_grad=False):
    B, T, A, Dv, _ = c
    torch.manual_seed(0)
    module = AdditiveAttention(Dv, Dv, A, backend=_backend(impl, "additive_attention", device)).to(device)
    ref = AdditiveAttention(Dv, Dv, A, backend="reference").to(device)
    ref.load_state_dict(module.state_dict())
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, T, Dv, generator=g).to(device), torch.randn(B, T, Dv, generator=g).to(device)
    return module, ref, q.requires_grad_(requires_grad), k


@cases(full=ADD_SELF, quick=ADD_SELF_QUICK, ids=_add_id)
@pytest.mark.parametrize("device,impl", ADD_IMPLS, ids=_ids(ADD_IMPLS))
def test_additive_self_forward(benchmark, device, impl, case):
    module, ref, q, k = _additive_case(impl, device, case)
    record(benchmark, f"additive-self-forward-{device}-{_add_id(case)}", impl, _add_id(case), batch=case[0],
           device=device, **_add_sweep("forward", device, case))
    with torch.inference_mode():
        torch.testing.assert_close(module(q, k, k), ref(q, k, k), atol=1e-5 if device == "cpu" else 2e-3, rtol=0)

    def fn():
        with torch.inference_mode():
            return module(q, k, k)
    _time(benchmark, fn, device)


@cases(full=ADD_SELF, quick=ADD_SELF_QUICK, ids=_add_id)
@pytest.mark.parametrize("device,impl", ADD_IMPLS, ids=_ids(ADD_IMPLS))
def test_additive_self_train(benchmark, device, impl, case):
    module, ref, q, k = _additive_case(impl, device, case, requires_grad=True)
    record(benchmark, f"additive-self-train-{device}-{_add_id(case)}", impl, _add_id(case), batch=case[0],
           device=device, **_add_sweep("train", device, case))

    def step(m):
        m.zero_grad(set_to_none=True)
        q.grad = None
        m(q, k, k).sum().backward()
        return q.grad
    torch.testing.assert_close(step(module).clone(), step(ref).clone(), atol=1e-4, rtol=1e-4)
    _time(benchmark, lambda: step(module), device)


# (B, K, A, Dv, sweep axis)
DEC = [(32, K, 256, 256, "T") for K in (16, 64, 256, 1024)] + [(B, 256, 256, 256, "B") for B in (1, 8, 64)]
DEC_QUICK = [(2, 5, 3, 4, "T")]


def _dec_id(c):
    return f"B{c[0]}-Q1-K{c[1]}-A{c[2]}-Dv{c[3]}"


@cases(full=DEC, quick=DEC_QUICK, ids=_dec_id)
@pytest.mark.parametrize("device,impl", ADD_IMPLS, ids=_ids(ADD_IMPLS))
def test_additive_decoder_step(benchmark, device, impl, case):
    B, K, A, Dv, axis = case
    backend = _backend(impl, "additive_attention", device)
    point = sweep(f"additive-decoder-step-{device}-B{B}-A{A}-Dv{Dv}", "T", K) if axis == "T" else \
        sweep(f"additive-decoder-step-{device}-K{K}-A{A}-Dv{Dv}", "B", B)
    record(benchmark, f"additive-decoder-step-{device}-{_dec_id(case)}", impl, _dec_id(case), batch=B,
           device=device, **point)
    g = torch.Generator().manual_seed(2)
    qp, kp = torch.randn(B, 1, A, generator=g).to(device), torch.randn(B, K, A, generator=g).to(device)
    w_v, value = torch.randn(A, generator=g).to(device), torch.randn(B, K, Dv, generator=g).to(device)
    lens = torch.randint(1, K + 1, (B,), generator=g).to(device)

    def fn():
        with torch.inference_mode():
            return functional.additive_attention(qp, kp, w_v, value, lens, backend=backend)
    for a, b in zip(fn(), reference.additive_attention(qp, kp, w_v, value, lens)):
        torch.testing.assert_close(a, b, atol=1e-5 if device == "cpu" else 2e-3, rtol=0)
    _time(benchmark, fn, device)


# --- scaled dot-product attention ---------------------------------------------------

SDPA_IMPLS = _impls(["torch_sdpa", "unfused", "seqfuse"])
SDPA_TRAIN_IMPLS = _impls(["torch_sdpa", "seqfuse"])
# (B, heads, T, D, padded, sweep axis)
SDPA = [(32, 8, 256, 64, True, None), (32, 8, 256, 64, False, None)] + \
    [(8, 8, T, 64, True, "T") for T in (16, 64, 256, 1024)]
SDPA_TRAIN = [(32, 8, 256, 64, True, None)] + [(8, 8, T, 64, True, "T") for T in (16, 64, 256, 1024)]
SDPA_QUICK = [(2, 2, 5, 4, True, "T"), (2, 2, 3, 4, False, None)]


def _sdpa_id(c):
    return f"{'keypad' if c[4] else 'nopad'}-B{c[0]}-H{c[1]}-T{c[2]}-D{c[3]}"


def _sdpa_inputs(case, device, requires_grad=False):
    B, H, T, D, padded, _ = case
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device).requires_grad_(requires_grad) for _ in range(3))
    lens = torch.randint(1, T + 1, (B,), generator=g) if padded else torch.full((B,), T)
    mask = (torch.arange(T) < lens[:, None]).view(B, 1, 1, T).to(device)
    return q, k, v, mask


def _sdpa_fn(impl: str, device: str):
    backend = _backend(impl, "scaled_dot_product_attention", device)
    if impl == "torch_sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    if impl == "unfused":
        return lambda q, k, v, m: reference.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return lambda q, k, v, m: functional.scaled_dot_product_attention(q, k, v, attn_mask=m, backend=backend)


def _sdpa_sweep(kind, device, c):
    return sweep(f"sdpa-keypad-{kind}-{device}-B{c[0]}-H{c[1]}-D{c[3]}", "T", c[2]) if c[5] else {}


@cases(full=SDPA, quick=SDPA_QUICK, ids=_sdpa_id)
@pytest.mark.parametrize("device,impl", SDPA_IMPLS, ids=_ids(SDPA_IMPLS))
def test_sdpa_forward(benchmark, device, impl, case):
    fn = _sdpa_fn(impl, device)
    q, k, v, mask = _sdpa_inputs(case, device)
    record(benchmark, f"sdpa-forward-{device}-{_sdpa_id(case)}", impl, _sdpa_id(case), batch=case[0],
           device=device, baseline="torch_sdpa", **_sdpa_sweep("forward", device, case))
    with torch.inference_mode():
        torch.testing.assert_close(fn(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   atol=1e-5 if device == "cpu" else 2e-3, rtol=0)

    def run():
        with torch.inference_mode():
            return fn(q, k, v, mask)
    _time(benchmark, run, device)


@cases(full=SDPA_TRAIN, quick=SDPA_QUICK[:1], ids=_sdpa_id)
@pytest.mark.parametrize("device,impl", SDPA_TRAIN_IMPLS, ids=_ids(SDPA_TRAIN_IMPLS))
def test_sdpa_train(benchmark, device, impl, case):
    fn = _sdpa_fn(impl, device)
    q, k, v, mask = _sdpa_inputs(case, device, requires_grad=True)
    record(benchmark, f"sdpa-train-{device}-{_sdpa_id(case)}", impl, _sdpa_id(case), batch=case[0],
           device=device, baseline="torch_sdpa", **_sdpa_sweep("train", device, case))
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)

    def step(f):
        for t in (q, k, v):
            t.grad = None
        f(q, k, v, mask).backward(go)
        return q.grad
    want = step(lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3])).clone()
    torch.testing.assert_close(step(fn), want, atol=1e-4, rtol=1e-4)
    _time(benchmark, lambda: step(fn), device)
