"""bfloat16 against seqfuse's own float32, at (B, T, I=H) = (64, 256, 256), bidirectional,
inference, for each recurrent family. Eager PyTorch's bfloat16 module is timed beside
them for reference. The ratio in the report is against seqfuse-fp32 (extra_info
"baseline"). CPU, 2 threads.
"""
import pytest
import torch
from conftest import THREADS

from seqfuse.nn import convert

B, T, H = 64, 256, 256
FAMILIES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", ["seqfuse-fp32", "seqfuse-bf16", "eager-bf16"])
def test_bf16_inference(benchmark, family, impl):
    torch.manual_seed(0)
    eager = FAMILIES[family](H, H, bidirectional=True).eval()
    x = torch.randn(T, B, H)
    with torch.inference_mode():
        y32 = eager(x)[0]
    if impl == "eager-bf16":
        model, inp = eager.bfloat16(), x.bfloat16()
    else:
        model = convert(eager)
        model, inp = (model, x) if impl == "seqfuse-fp32" else (model.bfloat16(), x.bfloat16())
    benchmark.group = f"bf16-{family}-inference-B{B}-T{T}-H{H}-bi"
    benchmark.extra_info.update(impl=impl, shape=f"B{B}-T{T}-H{H}-bi", threads=THREADS,
                                baseline="seqfuse-fp32")
    with torch.inference_mode():
        err = (model(inp)[0].float() - y32).abs().max().item()
    benchmark.extra_info["max_abs_err_vs_fp32"] = err
    assert err < (1e-5 if impl == "seqfuse-fp32" else 0.1), err

    def fn():
        with torch.inference_mode():
            return model(inp)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
