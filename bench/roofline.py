"""Where the LSTM speed targets sit against this machine's limits (CPU, float32).

    python bench/roofline.py            (2 threads, as the benchmarks)

Prints: the sgemm rate torch reaches (the compute ceiling), the fused layer's rate at the
benchmark shapes (multiply-adds of input projection + recurrence), and at batch 1 the
cost split into a fixed part (T=1) and a per-step part, with the bytes of recurrent
weights each core streams per step.
"""
import statistics
import time

import torch

import seqfuse  # noqa: F401  (registers torch.ops.seqfuse)

THREADS = 2


def median_s(fn, rounds, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_call(T, B, H, D):
    x = torch.randn(T, B, H)
    w_ih, w_hh = torch.randn(D, 4 * H, H) * 0.1, torch.randn(D, 4 * H, H) * 0.1
    b, h0 = torch.randn(D, 4 * H), torch.zeros(D, B, H)
    return lambda: torch.ops.seqfuse.lstm_layer(x, w_ih, w_hh, b, h0, h0, None, False)


def main():
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} threads, float32, medians")
    a, w = torch.randn(4096, 256), torch.randn(256, 2048)
    out = torch.empty(4096, 2048)
    t = median_s(lambda: torch.mm(a, w, out=out), 20)
    print(f"sgemm 4096x256x2048 (torch.mm): {2 * a.numel() * w.shape[1] / t / 1e9:6.1f} GFLOP/s")
    with torch.no_grad():
        for B, T, H, D in [(32, 128, 128, 2), (64, 256, 256, 2)]:
            t = median_s(layer_call(T, B, H, D), 10 if B == 32 else 3)
            flops = 2 * T * B * D * 4 * H * (H + H)
            print(f"seqfuse lstm_layer B={B} T={T} H={H} D={D}: {t * 1e3:7.2f} ms, "
                  f"{flops / t / 1e9:6.1f} GFLOP/s")
        H = 128
        t1 = median_s(layer_call(1, 1, H, 1), 500)
        t64 = median_s(layer_call(64, 1, H, 1), 500)
        step = (t64 - t1) / 63
        per_core = 4 * H * H * 4 / THREADS
        print(f"batch 1, H={H}: fixed {t1 * 1e6:.0f} us (call, weight packing), "
              f"{step * 1e6:.2f} us/step = {per_core / 1024:.0f} KiB of W_hh per core per step "
              f"at {per_core / step / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
