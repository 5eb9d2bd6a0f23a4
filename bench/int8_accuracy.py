"""Accuracy of seqfuse.quantize_dynamic on the zoo (issue 24): every trained zoo model with
recurrent layers, evaluated on its real test split in float32 and after int8 dynamic
quantisation of its LSTM/GRU layers, and the difference. Needs the checkpoints of
`make zoo` (bench/zoo_quality.py --out artifacts/zoo). Prints a markdown table and exits
with status 1 if a classifier loses more than 0.5 points of accuracy.

    .venv/bin/python bench/int8_accuracy.py [--zoo artifacts/zoo]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

import seqfuse
from seqfuse.nn import QuantizedGRU, QuantizedLSTM
from seqfuse.zoo.train import checkpoint_data, load_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="artifacts/zoo")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(f"{platform.processor() or platform.machine()}, CPU kernels {seqfuse.cpu_capability()}, "
          f"test splits, float32 against int8 (seqfuse.quantize_dynamic)\n")
    print("| model | metric | float32 | int8 | difference | int8 layers |")
    print("|---|---|---|---|---|---|")
    failed = []
    for ckpt in sorted(p for p in Path(args.zoo).iterdir() if (p / "config.json").is_file()):
        model, name, _ = load_checkpoint(ckpt)
        q = seqfuse.quantize_dynamic(model)
        swapped = sum(isinstance(m, (QuantizedLSTM, QuantizedGRU)) for m in q.modules())
        if not swapped:
            continue  # no recurrent layer (the Transformer classifier)
        entry, ds = checkpoint_data(ckpt)
        kind = entry.kind(ds)
        with torch.inference_mode():
            f32 = kind.evaluate(model, ds.splits["test"])
            i8 = kind.evaluate(q, ds.splits["test"])
        metric = kind.primary
        diff = i8[metric] - f32[metric]
        if metric in ("accuracy", "token_accuracy") and diff < -0.005:
            failed.append(name)
        print(f"| {name} | {metric} | {f32[metric]:.4f} | {i8[metric]:.4f} | {diff:+.4f} | {swapped} |", flush=True)
    if failed:
        print(f"\nlost more than 0.5 points: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
