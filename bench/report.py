"""Print a pytest-benchmark JSON as one table per group, with speed-ups over the group's
baseline: eager PyTorch, or the impl a benchmark names in extra_info["baseline"].

    python bench/report.py bench/results/latest.json [--markdown]
"""
import json
import sys
from collections import defaultdict


def main(path: str, markdown: bool = False) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    info = data["machine_info"]
    print(f"# {info.get('cpu', {}).get('brand_raw', '?')}, torch {info.get('torch')}, "
          f"{info.get('threads')} threads; medians in ms; ratio = baseline median / median\n")
    for group, rows in sorted(groups.items()):
        base_impl = rows[0]["extra_info"].get("baseline", "eager")
        base = next((r["stats"]["median"] for r in rows if r["extra_info"].get("impl") == base_impl), None)
        print(f"## {group}" if markdown else group)
        # GPU benchmarks record their work and floor (bench/test_bench_gpu.py).
        work = "flops" in rows[0]["extra_info"]
        if markdown:
            extra = " TFLOP/s | TB/s | floor ms |" if work else ""
            print(f"| impl | median ms | IQR ms | vs {base_impl} |{extra}\n"
                  f"|---|---|---|---|{'---|---|---|' if work else ''}")
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            med, iqr = 1e3 * r["stats"]["median"], 1e3 * r["stats"]["iqr"]
            ratio = f"{base / r['stats']['median']:.2f}x" if base else "-"
            impl = r["extra_info"].get("impl")
            ex = r["extra_info"]
            rates = ((ex["flops"] / r["stats"]["median"] / 1e12, ex["bytes"] / r["stats"]["median"] / 1e12,
                      ex["floor_ms"]) if work else None)
            if markdown:
                tail = f" {rates[0]:.1f} | {rates[1]:.2f} | {rates[2]:.3f} |" if work else ""
                print(f"| {impl} | {med:.3f} | {iqr:.3f} | {ratio} |{tail}")
            else:
                tail = (f"  {rates[0]:6.1f} TFLOP/s {rates[1]:5.2f} TB/s  floor {rates[2]:.3f} ms"
                        if work else "")
                print(f"  {impl:<12} {med:>10.3f} ms  (IQR {iqr:.3f})  {ratio:>7} vs {base_impl}{tail}")
        print()


if __name__ == "__main__":
    main(sys.argv[1], "--markdown" in sys.argv)
