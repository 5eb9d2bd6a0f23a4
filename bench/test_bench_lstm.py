"""LSTM latency: eager torch.nn.LSTM vs seqfuse fused vs onnxruntime on the exported
layer, same weights, same shape in each group. CPU float32, 2 threads.

    make bench     (or: pytest bench --benchmark-only)
"""
import pytest
import torch
from conftest import THREADS, bench_inference, shape_id as _id

from seqfuse.nn import convert

# (B, T, I=H, bidirectional)
INFERENCE_SHAPES = [(1, 64, 128, False), (32, 128, 128, True), (64, 256, 256, True)]
TRAIN_SHAPES = [(32, 128, 128, True)]



def _models(shape):
    B, T, H, bi = shape
    torch.manual_seed(0)
    eager = torch.nn.LSTM(H, H, bidirectional=bi)
    fused = convert(torch.nn.LSTM(H, H, bidirectional=bi))
    fused.load_state_dict(eager.state_dict())
    return eager, fused, torch.randn(T, B, H)


@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", ["eager", "seqfuse", "onnxruntime"])
def test_lstm_inference(benchmark, shape, impl):
    eager, fused, x = _models(shape)
    bench_inference(benchmark, "lstm", impl, eager, fused, x)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_lstm_training_step(benchmark, shape, impl):
    eager, fused, x = _models(shape)
    model = eager if impl == "eager" else fused
    benchmark.group = f"lstm-train-step-{_id(shape)}"
    benchmark.extra_info.update(impl=impl, shape=_id(shape), threads=THREADS)
    x = x.requires_grad_()

    def step():
        model.zero_grad(set_to_none=True)
        y, (h, c) = model(x)
        (y.sum() + h.sum()).backward()
    benchmark.pedantic(step, rounds=15, warmup_rounds=2, iterations=1)
