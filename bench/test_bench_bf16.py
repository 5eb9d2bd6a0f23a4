"""bfloat16 against seqfuse's own float32, at (B, T, I=H) = (64, 256, 256), bidirectional,
inference, for each recurrent family. Eager PyTorch's bfloat16 module is timed beside
them for reference. The ratio in the report is against seqfuse-fp32 (extra_info
"baseline"). CPU, 2 threads.
"""
import pytest
import torch
from conftest import cases, record, timed

from seqfuse.nn import convert

B, T, H = 64, 256, 256
FAMILIES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


@cases(full=[(B, T, H)], quick=[(2, 3, 5)], ids=lambda c: "B{}-T{}-H{}".format(*c))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", ["seqfuse-fp32", "seqfuse-bf16", "eager-bf16"])
def test_bf16_inference(benchmark, family, impl, case):
    B, T, H = case
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
    record(benchmark, f"bf16-{family}-inference-cpu-B{B}-T{T}-H{H}-bi", impl, f"B{B}-T{T}-H{H}-bi",
           batch=B, baseline="seqfuse-fp32")
    with torch.inference_mode():
        err = (model(inp)[0].float() - y32).abs().max().item()
    benchmark.extra_info["max_abs_err_vs_fp32"] = err
    assert err < (1e-5 if impl == "seqfuse-fp32" else 0.1), err

    def fn():
        with torch.inference_mode():
            return model(inp)
    timed(benchmark, fn, rounds=5, warmup=1)
