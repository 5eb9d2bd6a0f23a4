"""Attention latency on CPU, float32, 2 threads; each group compares implementations on
the same inputs, after checking that they agree.

Additive (Bahdanau) attention, seqfuse.nn.AdditiveAttention on the fused op vs the same
module on the "reference" backend (the classic unfused composition that forms the
[B, Q, K, A] tanh features):
  additive-self-B32-Q256-K256-A128-Dv256-{forward,train}   (no padding: every key valid)
  additive-decoder-step-B64-Q1-K256-A256-Dv256            (op on projected keys, as a
                                                           decoder step with cached keys)
Scaled dot-product attention, B=32, H=8, Q=K=256, D=64, baseline torch's
F.scaled_dot_product_attention with the same boolean key-padding mask [B, 1, 1, K]:
  sdpa-keypad-...  lengths uniform in [1, 256] (seqfuse skips the padded keys)
  sdpa-nopad-...   a mask that keeps every key (no work to skip: the kernels' own speed)
  sdpa-keypad-train-...  forward + backward
and "unfused": the classic bmm + masked softmax + bmm.
Peak memory of the additive module: bench/memory.py.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import THREADS

from seqfuse import ops, reference
from seqfuse.nn import AdditiveAttention

ADD_SELF = dict(B=32, Q=256, K=256, A=128, Dv=256)


def additive_module(backend: str, features: int, A: int) -> AdditiveAttention:
    torch.manual_seed(0)
    return AdditiveAttention(features, features, A, backend=backend)


def additive_inputs(B, Q, K, Dv):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(B, K, Dv, generator=g)
    return torch.randn(B, Q, Dv, generator=g), keys, keys  # self-attention: values = keys


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_additive_self_attention_forward(benchmark, impl):
    s = ADD_SELF
    group = f"additive-self-B{s['B']}-Q{s['Q']}-K{s['K']}-A{s['A']}-Dv{s['Dv']}"
    benchmark.group = f"{group}-forward"
    benchmark.extra_info.update(impl=impl, threads=THREADS)
    q, k, v = additive_inputs(s["B"], s["Q"], s["K"], s["Dv"])
    fused = additive_module("native", s["Dv"], s["A"])
    model = additive_module("reference" if impl == "eager" else "native", s["Dv"], s["A"])
    with torch.inference_mode():
        torch.testing.assert_close(model(q, k, v), fused(q, k, v), atol=1e-5, rtol=0)

        def fn():
            with torch.inference_mode():
                return model(q, k, v)
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_additive_self_attention_train(benchmark, impl):
    s = ADD_SELF
    benchmark.group = f"additive-self-B{s['B']}-Q{s['Q']}-K{s['K']}-A{s['A']}-Dv{s['Dv']}-train"
    benchmark.extra_info.update(impl=impl, threads=THREADS)
    q, k, v = additive_inputs(s["B"], s["Q"], s["K"], s["Dv"])
    q.requires_grad_()
    model = additive_module("reference" if impl == "eager" else "native", s["Dv"], s["A"])

    def step():
        model.zero_grad(set_to_none=True)
        q.grad = None
        model(q, k, v).sum().backward()
    benchmark.pedantic(step, rounds=4, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_additive_decoder_step(benchmark, impl):
    B, K, A, Dv = 64, 256, 256, 256
    benchmark.group = f"additive-decoder-step-B{B}-Q1-K{K}-A{A}-Dv{Dv}"
    benchmark.extra_info.update(impl=impl, threads=THREADS)
    g = torch.Generator().manual_seed(2)
    qp, kp = torch.randn(B, 1, A, generator=g), torch.randn(B, K, A, generator=g)
    w_v, value = torch.randn(A, generator=g), torch.randn(B, K, Dv, generator=g)
    lens = torch.randint(1, K + 1, (B,), generator=g)
    fn = {"eager": reference.additive_attention, "seqfuse": ops.additive_attention}[impl]
    with torch.inference_mode():
        for a, b in zip(fn(qp, kp, w_v, value, lens), ops.additive_attention(qp, kp, w_v, value, lens)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

        def run():
            with torch.inference_mode():
                return fn(qp, kp, w_v, value, lens)
        benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)


SDPA = dict(B=32, H=8, T=256, D=64)


def sdpa_inputs(padded: bool, requires_grad=False):
    B, H, T, D = SDPA["B"], SDPA["H"], SDPA["T"], SDPA["D"]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g, requires_grad=requires_grad) for _ in range(3))
    lens = torch.randint(1, T + 1, (B,), generator=g) if padded else torch.full((B,), T)
    mask = (torch.arange(T) < lens[:, None]).view(B, 1, 1, T)
    return q, k, v, mask


SDPA_IMPLS = {
    "torch_sdpa": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
    "unfused": lambda q, k, v, m: reference.scaled_dot_product_attention(q, k, v, attn_mask=m),
    "seqfuse": lambda q, k, v, m: ops.scaled_dot_product_attention(q, k, v, attn_mask=m),
}


def _sdpa_group(kind):
    return f"sdpa-{kind}-B{SDPA['B']}-H{SDPA['H']}-T{SDPA['T']}-D{SDPA['D']}"


@pytest.mark.parametrize("padded", [True, False], ids=["keypad", "nopad"])
@pytest.mark.parametrize("impl", list(SDPA_IMPLS))
def test_sdpa_forward(benchmark, impl, padded):
    benchmark.group = _sdpa_group("keypad" if padded else "nopad")
    benchmark.extra_info.update(impl=impl, threads=THREADS, baseline="torch_sdpa")
    q, k, v, mask = sdpa_inputs(padded)
    fn = SDPA_IMPLS[impl]
    with torch.inference_mode():
        torch.testing.assert_close(fn(q, k, v, mask), SDPA_IMPLS["torch_sdpa"](q, k, v, mask),
                                   atol=1e-5, rtol=0)

        def run():
            with torch.inference_mode():
                return fn(q, k, v, mask)
        benchmark.pedantic(run, rounds=15, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("impl", ["torch_sdpa", "seqfuse"])
def test_sdpa_train(benchmark, impl):
    benchmark.group = _sdpa_group("keypad-train")
    benchmark.extra_info.update(impl=impl, threads=THREADS, baseline="torch_sdpa")
    q, k, v, mask = sdpa_inputs(True, requires_grad=True)
    fn = SDPA_IMPLS[impl]
    go = torch.randn(q.shape)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, mask).backward(go)
    benchmark.pedantic(step, rounds=8, warmup_rounds=1, iterations=1)
