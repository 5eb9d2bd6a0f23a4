"""Export every trained zoo checkpoint (make zoo writes them to artifacts/zoo) in every
format with every variant and a Triton repository, and write the figures as a markdown
table: parity per format, variant metrics on the real test split, latency, file sizes.

    python bench/zoo_export.py [--zoo artifacts/zoo] [--out artifacts/zoo-export]
                               [--md bench/results/zoo-export.md]
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from seqfuse.zoo.export import export_checkpoint
from seqfuse.zoo.tasks import ZOO

VARIANTS = ("ort-opt", "fp16", "int8")


def _fmt_metric(v: dict, metric: str) -> str:
    return f"{v['metrics'][metric]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="artifacts/zoo")
    ap.add_argument("--out", default="artifacts/zoo-export")
    ap.add_argument("--md", default="bench/results/zoo-export.md")
    ap.add_argument("--models", default=",".join(ZOO))
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    out = Path(args.out)
    parity, variants, sizes = [], [], []
    for name in args.models.split(","):
        ckpt = Path(args.zoo) / name
        if not (ckpt / "config.json").is_file():
            print(f"{name}: no checkpoint in {ckpt} (run make zoo); skipped")
            continue
        t0 = time.perf_counter()
        r = export_checkpoint(ckpt, out / name, variants=VARIANTS, triton_repo=out / "triton")
        seconds = time.perf_counter() - t0
        m = r.manifest
        worst = r.parity.worst()
        cases = len({(row.part, row.case) for row in r.parity.rows})
        seq = "; ".join(f"{c.identical}/{c.rows} greedy decodes identical" for c in r.parity.sequence_checks)
        parity.append(f"| {name} | {', '.join(m['parts'])} | {cases} | {worst['onnx']:.1e} | "
                      f"{worst['torchscript']:.1e} | {worst['pt2']:.1e} | {seq or '-'} | {seconds:.0f} s |")
        v = m["variants"]
        metric = v["int8"]["metric"]
        row = [name, metric, f"{v['eager']['metrics'][metric]:.4f}", _fmt_metric(v["float32"], metric)]
        for variant in VARIANTS:
            e = v[variant]
            row.append(f"{_fmt_metric(e, metric)} ({e['worse_by_points']:+.2f}{' DEGRADED' if e['degraded'] else ''})")
        variants.append("| " + " | ".join(row) + " |")
        for label in ("b=1", "b=8"):
            lat = []
            for variant in ("float32",) + VARIANTS:
                total = sum(t["median_ms"] for k, t in v[variant]["latency_ms"].items() if k.endswith(label))
                lat.append(f"{total:.3f}")
            variants_lat = " | ".join(lat)
            sizes.append(f"| {name} | {label} | {variants_lat} |")
        files = m["files"]
        size = {s: sum(f["bytes"] for k, f in files.items() if k.endswith(f".{s}.onnx") or
                       (s == "float32" and k.endswith(".onnx") and k.count(".") == 1))
                for s in ("float32",) + VARIANTS}
        sizes[-1] += f" {' / '.join(f'{size[s] / 1024:.0f}' for s in size)} KiB |"
        sizes[-2] += " |"
        print(f"{name}: exported in {seconds:.0f} s, parity worst {worst}, {seq}", flush=True)
    threads = torch.get_num_threads()
    md = [
        "# Zoo export: parity, variants, latency",
        "",
        "`python bench/zoo_export.py` (after `make zoo`): every trained zoo checkpoint exported to ONNX,",
        "TorchScript and torch.export, with the ort-opt, fp16 and int8 variants and a Triton repository.",
        f"onnxruntime CPU, {threads} threads.",
        "",
        "## Parity (max abs difference against eager over every case and output)",
        "",
        "Cases: batch 1, 3, 8 at lengths 1, 9, 16, 32; batch 8 with mixed padding; real held-out batches",
        "of 1, 3, 8 and 64 test examples.",
        "",
        "| model | graphs | cases | onnx | torchscript | pt2 | end to end | export time |",
        "|---|---|---|---|---|---|---|---|",
        *parity,
        "",
        "## Variants on the real test split (metric; worse than float32 by, in points)",
        "",
        "| model | metric | eager | float32 ONNX | ort-opt | fp16 | int8 |",
        "|---|---|---|---|---|---|---|",
        *variants,
        "",
        "## onnxruntime latency (ms, median; sum over graphs, one decoder step) and file sizes",
        "",
        "| model | batch | float32 | ort-opt | fp16 | int8 | sizes f32 / opt / fp16 / int8 |",
        "|---|---|---|---|---|---|---|",
        *sizes,
        "",
    ]
    Path(args.md).write_text("\n".join(md))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
