"""int8 dynamic quantisation of LSTM and GRU layers (issue 24): inference latency of
seqfuse float32, seqfuse int8 (seqfuse.quantize_dynamic) and, where torch still has it,
torch.ao.quantization.quantize_dynamic's int8 LSTM/GRU (fbgemm), each in its own block, with
the largest output difference of each int8 model from its float32 one. Medians of
`--repeat` calls in ms, 2 threads. Prints a markdown table.

    .venv/bin/python bench/int8.py [--repeat 20]
"""
from __future__ import annotations

import argparse
import warnings

import torch

import seqfuse
from seqfuse.latency import median_ms

LAYERS = [  # (name, family, B, T, H, bidirectional)
    ("LSTM B32 T64 H256", "LSTM", 32, 64, 256, False),
    ("BiLSTM B32 T64 H128", "LSTM", 32, 64, 128, True),
    ("BiGRU B32 T128 H128", "GRU", 32, 128, 128, True),
    ("LSTM B1 T64 H256", "LSTM", 1, 64, 256, False),
]


def torch_ao_int8(model):
    try:
        from torch.ao.quantization import quantize_dynamic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.LSTM, torch.nn.GRU}, dtype=torch.qint8)
    except Exception:  # removed from torch, or no fbgemm engine
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU kernels: {seqfuse.cpu_capability()}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat} calls, ms (largest |int8 - float32| output difference)\n")
    print("| layer | seqfuse fp32 | seqfuse int8 | torch.ao int8 | seqfuse int8 speed-up over our fp32 |")
    print("|---|---|---|---|---|")
    for name, family, B, T, H, bi in LAYERS:
        torch.manual_seed(0)
        eager = getattr(torch.nn, family)(H, H, bidirectional=bi).eval()
        x = torch.randn(T, B, H)
        impls = {"fp32": seqfuse.nn.convert(eager), "int8": seqfuse.quantize_dynamic(eager),
                 "ao": torch_ao_int8(eager)}
        with torch.inference_mode():
            ref = impls["fp32"](x)[0]
            ms, err = {}, {}
            for key, model in impls.items():  # one block per implementation
                if model is None:
                    continue
                err[key] = (model(x)[0] - ref).abs().max().item()
                ms[key] = median_ms(lambda: model(x), repeat=args.repeat, warmup=3)
        # torch.ao hands back layers it cannot quantise unchanged: exact float32 outputs.
        ao = ("n/a" if "ao" not in ms else f"{ms['ao']:.2f} (float32: not quantised)" if err["ao"] < 1e-5
              else f"{ms['ao']:.2f} ({err['ao']:.3f})")
        print(f"| {name} | {ms['fp32']:.2f} | {ms['int8']:.2f} ({err['int8']:.3f}) | {ao} | "
              f"{ms['fp32'] / ms['int8']:.2f}x |")


if __name__ == "__main__":
    main()
