"""A/B timing of the CPU SDPA forward + backward between two builds of seqfuse, each in
its own process (RELIABILITY.md's cost of the backward's row recompute). Build the other
revision in a worktree, then alternate:

    git worktree add /tmp/ab_old <rev> && (cd /tmp/ab_old && python setup.py -q build_ext --inplace)
    for i in 1 2 3; do PYTHONPATH=/tmp/ab_old/py_src python bench/ab_sdpa_backward.py
                       PYTHONPATH=py_src python bench/ab_sdpa_backward.py; done

Each run prints its tree and the median ms per step at B8 H4 D64, key padding, 2 threads.
"""
import time

import torch

import seqfuse
from seqfuse import ops


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    res = []
    for B, H, T, D in ((8, 4, 64, 64), (8, 4, 256, 64), (4, 4, 1024, 64)):
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        lens = torch.randint(T // 2, T + 1, (B,))
        g = torch.randn(B, H, T, D)

        def step():
            o = ops.scaled_dot_product_attention(q, k, v, valid_lens=lens)
            torch.autograd.grad(o, (q, k, v), g)
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        step()
        n = max(3, int(0.5 / max(1e-4, time.perf_counter() - t0)))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        res.append(f"T{T}:{ts[len(ts) // 2] * 1e3:.3f}ms")
    print(seqfuse.__file__.split("/py_src")[0], " ".join(res))


if __name__ == "__main__":
    main()
