"""Train every zoo model with its default budget (`seqfuse train NAME`), check each
against its quality target on the held-out test split, and write the table.

  python bench/zoo_quality.py [--out artifacts/zoo] [--only NAME ...] [--report FILE.md]

Checkpoints land in OUT/NAME; the table (metric, target, result, epochs, training time,
samples/s) is printed and written to FILE.md (default bench/results/zoo-quality.md).
Exit status 1 if a model misses its target. Not run in CI (about 10 minutes here)."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from seqfuse.zoo.tasks import ZOO
from seqfuse.zoo.train import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/zoo")
    p.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    p.add_argument("--report", default="bench/results/zoo-quality.md")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = args.only or list(ZOO)
    rows, missed = [], []
    for name in names:
        entry = ZOO[name]
        t0 = time.perf_counter()
        _, result = train(name, Path(args.out) / name, seed=args.seed)
        wall = time.perf_counter() - t0
        metric, op, bound = entry.target
        ok = entry.meets_target(result.test)
        if not ok:
            missed.append(name)
        others = ", ".join(f"{k} {v:.4f}" for k, v in result.test.items() if k != metric)
        shown_bound = f"{bound} ({result.test[bound]:.4f})" if isinstance(bound, str) else f"{bound}"
        speed = sum(h["samples_per_s"] for h in result.history) / len(result.history)
        rows.append(f"| {name} | {metric} {op} {shown_bound} | **{result.test[metric]:.4f}** "
                    f"{'met' if ok else 'MISSED'} | {others} | {result.best_epoch}/{len(result.history)} | "
                    f"{wall:.0f} s | {speed:.0f} |")
        print(rows[-1], flush=True)
    header = (f"Zoo quality on the test split, default budgets, seed {args.seed}; "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
              f"(`python bench/zoo_quality.py`)\n\n"
              "| model | target | test result | other test metrics | best epoch / epochs | wall (train + eval) | train samples/s |\n"
              "|---|---|---|---|---|---|---|\n")
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(header + "\n".join(rows) + "\n")
    print(f"\nwrote {args.report}" + (f"; missed: {', '.join(missed)}" if missed else "; every target met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
