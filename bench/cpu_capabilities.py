"""The same ops on each CPU capability this machine runs (issue 24, run-time dispatch):
seqfuse.set_cpu_capability() switches the kernels in one process, and each capability's
calls run in their own block. Medians of `--repeat` calls in ms, 2 threads, and the speed-up
over the DEFAULT kernels (compiled with no ISA flags). Prints a markdown table.

    .venv/bin/python bench/cpu_capabilities.py [--repeat 30]
"""
from __future__ import annotations

import argparse
import platform

import torch

import seqfuse
from seqfuse import ops
from seqfuse.latency import median_ms


def cases():
    torch.manual_seed(0)
    out = []

    def layer(name, family, B, T, H, bi, dtype=torch.float32, train=False):
        m = seqfuse.nn.convert(getattr(torch.nn, family)(H, H, bidirectional=bi)).to(dtype)
        x = torch.randn(T, B, H, dtype=dtype)
        if train:
            m.train()
            x.requires_grad_()

            def step():
                y, _ = m(x)
                y.sum().backward()
            out.append((name, step))
        else:
            m.eval()

            def infer():
                with torch.inference_mode():
                    m(x)
            out.append((name, infer))

    layer("LSTM B32 T64 H256 fp32", "LSTM", 32, 64, 256, False)
    layer("BiGRU B32 T128 H128 fp32", "GRU", 32, 128, 128, True)
    layer("BiLSTM B8 T64 H128 fp32 train step", "LSTM", 8, 64, 128, True, train=True)
    layer("LSTM B32 T64 H256 bf16", "LSTM", 32, 64, 256, False, dtype=torch.bfloat16)
    q, k, v = (torch.randn(32, 8, 256, 64) for _ in range(3))
    lens = torch.randint(1, 257, (32,))
    out.append(("SDPA B32 H8 T256 D64 key padding fp32",
                lambda: ops.scaled_dot_product_attention(q, k, v, valid_lens=lens)))
    qa, ka, w, va = torch.randn(32, 32, 128), torch.randn(32, 64, 128), torch.randn(128), torch.randn(32, 64, 128)
    la = torch.randint(1, 65, (32,))
    out.append(("additive attention B32 Q32 K64 A128 fp32",
                lambda: ops.additive_attention(qa, ka, w, va, la)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    caps = seqfuse.cpu_capabilities()
    work = cases()
    ms = {}
    previous = seqfuse.cpu_capability()
    for cap in caps:  # one block per capability
        seqfuse.set_cpu_capability(cap)
        for name, fn in work:
            ms[cap, name] = median_ms(fn, repeat=args.repeat, warmup=3)
    seqfuse.set_cpu_capability(previous)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat} calls, ms (speed-up over default)\n")
    print("| case | " + " | ".join(caps) + " |")
    print("|---|" + "---|" * len(caps))
    for name, _ in work:
        base = ms["default", name]
        cells = [f"{ms[c, name]:.2f} ({base / ms[c, name]:.2f}x)" for c in caps]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
