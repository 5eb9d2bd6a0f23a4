"""bfloat16 training (issue 24): one training step (forward, backward of the summed output)
of a recurrent layer with float32 master weights, in float32 and under
torch.autocast("cpu", dtype=torch.bfloat16), for seqfuse and for eager PyTorch, each in its
own block. Medians of `--repeat` steps in ms, 2 threads. Prints a markdown table.

    .venv/bin/python bench/bf16_training.py [--repeat 20]
"""
from __future__ import annotations

import argparse
import contextlib

import torch

import seqfuse
from seqfuse.latency import median_ms

LAYERS = [  # (name, family, B, T, H, bidirectional)
    ("LSTM B32 T64 H256", "LSTM", 32, 64, 256, False),
    ("BiLSTM B16 T64 H128", "LSTM", 16, 64, 128, True),
    ("BiGRU B32 T128 H128", "GRU", 32, 128, 128, True),
    ("RNN B32 T64 H256", "RNN", 32, 64, 256, False),
]


def step_fn(model, x, bf16):
    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            y, _ = model(x)
        y.float().sum().backward()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU kernels: {seqfuse.cpu_capability()}, {torch.get_num_threads()} threads, "
          f"median of {args.repeat} training steps, ms\n")
    print("| layer | eager fp32 | eager bf16 | seqfuse fp32 | seqfuse bf16 | seqfuse: bf16 speed-up over fp32 | seqfuse bf16 speed-up over eager bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, family, B, T, H, bi in LAYERS:
        torch.manual_seed(0)
        eager = getattr(torch.nn, family)(H, H, bidirectional=bi)
        ours = seqfuse.nn.convert(getattr(torch.nn, family)(H, H, bidirectional=bi))
        x = torch.randn(T, B, H, requires_grad=True)
        ms = {}
        for label, model in (("eager", eager), ("seqfuse", ours)):  # one block per implementation
            for bf16 in (False, True):
                ms[label, bf16] = median_ms(step_fn(model, x, bf16), repeat=args.repeat, warmup=3)
        print(f"| {name} | {ms['eager', False]:.2f} | {ms['eager', True]:.2f} | {ms['seqfuse', False]:.2f} | "
              f"{ms['seqfuse', True]:.2f} | {ms['seqfuse', False] / ms['seqfuse', True]:.2f}x | "
              f"{ms['eager', True] / ms['seqfuse', True]:.2f}x |")


if __name__ == "__main__":
    main()
