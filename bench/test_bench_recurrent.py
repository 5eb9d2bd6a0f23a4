"""Recurrent layers (LSTM, GRU, Elman RNN): each group times one layer on one input in
every implementation, same weights, after checking the outputs (or gradients) agree.

Implementations. CPU (float32, THREADS threads): eager torch.nn.{LSTM,GRU,RNN}, seqfuse's
fused C++ kernel, onnxruntime on the layer exported to ONNX (LSTM/GRU/RNN nodes).
GPU (skipped without one): eager = cuDNN, seqfuse-cuda, seqfuse-triton, onnxruntime-cuda.

Cases, (B, T, I=H, direction):
  the shapes of the earlier issues: B1-T64-H128-uni (one request), B32-T128-H128-bi,
  B64-T256-H256-bi; a sequence-length sweep T = 16..1024 at B8-H256-uni and a batch sweep
  B = 1..64 at T128-H256-uni. Training steps (forward + backward of output and final
  state) at the issue shape and at sweep points.
Groups: {family}-inference-{device}-{shape}, {family}-train-step-{device}-{shape}, and the
2-layer bidirectional GRU on a packed batch of uneven lengths (gru2-packed-*).
"""
import time

import pytest
import torch
from conftest import (cases, onnx_session, record, require_backend, require_device,
                      rounds_for, shape_id, sweep, timed)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqfuse

FAMILIES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
IMPLS = {"cpu": ["eager", "seqfuse", "onnxruntime"],
         "cuda": ["eager", "seqfuse-cuda", "seqfuse-triton", "onnxruntime-cuda"]}
DEVICE_IMPLS = [(d, i) for d, impls in IMPLS.items() for i in impls]
SWEEP_H, SWEEP_B, SWEEP_T = 256, 8, 128


def _case(B, T, H, bi, axis=None):
    return (B, T, H, bi, axis)


# (B, T, H, bidirectional, sweep axis or None)
ISSUE_SHAPES = [_case(1, 64, 128, False), _case(32, 128, 128, True), _case(64, 256, 256, True)]
T_SWEEP = [_case(SWEEP_B, T, SWEEP_H, False, "T") for T in (16, 32, 64, 128, 256, 512, 1024)]
B_SWEEP = [_case(B, SWEEP_T, SWEEP_H, False, "B") for B in (1, 32, 64)]   # B8-T128 is in T_SWEEP
INFERENCE = ISSUE_SHAPES + T_SWEEP + B_SWEEP
TRAIN = [_case(32, 128, 128, True)] + [_case(SWEEP_B, T, SWEEP_H, False, "T") for T in (16, 64, 256, 1024)] \
    + [_case(B, SWEEP_T, SWEEP_H, False, "B") for B in (1, 64)]
QUICK = [_case(1, 3, 5, False), _case(2, 4, 6, True, "T")]


def _id(case):
    return shape_id(case[:4])


def _series(family: str, kind: str, device: str, case) -> dict:
    B, T, H, bi, axis = case
    if axis is None:
        return {}
    fixed = f"B{B}" if axis == "T" else f"T{T}"
    return sweep(f"{family}-{kind}-{device}-{fixed}-H{H}-{'bi' if bi else 'uni'}", axis, T if axis == "T" else B)


def _pair(family: str, H: int, device: str, backend: str, **kw):
    """(eager torch.nn layer, seqfuse layer) with the same weights."""
    torch.manual_seed(0)
    eager = FAMILIES[family](H, H, **kw).to(device)
    fused = getattr(seqfuse.nn, family.upper())(H, H, backend=backend, **kw).to(device)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _backend(impl: str, family: str, device: str) -> str:
    if impl == "eager" or impl.startswith("onnxruntime"):
        require_device(device)
        return "native" if seqfuse.ops.has_native_kernel(f"{family}_layer", device) else "reference"
    return require_backend(impl, f"{family}_layer", device)


def _atol(device: str) -> float:
    return 1e-5 if device == "cpu" else 2e-3   # cuDNN vs seqfuse on GPU: TF32-free float32 sums differ more


@cases(full=INFERENCE, quick=QUICK, ids=_id)
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS, ids=[f"{d}-{i}" for d, i in DEVICE_IMPLS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recurrent_inference(benchmark, family, device, impl, case):
    B, T, H, bi, _ = case
    eager, fused = _pair(family, H, device, _backend(impl, family, device), bidirectional=bi)
    x = torch.randn(T, B, H, device=device)
    record(benchmark, f"{family}-inference-{device}-{_id(case)}", impl, _id(case), batch=B, tokens=B * T,
           device=device, **_series(family, "inference", device, case))
    if impl.startswith("onnxruntime"):
        sess = onnx_session(fused.cpu(), x.cpu(), impl)
        feeds = {"x": x.cpu().numpy()}
        y = torch.from_numpy(sess.run(None, feeds)[0]).to(device)

        def fn():
            return sess.run(None, feeds)
    else:
        model = eager if impl == "eager" else fused

        def fn():
            with torch.inference_mode():
                return model(x)
        y = fn()[0]
    with torch.inference_mode():
        torch.testing.assert_close(y, eager(x)[0], atol=_atol(device), rtol=0)
    t0 = time.perf_counter()
    fn()
    timed(benchmark, fn, rounds_for(time.perf_counter() - t0), device)


@cases(full=TRAIN, quick=QUICK, ids=_id)
@pytest.mark.parametrize("device,impl", [(d, i) for d, i in DEVICE_IMPLS if not i.startswith("onnx")],
                         ids=[f"{d}-{i}" for d, i in DEVICE_IMPLS if not i.startswith("onnx")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recurrent_train_step(benchmark, family, device, impl, case):
    B, T, H, bi, _ = case
    eager, fused = _pair(family, H, device, _backend(impl, family, device), bidirectional=bi)
    model = eager if impl == "eager" else fused
    record(benchmark, f"{family}-train-step-{device}-{_id(case)}", impl, _id(case), batch=B, tokens=B * T,
           device=device, **_series(family, "train-step", device, case))
    x = torch.randn(T, B, H, device=device, requires_grad=True)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        y, h = model(x)
        (y.sum() + (h[0] if isinstance(h, tuple) else h).sum()).backward()
        return x.grad

    got = step().clone()
    eager.zero_grad(set_to_none=True)
    x.grad = None
    y, h = eager(x)
    (y.sum() + (h[0] if isinstance(h, tuple) else h).sum()).backward()
    torch.testing.assert_close(got, x.grad, atol=10 * _atol(device), rtol=1e-4)
    t0 = time.perf_counter()
    step()
    timed(benchmark, step, rounds_for(time.perf_counter() - t0), device, warmup=1)


def _packed_batch(quick: bool):
    g = torch.Generator().manual_seed(1)
    B, T, H = (3, 6, 5) if quick else (32, 128, 128)
    lengths = torch.randint(1 if quick else 5, T + 1, (B,), generator=g)
    lengths[0] = T
    return torch.randn(T, B, H, generator=g), lengths


@pytest.mark.parametrize("mode", ["inference", "train-step"])
@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_gru2_packed(benchmark, impl, mode, quick):
    """The 2-layer bidirectional GRU over a batch of uneven lengths: eager runs it on
    pack_padded_sequence (as users write it), seqfuse on the padded batch with lengths=."""
    x, lengths = _packed_batch(quick)
    T, B, H = x.shape
    eager, fused = _pair("gru", H, "cpu", _backend(impl, "gru", "cpu"), num_layers=2, bidirectional=True)
    shape = f"B{B}-T{int(lengths.min())}..{T}-H{H}-bi-2layers"
    record(benchmark, f"gru2-packed-{mode}-cpu-{shape}", impl, shape, batch=B, tokens=int(lengths.sum()))

    def run(model):
        if model is eager:
            y, h = eager(pack_padded_sequence(x, lengths, enforce_sorted=False))
            return pad_packed_sequence(y, total_length=T)[0], h
        return fused(x, lengths=lengths)
    model = eager if impl == "eager" else fused
    if mode == "inference":
        with torch.inference_mode():
            torch.testing.assert_close(run(model)[0], run(eager)[0], atol=1e-5, rtol=0)

        def fn():
            with torch.inference_mode():
                return run(model)
        timed(benchmark, fn, rounds=10)
        return
    x.requires_grad_()

    def step(m):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y, h = run(m)
        (y.sum() + h.sum()).backward()
        return x.grad
    torch.testing.assert_close(step(model).clone(), step(eager).clone(), atol=1e-4, rtol=1e-4)
    timed(benchmark, lambda: step(model), rounds=8, warmup=1)
