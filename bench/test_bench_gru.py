"""GRU latency: eager torch.nn.GRU vs seqfuse fused vs onnxruntime on the exported
layer, same weights, same work in each group. CPU float32, 2 threads.

Groups:
  gru-inference-B1-T64-H128-uni, gru-inference-B64-T256-H256-bi: one layer, padded input.
  gru2-packed-*: the 2-layer bidirectional GRU over 32 sequences of lengths uniform in
  [5, 128] (I=H=128): eager runs it on pack_padded_sequence (as users write it), seqfuse
  on the padded batch with lengths=; inference and a training step.
"""
import pytest
import torch
from conftest import THREADS, bench_inference, shape_id as _id
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqfuse.nn import convert

INFERENCE_SHAPES = [(1, 64, 128, False), (64, 256, 256, True)]  # (B, T, I=H, bidirectional)



def _pair(H, **kw):
    torch.manual_seed(0)
    eager = torch.nn.GRU(H, H, **kw)
    fused = convert(torch.nn.GRU(H, H, **kw))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=_id)
@pytest.mark.parametrize("impl", ["eager", "seqfuse", "onnxruntime"])
def test_gru_inference(benchmark, shape, impl):
    B, T, H, bi = shape
    eager, fused = _pair(H, bidirectional=bi)
    bench_inference(benchmark, "gru", impl, eager, fused, torch.randn(T, B, H))


def _packed_batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 129, (32,), generator=g)
    x = torch.randn(int(lengths.max()), 32, 128, generator=g)
    return x, lengths


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_gru2_packed_inference(benchmark, impl):
    eager, fused = _pair(128, num_layers=2, bidirectional=True)
    x, lengths = _packed_batch()
    benchmark.group = "gru2-packed-inference-B32-T5..128-H128-bi"
    benchmark.extra_info.update(impl=impl, shape="B32-T5..128-H128-bi-2layers", threads=THREADS)

    def run_eager():
        y, h = eager(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(y, total_length=x.shape[0])[0], h

    def run_fused():
        return fused(x, lengths=lengths)
    fn = run_eager if impl == "eager" else run_fused
    with torch.inference_mode():
        torch.testing.assert_close(fn()[0], run_eager()[0], atol=1e-5, rtol=0)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("impl", ["eager", "seqfuse"])
def test_gru2_packed_training_step(benchmark, impl):
    eager, fused = _pair(128, num_layers=2, bidirectional=True)
    x, lengths = _packed_batch()
    x.requires_grad_()
    benchmark.group = "gru2-packed-train-step-B32-T5..128-H128-bi"
    benchmark.extra_info.update(impl=impl, shape="B32-T5..128-H128-bi-2layers", threads=THREADS)

    def step():
        model = eager if impl == "eager" else fused
        model.zero_grad(set_to_none=True)
        if impl == "eager":
            y, h = eager(pack_padded_sequence(x, lengths, enforce_sorted=False))
            y = y.data
        else:
            y, h = fused(x, lengths=lengths)
        (y.sum() + h.sum()).backward()
    benchmark.pedantic(step, rounds=8, warmup_rounds=2, iterations=1)
