"""LSTM with a projection (proj_size, issue 23): seqfuse.nn.LSTM against eager torch.nn.LSTM
with the same weights, float32, 2 threads, inference and a training step (forward +
backward), each implementation timed in its own block, medians of 20 calls. Prints a table.

    .venv/bin/python bench/lstm_proj.py
"""
import torch

import seqfuse.nn as snn
from seqfuse.latency import median_ms

CASES = [(1, 64, 128, 256, 128, False), (1, 32, 128, 256, 128, True), (32, 64, 128, 256, 128, True)]


def main():
    torch.set_num_threads(2)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, 2 threads, float32, medians of 20 calls, ms\n")
    print("| B, T, I, H, P, bi | eager infer | seqfuse infer | ratio | eager train | seqfuse train | ratio |")
    print("|---|---|---|---|---|---|---|")
    for B, T, I, H, P, bi in CASES:
        torch.manual_seed(0)
        eager = torch.nn.LSTM(I, H, proj_size=P, bidirectional=bi)
        ours = snn.LSTM(I, H, proj_size=P, bidirectional=bi)
        ours.load_state_dict(eager.state_dict())
        x = torch.randn(T, B, I)
        row = []
        for train in (False, True):
            for m in (eager, ours):
                m.train(train)
                if train:
                    def fn(m=m):
                        out, _ = m(x)
                        out.sum().backward()
                else:
                    def fn(m=m):
                        with torch.inference_mode():
                            m(x)
                row.append(median_ms(fn, repeat=20, warmup=3))
        print(f"| {B}, {T}, {I}, {H}, {P}, {bi} | {row[0]:.3f} | {row[1]:.3f} | {row[0] / row[1]:.2f}x "
              f"| {row[2]:.3f} | {row[3]:.3f} | {row[2] / row[3]:.2f}x |")


if __name__ == "__main__":
    main()
