"""GPU latency: seqfuse's CUDA C++ ("cuda") and Triton ("triton") kernels against
PyTorch's own CUDA paths, on the shapes of issue 5. Skipped without a CUDA GPU.

Each group compares implementations on the same inputs after checking that they agree;
the ratio is the baseline's median over the impl's median, in one run:
  lstm-{f32,bf16}-B{1,8,64}-T128-H{256,512,1024}    inference, baseline cuDNN
  lstm-f32-train-B64-T128-H512                      forward + backward, baseline cuDNN
  gru-...                                           the same against cuDNN's GRU
  additive-bf16-B32-Q512-K512-A128-Dv256[-train]    baseline the unfused eager module
  sdpa-keypad-bf16-B16-H16-T1024-D64[-train]        baseline F.scaled_dot_product_attention
                                                    with the same key-padding mask; also
                                                    its flash backend without a mask
Every row carries its work (FLOPs, bytes), the rate it achieved, and the floor: the larger
of FLOPs / the measured matmul rate and bytes / the measured copy bandwidth (ceilings
measured once per session, bench/gpu_ceilings). Times are device times: each round ends
with a synchronize.

    python -m pytest bench/test_bench_gpu.py --benchmark-only --benchmark-json=gpu.json
    python bench/report.py gpu.json
"""
import pytest
import torch
import torch.nn.functional as F

import seqfuse
from seqfuse import functional, reference
from seqfuse.backend import triton_unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# Agreement checked before timing (max abs difference against the baseline's output).
AGREE_ATOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


def require(impl: str, op: str) -> str:
    """The backend name for a seqfuse impl, or a skip saying why it cannot run."""
    if impl == "cuda":
        if not seqfuse.ops.has_native_kernel(op, "cuda"):
            pytest.skip(seqfuse.ops.build_hint("cuda"))
        return "native"
    reason = triton_unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)
    return "triton"


@pytest.fixture(scope="session")
def ceilings():
    """Measured once: device-to-device copy bandwidth (bytes read + written per second)
    and dense matmul rates (FLOP/s) in float32 (no TF32) and bfloat16, on random data."""
    def time_ms(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    rates = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype in DTYPES.items():
        n = 8192 if dtype == torch.bfloat16 else 4096
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        rates[dtype] = 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"bandwidth": bw, "rate": rates}


def timed(benchmark, fn, rounds: int) -> None:
    def run():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=5, iterations=1)


def record_work(benchmark, ceilings, flops: float, bytes_: float, dtype) -> None:
    """Work and floor beside the time; the achieved rates are filled in by report.py from
    the median (flops / median, bytes / median)."""
    floor = max(flops / ceilings["rate"][dtype], bytes_ / ceilings["bandwidth"])
    benchmark.extra_info.update(flops=flops, bytes=bytes_, floor_ms=1e3 * floor,
                                ceiling_tflops=ceilings["rate"][dtype] / 1e12,
                                ceiling_tbps=ceilings["bandwidth"] / 1e12)


# ---------------------------------------------------------------------------------
# LSTM and GRU layers: T=128, I=H
# ---------------------------------------------------------------------------------

T = 128
RNN_SHAPES = [(B, H) for B in (1, 8, 64) for H in (256, 512, 1024)]
GATES = {"lstm": 4, "gru": 3}


def rnn_pair(kind: str, H: int, dtype, backend: str):
    torch.manual_seed(0)
    base = getattr(torch.nn, kind.upper())(H, H).to("cuda", dtype)
    fused = getattr(seqfuse.nn, kind.upper())(H, H, backend=backend).to("cuda", dtype)
    fused.load_state_dict(base.state_dict())
    return base, fused


def rnn_work(kind: str, B: int, H: int, dtype, train: bool) -> tuple[float, float]:
    G, es = GATES[kind], torch.finfo(dtype).bits // 8
    flops = 2 * T * B * G * H * (H + H) * (3 if train else 1)
    weights = G * H * (H + H) * es
    acts = T * B * (H + H) * es * (2 if train else 1)
    return flops, weights * (2 if train else 1) + acts


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("B,H", RNN_SHAPES, ids=[f"B{B}-H{H}" for B, H in RNN_SHAPES])
@pytest.mark.parametrize("impl", ["cudnn", "cuda", "triton"])
def test_rnn_inference(benchmark, ceilings, impl, B, H, dt, kind):
    dtype = DTYPES[dt]
    benchmark.group = f"{kind}-{dt}-B{B}-T{T}-H{H}"
    benchmark.extra_info.update(impl=impl, baseline="cudnn", device=torch.cuda.get_device_name())
    backend = "reference" if impl == "cudnn" else require(impl, f"{kind}_layer")
    base, fused = rnn_pair(kind, H, dtype, backend)
    model = base if impl == "cudnn" else fused
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    with torch.inference_mode():
        torch.testing.assert_close(model(x)[0], base(x)[0], atol=AGREE_ATOL[dtype], rtol=0)
        record_work(benchmark, ceilings, *rnn_work(kind, B, H, dtype, False), dtype)
        timed(benchmark, lambda: model(x), rounds=50)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("impl", ["cudnn", "cuda", "triton"])
def test_rnn_train(benchmark, ceilings, impl, kind):
    B, H, dtype = 64, 512, torch.float32
    benchmark.group = f"{kind}-f32-train-B{B}-T{T}-H{H}"
    benchmark.extra_info.update(impl=impl, baseline="cudnn", device=torch.cuda.get_device_name())
    backend = "reference" if impl == "cudnn" else require(impl, f"{kind}_layer")
    base, fused = rnn_pair(kind, H, dtype, backend)
    model = base if impl == "cudnn" else fused
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True)
    go = torch.randn(T, B, H, device="cuda", dtype=dtype)
    ref = torch.autograd.grad(base(x)[0], x, go)[0]
    got = torch.autograd.grad(model(x)[0], x, go)[0]
    torch.testing.assert_close(got, ref, atol=AGREE_ATOL[dtype], rtol=1e-2)
    record_work(benchmark, ceilings, *rnn_work(kind, B, H, dtype, True), dtype)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x)[0].backward(go)
    timed(benchmark, step, rounds=20)


# ---------------------------------------------------------------------------------
# Additive attention: B=32, Q=K=512, A=128, Dv=256, bf16
# ---------------------------------------------------------------------------------

ADD = dict(B=32, Q=512, K=512, A=128, Dv=256)


def additive_case(backend: str, requires_grad: bool = False):
    s = ADD
    torch.manual_seed(0)
    module = seqfuse.nn.AdditiveAttention(s["Dv"], s["Dv"], s["A"], backend=backend)
    module = module.to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(s["B"], s["Q"], s["Dv"], device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(s["B"], s["K"], s["Dv"], device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.randint(1, s["K"] + 1, (s["B"],), device="cuda", generator=g)
    return module, q.requires_grad_(requires_grad), k, lens


def additive_work(train: bool) -> tuple[float, float]:
    s = ADD
    pairs = s["B"] * s["Q"] * s["K"]
    # tanh features: one add, one tanh and one multiply-add per (pair, a); context GEMM.
    flops = pairs * s["A"] * 3 + 2 * pairs * s["Dv"]
    bytes_ = 2 * (s["B"] * (s["Q"] + s["K"]) * (s["A"] + s["Dv"]) + pairs)
    return (flops * 3, bytes_ * 2) if train else (flops, bytes_)


@pytest.mark.parametrize("impl", ["eager", "cuda", "triton"])
def test_additive_forward(benchmark, ceilings, impl):
    s = ADD
    benchmark.group = f"additive-bf16-B{s['B']}-Q{s['Q']}-K{s['K']}-A{s['A']}-Dv{s['Dv']}"
    benchmark.extra_info.update(impl=impl, baseline="eager", device=torch.cuda.get_device_name())
    backend = "reference" if impl == "eager" else require(impl, "additive_attention")
    module, q, k, lens = additive_case(backend)
    base, *_ = additive_case("reference")
    with torch.inference_mode():
        torch.testing.assert_close(module(q, k, k, lens).float(), base(q, k, k, lens).float(),
                                   atol=AGREE_ATOL[torch.bfloat16], rtol=0)
        record_work(benchmark, ceilings, *additive_work(False), torch.bfloat16)
        timed(benchmark, lambda: module(q, k, k, lens), rounds=30)


@pytest.mark.parametrize("impl", ["eager", "cuda", "triton"])
def test_additive_train(benchmark, ceilings, impl):
    s = ADD
    benchmark.group = f"additive-bf16-B{s['B']}-Q{s['Q']}-K{s['K']}-A{s['A']}-Dv{s['Dv']}-train"
    benchmark.extra_info.update(impl=impl, baseline="eager", device=torch.cuda.get_device_name())
    backend = "reference" if impl == "eager" else require(impl, "additive_attention")
    module, q, k, lens = additive_case(backend, requires_grad=True)
    record_work(benchmark, ceilings, *additive_work(True), torch.bfloat16)

    def step():
        module.zero_grad(set_to_none=True)
        q.grad = None
        module(q, k, k, lens).float().sum().backward()
    timed(benchmark, step, rounds=20)


# ---------------------------------------------------------------------------------
# SDPA with a key-padding mask: B=16, H=16, Q=K=1024, D=64, bf16
# ---------------------------------------------------------------------------------

SD = dict(B=16, H=16, T=1024, D=64)


def sdpa_case(requires_grad: bool = False):
    B, H, T_, D = SD["B"], SD["H"], SD["T"], SD["D"]
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, H, T_, D, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_(requires_grad) for _ in range(3))
    lens = torch.randint(1, T_ + 1, (B,), device="cuda", generator=g)
    mask = (torch.arange(T_, device="cuda") < lens[:, None]).view(B, 1, 1, T_)
    return q, k, v, mask, lens


def sdpa_fn(impl: str):
    if impl == "torch_sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    if impl == "flash_nomask":
        def flash(q, k, v, m):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return flash
    backend = require(impl, "scaled_dot_product_attention")
    return lambda q, k, v, m: functional.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                                      backend=backend)


def sdpa_work(lens: torch.Tensor, train: bool) -> tuple[float, float]:
    B, H, T_, D = SD["B"], SD["H"], SD["T"], SD["D"]
    # FLOPs over the keys a row attends to (what a masked kernel must do; F.sdpa's
    # flash backend without a mask does all T).
    flops = 4 * H * T_ * D * float(lens.sum())
    bytes_ = 2 * 4 * B * H * T_ * D
    return (flops * 3.5, bytes_ * 2.5) if train else (flops, bytes_)


@pytest.mark.parametrize("impl", ["torch_sdpa", "cuda", "triton", "flash_nomask"])
def test_sdpa_forward(benchmark, ceilings, impl):
    benchmark.group = f"sdpa-keypad-bf16-B{SD['B']}-H{SD['H']}-T{SD['T']}-D{SD['D']}"
    benchmark.extra_info.update(impl=impl, baseline="torch_sdpa",
                                device=torch.cuda.get_device_name())
    q, k, v, mask, lens = sdpa_case()
    fn = sdpa_fn(impl)
    with torch.inference_mode():
        if impl != "flash_nomask":
            got, ref = fn(q, k, v, mask).float(), reference.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask)
            assert (got - ref).norm() / ref.norm() < 1e-2
        record_work(benchmark, ceilings, *sdpa_work(lens, False), torch.bfloat16)
        timed(benchmark, lambda: fn(q, k, v, mask), rounds=30)


@pytest.mark.parametrize("impl", ["torch_sdpa", "cuda", "triton", "flash_nomask"])
def test_sdpa_train(benchmark, ceilings, impl):
    benchmark.group = f"sdpa-keypad-bf16-B{SD['B']}-H{SD['H']}-T{SD['T']}-D{SD['D']}-train"
    benchmark.extra_info.update(impl=impl, baseline="torch_sdpa",
                                device=torch.cuda.get_device_name())
    q, k, v, mask, lens = sdpa_case(requires_grad=True)
    fn = sdpa_fn(impl)
    go = torch.randn_like(q)
    record_work(benchmark, ceilings, *sdpa_work(lens, True), torch.bfloat16)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, mask).backward(go)
    timed(benchmark, step, rounds=20)

