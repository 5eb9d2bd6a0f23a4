"""Elman RNN latency: eager torch.nn.RNN vs seqfuse fused vs onnxruntime on the exported
layer (ONNX RNN node), same weights, same work in each group. CPU float32, 2 threads.

Groups: rnn-inference-B1-T64-H128-uni, rnn-inference-B64-T256-H256-bi, and a training
step rnn-train-step-B32-T128-H128-bi.
"""
import pytest
import torch
from conftest import THREADS, onnx_session

from seqfuse.nn import convert

INFERENCE_SHAPES = [(1, 64, 128, False), (64, 256, 256, True)]  # (B, T, I=H, bidirectional)


def _id(shape):
    B, T, H, bi = shape
    return f"B{B}-T{T}-H{H}-{'bi' if bi else 'uni'}"


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
    x = torch.randn(T, B, H)
    benchmark.group = f"rnn-inference-{_id(shape)}"
    benchmark.extra_info.update(impl=impl, shape=_id(shape), threads=THREADS)
    if impl == "onnxruntime":
        sess = onnx_session(fused, x)
        feeds = {"x": x.numpy()}
        y = torch.from_numpy(sess.run(None, feeds)[0])
        fn = lambda: sess.run(None, feeds)  # noqa: E731
    else:
        model = eager if impl == "eager" else fused
        with torch.inference_mode():
            y = model(x)[0]

        def fn():
            with torch.inference_mode():
                return model(x)
    with torch.inference_mode():
        torch.testing.assert_close(y, eager(x)[0], atol=1e-5, rtol=0)  # same work, same answer
    benchmark.pedantic(fn, rounds=max(5, 400 // B), warmup_rounds=3, iterations=1)


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
