"""Elman RNN latency: eager torch.nn.RNN vs seqfuse fused vs onnxruntime on the exported
layer (ONNX RNN node), same weights, same work in each group. CPU float32, 2 threads.

Groups: rnn-inference-B1-T64-H128-uni, rnn-inference-B64-T256-H256-bi, and a training
step rnn-train-step-B32-T128-H128-bi.
"""
import pytest
import torch
from conftest import THREADS, bench_inference, shape_id as _id

from seqfuse.nn import convert

INFERENCE_SHAPES = [(1, 64, 128, False), (64, 256, 256, True)]  # (B, T, I=H, bidirectional)



def _pair(H, **kw):
    torch.manual_seed(0)
    eager = torch.nn.RNN(H, H, **kw)
    fused = convert(torch.nn.RNN(H, H, **kw))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", ["eager", "seqfuse", "onnxruntime"])
def test_rnn_inference(benchmark, shape, impl):
    B, T, H, bi = shape
    eager, fused = _pair(H, bidirectional=bi)
    bench_inference(benchmark, "rnn", impl, eager, fused, torch.randn(T, B, H))


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_rnn_training_step(benchmark, impl):
    eager, fused = _pair(128, bidirectional=True)
    model = eager if impl == "eager" else fused
    x = torch.randn(128, 32, 128, requires_grad=True)
    benchmark.group = "rnn-train-step-B32-T128-H128-bi"
    benchmark.extra_info.update(impl=impl, shape="B32-T128-H128-bi", threads=THREADS)

    def step():
        model.zero_grad(set_to_none=True)
        y, h = model(x)
        (y.sum() + h.sum()).backward()
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
