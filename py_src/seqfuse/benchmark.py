"""Benchmark reports: turn a pytest-benchmark JSON file into Markdown, PNG plots and a
comparison with a previous run.

The input is the file pytest-benchmark (5.x) writes with ``--benchmark-json=FILE
--benchmark-save-data``: ``machine_info`` (plus the keys bench/conftest.py adds: torch,
onnxruntime, seqfuse, threads, machine_id), ``commit_info``, ``datetime`` and one entry per
benchmark with its ``group``, ``fullname``, ``stats`` (seconds; ``stats["data"]`` holds the
per-round times when the data was saved) and ``extra_info``. Our benchmarks write in
``extra_info``:

* ``impl`` (required): the implementation timed ("eager", "seqfuse", "onnxruntime", ...);
* ``baseline``: the impl of the same group that speed-ups are computed against
  (default "eager"); speed-up = baseline median / median;
* ``shape``, ``device``, ``threads``, ``versions``: descriptions shown in the report;
* ``batch`` (or ``samples``): sequences per call, for the throughput column;
* ``sweep``: ``{"series", "axis": "T" | "B", "value"}``, one point of a sweep (plotted by
  :func:`plot_latency_vs_length` when the axis is T);
* ``model``: zoo model name (plotted by :func:`plot_speedups`, one panel per batch size);
* ``flops``, ``bytes``, ``floor_ms``: GPU work, shown as TFLOP/s, TB/s and floor ms columns.

Entry points:

* :func:`summarize`: one :class:`Row` per benchmark, grouped, with percentiles, throughput
  and speed-up;
* :func:`markdown_report` / :func:`print_tables`: the report as Markdown / plain text;
* :func:`plot_latency_vs_length`, :func:`plot_speedups`: PNG plots (matplotlib, Agg);
* :func:`compare_runs` / :func:`compare_markdown`: benchmarks that got slower (or faster)
  than in a previous run, matched by their pytest full name;
* :func:`write_report`: report.md and both plots in one folder (every write atomic);
* :func:`machine_id`: a short slug of this machine's CPU, core count and GPU, used to name
  result files.
* :func:`run_suite`: runs bench/ (or some of its :data:`SUITES`) in a pytest subprocess,
  saves the run as bench/results/<machine-id>/<timestamp>.json and writes the report; the
  engine of `seqfuse bench`, `make bench` and `make bench-compare`.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BASELINE = "eager"

# Implementations in the order tables and legends list them when they tie / plots colour
# them; an impl not listed here comes after these, alphabetically.
IMPL_ORDER = ("eager", "torch.nn", "seqfuse", "seqfuse-fp32", "seqfuse-cuda", "seqfuse-triton",
              "torchscript", "torch.compile", "onnxruntime", "onnxruntime-cuda", "ort-opt",
              "ort-int8", "torch_sdpa", "unfused")

HOW_TO_READ = """\
## How to read this report

- Every group times the same work (same inputs, same weights) in each implementation; every
  implementation's output was checked against the baseline's before it was timed.
- Implementations:
  - **eager**: PyTorch itself (torch.nn.LSTM/GRU/RNN, attention in eager ops, zoo models built
    from torch.nn layers; cuDNN on a GPU);
  - **seqfuse**: seqfuse's fused kernels (C++ on CPU; seqfuse-cuda / seqfuse-triton on a GPU);
  - **torchscript**: the model traced to TorchScript (on seqfuse kernels);
  - **torch.compile**: torch.compile (inductor) of the seqfuse model;
  - **onnxruntime**: the exported ONNX model in onnxruntime (CPUExecutionProvider;
    onnxruntime-cuda: CUDAExecutionProvider);
  - **ort-opt**: the ONNX model with onnxruntime's extended graph optimisations saved offline;
  - **ort-int8**: dynamically quantised int8 weights;
  - **torch_sdpa** / **unfused**: torch's F.scaled_dot_product_attention and the classic
    bmm-softmax-bmm.
- Threads: CPU runs use the thread count in the header for torch (torch.set_num_threads) and
  onnxruntime (intra_op_num_threads), one inter-op thread. GPU times are device times (each
  round ends with a synchronize).
- Statistics: median, p90 and p99 of the per-round times (one call per round, after warm-up
  rounds); throughput = sequences per call / median. "vs baseline" = baseline median / this
  median: above 1x is faster than the baseline (eager PyTorch unless the group names another).
- Noise: medians on a shared machine vary by several percent between runs; compare runs with
  `make bench-compare`, which flags groups more than 10% slower.
"""


# ----------------------------------------------------------------------------------------
# Loading and machine identity


def _slug(text: str) -> str:
    """Lower-case `[a-z0-9-]` slug of a CPU/GPU name, without trademark and marketing noise."""
    s = text.lower()
    s = re.sub(r"\((r|tm|c)\)|®|™", " ", s)
    s = re.sub(r"@.*$", " ", s)   # "... CPU @ 2.50GHz": the clock is not part of the model
    s = re.sub(r"\b(processor|cpu|with radeon graphics|\d+-core)\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s)
    return re.sub(r"-+", "-", s).strip("-")


def machine_id() -> str:
    """Short identifier of this machine: CPU brand slug, core count, and the GPU's name when
    CUDA is available, e.g. "amd-epyc-2c" or "amd-epyc-7763-16c-nvidia-h100-80gb-hbm3"."""
    brand = ""
    try:
        import cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw", "")
    except Exception:   # cpuinfo probes the machine in ways that can fail (containers, VMs)
        brand = ""
    cpu = _slug(brand) or _slug(platform.processor()) or "cpu"
    ident = f"{cpu}-{os.cpu_count() or 1}c"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = _slug(torch.cuda.get_device_name())
            if gpu:
                ident = f"{ident}-{gpu}"
    except ImportError:
        pass
    return re.sub(r"-+", "-", ident)


def load_run(path: str | os.PathLike) -> dict:
    """The pytest-benchmark JSON file at `path`, as a dict. Raises FileNotFoundError when it
    is missing and ValueError when it is not a pytest-benchmark JSON file."""
    with open(path, encoding="utf-8") as f:
        try:
            run = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a pytest-benchmark JSON file (invalid JSON: {e})") from e
    if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
        raise ValueError(f"{path} is not a pytest-benchmark JSON file "
                         "(expected an object with a 'benchmarks' list; write one with "
                         "pytest --benchmark-json=FILE --benchmark-save-data)")
    return run


def _write_atomic(path: Path, write) -> Path:
    """Calls write(temporary path) for a file in path's folder, then renames it to `path`, so
    that readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would make reports private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_text_atomic(path: Path, text: str) -> Path:
    return _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------
# Summaries


@dataclass
class Row:
    """One benchmark of a group, with the figures the report shows (times in seconds)."""

    group: str
    impl: str
    fullname: str
    median_s: float
    p90_s: float | None
    p99_s: float | None
    iqr_s: float
    rounds: int
    throughput: float | None   # sequences per second: batch (or samples) / median
    speedup: float | None      # baseline median / median; None when the group has no baseline row
    baseline: str
    shape: str = ""
    device: str = ""
    extra: dict = field(default_factory=dict)


def _impl(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    return str(extra.get("impl") or (bench.get("params") or {}).get("impl") or bench.get("name", "?"))


def _impl_key(impl: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def _group_baseline(benches: list[dict]) -> str:
    """The impl a group's ratios are computed against: the first `baseline` a benchmark of the
    group names, else eager."""
    for b in benches:
        base = (b.get("extra_info") or {}).get("baseline")
        if base:
            return str(base)
    return DEFAULT_BASELINE


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def summarize(run: dict) -> dict[str, list[Row]]:
    """Group name -> its rows sorted by median (fastest first); groups in natural order of
    their names (B8 before B32)."""
    by_group: dict[str, list[dict]] = {}
    for b in run["benchmarks"]:
        by_group.setdefault(str(b.get("group") or "(no group)"), []).append(b)
    out: dict[str, list[Row]] = {}
    for group in sorted(by_group, key=_natural_key):
        benches = by_group[group]
        baseline = _group_baseline(benches)
        base_median = next((b["stats"]["median"] for b in benches if _impl(b) == baseline), None)
        rows = []
        for b in benches:
            stats, extra = b["stats"], dict(b.get("extra_info") or {})
            median = float(stats["median"])
            data = stats.get("data")
            if isinstance(data, list) and data:
                p90, p99 = (float(p) for p in np.percentile(np.asarray(data, dtype=float), [90, 99]))
            else:
                p90 = p99 = None
            per_call = extra["batch"] if extra.get("batch") is not None else extra.get("samples")
            throughput = float(per_call) / median if per_call is not None and median > 0 else None
            speedup = base_median / median if base_median is not None and median > 0 else None
            rows.append(Row(group=group, impl=_impl(b), fullname=str(b.get("fullname", b.get("name", ""))),
                            median_s=median, p90_s=p90, p99_s=p99, iqr_s=float(stats.get("iqr", 0.0)),
                            rounds=int(stats.get("rounds", len(data) if isinstance(data, list) else 0)),
                            throughput=throughput, speedup=speedup, baseline=baseline,
                            shape=str(extra.get("shape", "")), device=str(extra.get("device", "")),
                            extra=extra))
        rows.sort(key=lambda r: (r.median_s, _impl_key(r.impl)))
        out[group] = rows
    return out


# ----------------------------------------------------------------------------------------
# Formatting


def fmt_ms(ms: float | None) -> str:
    """Milliseconds to about three significant digits without scientific notation from
    0.001 ms up: 0.0123, 0.123, 1.23, 12.3, 123, 1234."""
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms == 0:
        return "0"
    if abs(ms) < 1e-3:
        return f"{ms:.3g}"
    rounded = float(f"{ms:.3g}")
    if abs(rounded) >= 100:
        return f"{ms:.0f}"
    decimals = 2 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{decimals}f}"


def fmt_ratio(ratio: float | None) -> str:
    """A speed-up as "2.31x"; "-" when there is none."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def fmt_throughput(per_s: float | None) -> str:
    """Sequences per second: an integer with thousands separators from 100 up, three
    significant digits below (a slow call at batch 1 does 2.5 seq/s, not "2")."""
    if per_s is None:
        return "-"
    return f"{per_s:,.0f}" if per_s >= 100 else fmt_ms(per_s)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _gpu_rates(row: Row) -> tuple[str, str, str]:
    """TFLOP/s, TB/s and floor ms of a GPU benchmark that recorded its work ("-" if not)."""
    ex, med = row.extra, row.median_s
    tflops = f"{ex['flops'] / med / 1e12:.1f}" if "flops" in ex and med > 0 else "-"
    tbs = f"{ex['bytes'] / med / 1e12:.2f}" if "bytes" in ex and med > 0 else "-"
    floor = f"{ex['floor_ms']:.3f}" if "floor_ms" in ex else "-"
    return tflops, tbs, floor


def _threads(run: dict) -> Any:
    info = run.get("machine_info") or {}
    if info.get("threads") is not None:
        return info["threads"]
    found = Counter(b["extra_info"]["threads"] for b in run["benchmarks"]
                    if "threads" in (b.get("extra_info") or {}))
    return found.most_common(1)[0][0] if found else None


def _run_machine_id(run: dict) -> str:
    """The run's machine_id, or one derived from its CPU brand and count (older runs)."""
    info = run.get("machine_info") or {}
    if info.get("machine_id"):
        return str(info["machine_id"])
    cpu = info.get("cpu") or {}
    brand = _slug(str(cpu.get("brand_raw", ""))) or _slug(str(info.get("processor", ""))) or "cpu"
    return f"{brand}-{cpu['count']}c" if cpu.get("count") else brand


def _commit(run: dict) -> str:
    commit = run.get("commit_info") or {}
    if not commit.get("id"):
        return "unknown commit"
    return f"commit {str(commit['id'])[:10]}" + (" (dirty)" if commit.get("dirty") else "")


def machine_line(run: dict) -> str:
    """One line on where and when the run was taken: CPU, machine id, threads, versions,
    date and commit."""
    info = run.get("machine_info") or {}
    brand = (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    parts = [f"**Machine**: {brand} (`{_run_machine_id(run)}`)"]
    threads = _threads(run)
    if threads is not None:
        parts.append(f"{threads} threads")
    if info.get("cpu_capability"):
        parts.append(f"CPU kernels: {info['cpu_capability']}")
    versions = [f"{k} {info[k]}" for k in ("torch", "onnxruntime", "seqfuse") if info.get(k)]
    if versions:
        parts.append(", ".join(versions))
    when = run.get("datetime") or "unknown date"
    return "; ".join(parts) + f". **Run**: {when}, {_commit(run)}."


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary_table(groups: dict[str, list[Row]]) -> str:
    lines = []
    for group, rows in groups.items():
        base = next((r for r in rows if r.impl == r.baseline), None)
        best = rows[0]
        fused = [r for r in rows if r.impl.startswith("seqfuse")]
        if fused and fused[0].speedup is not None:
            vs = fmt_ratio(fused[0].speedup) + (f" ({fused[0].impl})" if fused[0].impl != "seqfuse" else "")
        else:
            vs = "-"
        base_ms = "-"
        if base is not None:
            base_ms = fmt_ms(_ms(base.median_s))
            if base.impl != DEFAULT_BASELINE:
                base_ms += f" ({base.impl})"
        lines.append([group, base_ms,
                      f"{best.impl} ({fmt_ms(_ms(best.median_s))} ms)", vs])
    return _table(["group", "baseline median ms", "best impl", "seqfuse vs baseline"], lines)


def _group_section(group: str, rows: list[Row]) -> str:
    out = [f"## {group}", ""]
    shape = next((r.shape for r in rows if r.shape), "")
    device = next((r.device for r in rows if r.device), "")
    described = [f"work: `{shape}`"] if shape else []
    described += [f"device: {device}"] if device else []
    if described:
        text = "; ".join(described)
        out += [text[0].upper() + text[1:], ""]
    gpu = any("flops" in r.extra for r in rows)
    header = ["impl", "median ms", "p90 ms", "p99 ms", "throughput seq/s", f"vs {rows[0].baseline}"]
    if gpu:
        header += ["TFLOP/s", "TB/s", "floor ms"]
    body = []
    for r in rows:
        cells = [r.impl, fmt_ms(_ms(r.median_s)), fmt_ms(_ms(r.p90_s)), fmt_ms(_ms(r.p99_s)),
                 fmt_throughput(r.throughput), fmt_ratio(r.speedup)]
        body.append(cells + (list(_gpu_rates(r)) if gpu else []))
    out.append(_table(header, body))
    return "\n".join(out)


def markdown_report(run: dict, title: str = "seqfuse latency report") -> str:
    """The whole run as Markdown: how to read it, the machine, a summary table (fastest impl
    and seqfuse's speed-up per group) and one table per group."""
    groups = summarize(run)
    parts = [f"# {title}", "", HOW_TO_READ, machine_line(run), "", "## Summary", ""]
    if groups:
        parts.append(_summary_table(groups))
    else:
        parts.append("The run has no benchmarks.")
    for group, rows in groups.items():
        parts += ["", _group_section(group, rows)]
    return "\n".join(parts) + "\n"


def print_tables(run: dict) -> None:
    """The per-group tables as plain text on stdout (bench/report.py)."""
    info = run.get("machine_info") or {}
    brand = (info.get("cpu") or {}).get("brand_raw", "?")
    print(f"# {brand} ({_run_machine_id(run)}), torch {info.get('torch')}, {_threads(run)} threads; "
          f"{run.get('datetime', '?')}, {_commit(run)}; times in ms; ratio = baseline median / median\n")
    for group, rows in summarize(run).items():
        print(group)
        for r in rows:
            line = (f"  {r.impl:<16} {fmt_ms(_ms(r.median_s)):>8} ms  p90 {fmt_ms(_ms(r.p90_s)):>8}  "
                    f"p99 {fmt_ms(_ms(r.p99_s)):>8}  (IQR {fmt_ms(_ms(r.iqr_s))})  "
                    f"{fmt_ratio(r.speedup):>7} vs {r.baseline}")
            if r.throughput is not None:
                line += f"  {fmt_throughput(r.throughput)} seq/s"
            if "flops" in r.extra:
                tflops, tbs, floor = _gpu_rates(r)
                line += f"  {tflops} TFLOP/s {tbs} TB/s  floor {floor} ms"
            print(line)
        print()


# ----------------------------------------------------------------------------------------
# Plots


def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, so no global state or display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _impl_colours(impls) -> dict[str, Any]:
    import matplotlib

    ordered = sorted(set(impls), key=_impl_key)
    palette = matplotlib.colormaps["tab10" if len(ordered) <= 10 else "tab20"].colors
    return {impl: palette[i % len(palette)] for i, impl in enumerate(ordered)}


def _save_png(fig, path: str | os.PathLike) -> Path:
    return _write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                             bbox_inches="tight"))


def plot_latency_vs_length(run: dict, path: str | os.PathLike) -> Path | None:
    """Median latency against sequence length T for every sweep over T: one panel per
    series, one line per impl (same colour in every panel), log-log axes. Returns the PNG's
    path, or None (and writes nothing) when the run has no T sweep."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for b in run["benchmarks"]:
        sweep = (b.get("extra_info") or {}).get("sweep")
        if not isinstance(sweep, dict) or sweep.get("axis") != "T":
            continue
        points = series.setdefault(str(sweep["series"]), {}).setdefault(_impl(b), [])
        points.append((int(sweep["value"]), 1e3 * float(b["stats"]["median"])))
    if not series:
        return None
    from matplotlib.ticker import NullFormatter, NullLocator

    names = sorted(series)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _new_figure(4.6 * cols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, cols, squeeze=False)
    colours = _impl_colours(impl for s in series.values() for impl in s)
    handles = {}
    for ax, name in zip(axes.flat, names):
        values = sorted({v for pts in series[name].values() for v, _ in pts})
        for impl in sorted(series[name], key=_impl_key):
            pts = sorted(series[name][impl])
            (line,) = ax.plot([v for v, _ in pts], [ms for _, ms in pts], "o-", color=colours[impl],
                              label=impl, markersize=4)
            handles.setdefault(impl, line)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median ms")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    ordered = sorted(handles, key=_impl_key)
    fig.legend([handles[i] for i in ordered], ordered, loc="lower center", ncol=min(len(ordered), 7),
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Latency against sequence length")
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.04, 1, 1))
    return _save_png(fig, path)


def plot_speedups(run: dict, path: str | os.PathLike) -> Path | None:
    """Speed-up over each group's baseline of every zoo-model benchmark (extra_info "model"):
    one panel per batch size, grouped bars (one per impl other than the baseline) per model,
    log y axis with a dashed line at 1x. Returns the PNG's path, or None (and writes
    nothing) when no zoo benchmark has a speed-up."""
    panels: dict[Any, dict[str, dict[str, float]]] = {}
    for rows in summarize(run).values():
        for r in rows:
            if "model" not in r.extra or r.impl == r.baseline or r.speedup is None:
                continue
            panels.setdefault(r.extra.get("batch"), {}).setdefault(str(r.extra["model"]), {})[r.impl] = r.speedup
    if not panels:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    batches = sorted(panels, key=lambda b: (b is None, b if isinstance(b, (int, float)) else 0, str(b)))
    impls = sorted({i for p in panels.values() for m in p.values() for i in m}, key=_impl_key)
    colours = _impl_colours(impls)
    values = [v for p in panels.values() for m in p.values() for v in m.values()]
    low, high = min(min(values), 1.0) / 1.4, max(max(values), 1.0) * 1.4
    bars_per_panel = max(sum(len(m) for m in p.values()) for p in panels.values())
    fig = _new_figure(max(7.0, 0.28 * bars_per_panel + 3), 3.6 * len(batches) + 1.0)
    axes = fig.subplots(len(batches), 1, squeeze=False)[:, 0]
    handles = {}
    for ax, batch in zip(axes, batches):
        models = sorted(panels[batch])
        present = [i for i in impls if any(i in panels[batch][m] for m in models)]
        width = 0.8 / len(present)
        for k, impl in enumerate(present):
            xs = [j + (k - (len(present) - 1) / 2) * width for j, m in enumerate(models)
                  if impl in panels[batch][m]]
            ys = [panels[batch][m][impl] for m in models if impl in panels[batch][m]]
            # Bars grow from 1x: up when faster than the baseline, down when slower.
            bars = ax.bar(xs, [y - 1 for y in ys], bottom=1.0, width=width, color=colours[impl],
                          label=impl)
            if bars_per_panel <= 40:
                ax.bar_label(bars, [f"{y:.2f}" for y in ys], fontsize=6, padding=1)
            handles.setdefault(impl, bars)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_ylabel("speed-up vs baseline")
        kind = "latency" if batch == 1 else "throughput"
        ax.set_title(f"batch {batch} ({kind})" if batch is not None else "batch unknown", fontsize=10)
        ax.grid(alpha=0.3, axis="y", which="both")
    ordered = sorted(handles, key=_impl_key)
    fig.legend([handles[i] for i in ordered], ordered, loc="lower center", ncol=min(len(ordered), 7),
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Zoo models: speed-up over each group's baseline (above 1x is faster)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save_png(fig, path)


# ----------------------------------------------------------------------------------------
# Comparing runs


@dataclass
class Regression:
    """A benchmark whose median changed between two runs (ratio = new / previous)."""

    group: str
    impl: str
    fullname: str
    prev_median_s: float
    new_median_s: float
    ratio: float


def _changes(prev: dict, new: dict) -> tuple[list[Regression], int, int, int]:
    """Every benchmark in both runs (matched by fullname) with its ratio, and the counts of
    matched benchmarks, of those only in `prev` and of those only in `new`."""
    old = {b.get("fullname", b.get("name")): b for b in prev["benchmarks"]}
    cur = {b.get("fullname", b.get("name")): b for b in new["benchmarks"]}
    changes = []
    for name, b in cur.items():
        if name not in old:
            continue
        before, after = float(old[name]["stats"]["median"]), float(b["stats"]["median"])
        if before <= 0:
            continue
        changes.append(Regression(group=str(b.get("group") or "(no group)"), impl=_impl(b),
                                  fullname=str(name), prev_median_s=before, new_median_s=after,
                                  ratio=after / before))
    matched = sum(1 for n in cur if n in old)
    return changes, matched, len(old) - matched, len(cur) - matched


def compare_runs(prev: dict, new: dict, threshold: float = 0.10) -> tuple[list[Regression], list[str]]:
    """Benchmarks of `new` more than `threshold` slower than in `prev` (median against median,
    matched by fullname), slowest change first, and the sorted names of their groups.
    Benchmarks in only one of the runs are left out."""
    changes, _, _, _ = _changes(prev, new)
    regressions = sorted((c for c in changes if c.new_median_s > c.prev_median_s * (1 + threshold)),
                         key=lambda c: (-c.ratio, c.fullname))
    return regressions, sorted({r.group for r in regressions})


def _change(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f}%"


def compare_markdown(prev: dict, new: dict, threshold: float = 0.10) -> str:
    """Markdown section comparing `new` with the previous run `prev`: the benchmarks more than
    `threshold` slower (and their groups), then the ones more than `threshold` faster."""
    changes, matched, only_prev, only_new = _changes(prev, new)
    regressions, flagged = compare_runs(prev, new, threshold)
    pct = f"{threshold * 100:g}%"
    lines = ["## Compared with the previous run", "",
             f"Previous run: {prev.get('datetime') or 'unknown date'}, {_commit(prev)}. "
             f"{matched} benchmarks in both runs"
             + (f"; {only_prev} only in the previous run" if only_prev else "")
             + (f"; {only_new} only in this run" if only_new else "") + ".", ""]
    if not regressions:
        lines.append(f"No group is more than {pct} slower.")
    else:
        lines.append(f"Benchmarks more than {pct} slower:")
        lines.append("")
        lines.append(_table(["group", "impl", "previous ms", "now ms", "change"],
                            [[r.group, r.impl, fmt_ms(_ms(r.prev_median_s)), fmt_ms(_ms(r.new_median_s)),
                              _change(r.ratio)] for r in regressions]))
        lines += ["", "Groups more than " + pct + " slower: " + ", ".join(f"`{g}`" for g in flagged) + "."]
    improved = sorted((c for c in changes if c.new_median_s < c.prev_median_s * (1 - threshold)),
                      key=lambda c: (c.ratio, c.fullname))
    if improved:
        top = improved[:20]
        more = f" (the {len(top)} largest of {len(improved)})" if len(improved) > len(top) else ""
        lines += ["", f"### More than {pct} faster{more}", "",
                  _table(["group", "impl", "previous ms", "now ms", "change"],
                         [[c.group, c.impl, fmt_ms(_ms(c.prev_median_s)), fmt_ms(_ms(c.new_median_s)),
                           _change(c.ratio)] for c in top])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Everything at once


def write_report(run_path: str | os.PathLike, out_dir: str | os.PathLike,
                 prev_path: str | os.PathLike | None = None,
                 title: str = "seqfuse latency report") -> dict[str, Path]:
    """Writes report.md, latency-vs-length.png and speedups.png (each when it has data) for
    the run at `run_path` into `out_dir`, with a comparison against the run at `prev_path`
    when given. Returns {"report", "latency_plot", "speedup_plot"} -> path, for the files
    written."""
    run = load_run(run_path)
    prev = load_run(prev_path) if prev_path is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    latency = plot_latency_vs_length(run, out / "latency-vs-length.png")
    if latency is not None:
        written["latency_plot"] = latency
    speedups = plot_speedups(run, out / "speedups.png")
    if speedups is not None:
        written["speedup_plot"] = speedups
    text = markdown_report(run, title)
    if prev is not None:
        text += "\n" + compare_markdown(prev, run)
    if latency is not None or speedups is not None:
        text += "\n## Plots\n"
        if latency is not None:
            text += f"\n![latency vs length]({latency.name})\n"
        if speedups is not None:
            text += f"\n![speed-ups]({speedups.name})\n"
    written["report"] = _write_text_atomic(out / "report.md", text)
    return written


# ----------------------------------------------------------------------------------------
# Running the suite (seqfuse bench, make bench, make bench-compare)

# The suite's parts: name -> its file in bench/.
SUITES = {
    "recurrent": "test_bench_recurrent.py",     # LSTM / GRU / RNN layers: shapes, sweeps, training
    "attention": "test_bench_attention.py",     # additive attention and SDPA
    "zoo": "test_bench_zoo.py",                 # every zoo model, batch 1 and 32, every impl
    "zoo-train": "test_bench_zoo_train.py",     # training throughput on real batches
    "bf16": "test_bench_bf16.py",               # bfloat16 against float32
    "gpu": "test_bench_gpu.py",                 # issue 5's GPU shapes with roofline floors
    "percall": "test_bench_percall.py",         # a module call's fixed cost above its kernel
    "contended": "test_bench_contended.py",     # a batch-1 layer call with one core kept busy
}
THREADS = 2


def bench_dir() -> Path:
    """The suite's folder: $SEQFUSE_BENCH_DIR, else bench/ under the current directory (a
    source checkout: the suite is not installed with the package)."""
    path = Path(os.environ.get("SEQFUSE_BENCH_DIR") or Path.cwd() / "bench").resolve()
    if not (path / "conftest.py").is_file():
        raise FileNotFoundError(f"the benchmark suite is not at {path}: run seqfuse bench from the root "
                                "of a seqfuse source checkout, or set SEQFUSE_BENCH_DIR to its bench/ folder")
    return path


def results_dir() -> Path:
    """Where this machine's runs are saved: bench/results/<machine-id>/<timestamp>.json."""
    return bench_dir() / "results" / machine_id()


def previous_run(before: str | None = None) -> Path | None:
    """This machine's latest saved run (the one before timestamp `before`, if given)."""
    folder = results_dir()
    runs = sorted(p for p in folder.glob("*.json") if re.fullmatch(r"\d{8}T\d{6}", p.stem)) if folder.is_dir() else []
    if before is not None:
        runs = [p for p in runs if p.stem < before]
    return runs[-1] if runs else None


def suite_files(only: list[str] | None) -> list[Path]:
    names = list(SUITES) if not only else only
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite {unknown}; choose from {', '.join(SUITES)}")
    return [bench_dir() / SUITES[n] for n in names]


@dataclass
class SuiteRun:
    returncode: int                      # pytest's
    json_path: Path | None               # the saved run (None in quick mode)
    report: dict[str, Path]              # write_report's files
    regressions: list[Regression]
    flagged: list[str]                   # groups more than `threshold` slower than prev


def run_suite(only: list[str] | None = None, keyword: str | None = None, quick: bool = False,
              report_dir: str | os.PathLike | None = None, compare: str | os.PathLike | bool = False,
              threshold: float = 0.10, pytest_args: tuple = ()) -> SuiteRun:
    """Run the suite (or the `only` parts, `-k keyword`) in a pytest subprocess.

    Full mode saves pytest-benchmark's JSON (with per-round data) as
    bench/results/<machine-id>/<timestamp>.json (written aside, then renamed: an
    interrupted run leaves nothing) and writes the Markdown report and plots into
    `report_dir` (default: bench/results/<machine-id>/<timestamp>/). compare=True compares
    with this machine's previous saved run (a path: with that run) through pytest-benchmark's
    --benchmark-compare, and flags groups more than `threshold` slower.
    Quick mode (--quick --benchmark-disable) runs every benchmark once at tiny shapes,
    timing nothing: a check that the suite works."""
    files = suite_files(only)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(THREADS))}
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-q", "-p", "no:cacheprovider", "-rfE"]
    if keyword:
        cmd += ["-k", keyword]
    if quick:
        if compare:
            raise ValueError("quick mode times nothing: it cannot be compared")
        cmd += ["--quick", "--benchmark-disable"]
        rc = subprocess.call([*cmd, *pytest_args], cwd=bench_dir().parent, env=env)
        return SuiteRun(rc, None, {}, [], [])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    prev = None
    if compare is True:
        prev = previous_run(before=stamp)
        if prev is None:
            raise FileNotFoundError(f"no previous run in {results_dir()} to compare with: run `make bench` first")
    elif compare:
        prev = Path(compare)
        load_run(prev)   # a clear error now, not after an hour of benchmarks
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{stamp}.json"
    partial = folder / f".{stamp}.json.partial"
    cmd += ["--benchmark-only", "--benchmark-save-data", f"--benchmark-json={partial}",
            "--benchmark-sort=name", "--benchmark-columns=median,iqr,rounds"]
    if prev is not None:
        cmd += [f"--benchmark-compare={prev}"]
    try:
        rc = subprocess.call([*cmd, *pytest_args], cwd=bench_dir().parent, env=env)
        if not partial.is_file():
            return SuiteRun(rc or 1, None, {}, [], [])
        # pytest-benchmark indents by 4: the per-round data makes that 2x the compact size.
        compact = json.dumps(load_run(partial), separators=(",", ":"))
        partial.write_text(compact)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    report = write_report(final, Path(report_dir) if report_dir else folder / stamp, prev)
    regressions, flagged = compare_runs(load_run(prev), load_run(final), threshold) if prev else ([], [])
    return SuiteRun(rc, final, report, regressions, flagged)
