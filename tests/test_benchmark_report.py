"""seqfuse.benchmark on synthetic pytest-benchmark runs (statistics, speed-ups, Markdown,
plots, run comparison) and on one real run from bench/results."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from seqfuse import benchmark as sb

PNG = b"\x89PNG\r\n\x1a\n"
# The newest saved run of any machine (bench/results/<machine-id>/<timestamp>.json).
_SAVED = sorted(Path(__file__).resolve().parents[1].glob("bench/results/*/[0-9]*T[0-9]*.json"),
                key=lambda p: p.stem)
LATEST = _SAVED[-1] if _SAVED else Path("bench/results/none.json")


def bench(group: str, impl: str, median_ms: float, *, data: bool = True, seed: int = 0,
          **extra) -> dict:
    """One pytest-benchmark entry whose median is `median_ms`, with 50 per-round times
    around it (or none when data=False)."""
    median = median_ms / 1e3
    times = None
    if data:
        rng = np.random.default_rng(seed)
        times = list(median * (1 + 0.2 * rng.random(49)))
        times.append(median)
        times = sorted(times)
        # The median of the data is the median reported (50 values: mean of the middle two).
        times[24] = times[25] = median
    q1, q3 = (np.percentile(times, [25, 75]) if times else (median, median))
    stats = {"min": median, "max": median * 1.2, "mean": median, "stddev": 0.0,
             "rounds": len(times) if times else 50, "median": median, "iqr": float(q3 - q1),
             "q1": float(q1), "q3": float(q3), "ops": 1 / median, "total": median * 50,
             "iterations": 1}
    if times:
        stats["data"] = times
    param = f"{impl}-{group}"
    return {"group": group, "name": f"test_x[{param}]", "fullname": f"bench/test_x.py::test_x[{param}]",
            "params": {"impl": impl}, "param": param, "extra_info": {"impl": impl, **extra},
            "options": {}, "stats": stats}


def make_run(benchmarks: list[dict], *, commit: str = "0123456789abcdef", dirty: bool = False,
             when: str = "2026-11-22T10:00:00+00:00") -> dict:
    return {"machine_info": {"node": "vm", "cpu": {"brand_raw": "AMD EPYC", "count": 2},
                             "torch": "2.13.0", "onnxruntime": "1.24.0", "seqfuse": "0.1.0",
                             "threads": 2, "machine_id": "amd-epyc-2c"},
            "commit_info": {"id": commit, "dirty": dirty},
            "benchmarks": benchmarks, "datetime": when, "version": "5.3.1"}


def save(tmp_path: Path, name: str, run: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return path


def basic_run() -> dict:
    return make_run([
        bench("lstm-B8", "eager", 10.0, batch=8, shape="B8-T64-H256-uni", device="cpu"),
        bench("lstm-B8", "seqfuse", 4.0, batch=8, shape="B8-T64-H256-uni", device="cpu", seed=1),
        bench("lstm-B8", "onnxruntime", 5.0, batch=8, shape="B8-T64-H256-uni", device="cpu", seed=2),
        # Attention compares against torch_sdpa, not eager.
        bench("attn", "unfused", 3.0, baseline="torch_sdpa", samples=4),
        bench("attn", "torch_sdpa", 2.0, baseline="torch_sdpa", samples=4, seed=3),
        bench("attn", "seqfuse", 1.0, baseline="torch_sdpa", samples=4, seed=4),
        # No eager row: no speed-ups; no data: no percentiles; no batch: no throughput.
        bench("gru-only", "seqfuse", 7.0, data=False),
        bench("gru-only", "onnxruntime", 8.0, data=False),
    ])


def test_summarize_statistics_and_speedups():
    run = basic_run()
    groups = sb.summarize(run)
    assert list(groups) == ["attn", "gru-only", "lstm-B8"]
    lstm = groups["lstm-B8"]
    assert [r.impl for r in lstm] == ["seqfuse", "onnxruntime", "eager"]   # by median
    for r in lstm:
        data = next(b for b in run["benchmarks"] if b["fullname"] == r.fullname)["stats"]["data"]
        p90, p99 = np.percentile(data, [90, 99])
        assert r.p90_s == pytest.approx(p90) and r.p99_s == pytest.approx(p99)
        assert r.throughput == pytest.approx(8 / r.median_s)
        assert r.speedup == pytest.approx(10.0e-3 / r.median_s)
        assert (r.baseline, r.shape, r.device, r.rounds) == ("eager", "B8-T64-H256-uni", "cpu", 50)
    assert lstm[0].speedup == pytest.approx(2.5)
    assert lstm[-1].speedup == pytest.approx(1.0)

    attn = {r.impl: r for r in groups["attn"]}
    assert {r.baseline for r in attn.values()} == {"torch_sdpa"}
    assert attn["seqfuse"].speedup == pytest.approx(2.0)
    assert attn["unfused"].speedup == pytest.approx(2 / 3)
    assert attn["seqfuse"].throughput == pytest.approx(4 / 1e-3)   # samples when no batch

    for r in groups["gru-only"]:
        assert r.speedup is None and r.p90_s is None and r.p99_s is None and r.throughput is None


def test_formatting_helpers():
    assert [sb.fmt_ms(x) for x in (0.0123, 0.1234, 1.234, 12.34, 123.4, 1234.4)] == \
        ["0.0123", "0.123", "1.23", "12.3", "123", "1234"]
    assert sb.fmt_ms(9.996) == "10.0" and sb.fmt_ms(None) == "-"
    assert "e" not in sb.fmt_ms(0.001)
    assert sb.fmt_ratio(2.3149) == "2.31x" and sb.fmt_ratio(None) == "-"
    assert sb.fmt_throughput(123456.7) == "123,457" and sb.fmt_throughput(None) == "-"


def test_markdown_report():
    md = sb.markdown_report(basic_run(), title="my report")
    assert md.startswith("# my report\n")
    assert "## How to read this report" in md and "make bench-compare" in md
    assert "amd-epyc-2c" in md and "AMD EPYC" in md and "torch 2.13.0" in md
    assert "0123456789" in md and "0123456789a" not in md and "(dirty)" not in md
    assert "2026-11-22T10:00:00" in md
    for group in ("attn", "gru-only", "lstm-B8"):
        assert f"\n## {group}\n" in md
    sections = dict(re.findall(r"\n## (\S+)\n(.*?)(?=\n## |\Z)", md, re.S))
    lstm = sections["lstm-B8"]
    assert "`B8-T64-H256-uni`" in lstm and "cpu" in lstm
    assert "| impl | median ms | p90 ms | p99 ms | throughput seq/s | vs eager |" in lstm
    assert "| seqfuse | 4.00 |" in lstm and "| 2.50x |" in lstm and "| 2,000 | 2.50x |" in lstm
    assert "| eager | 10.0 |" in lstm and "1.00x" in lstm
    assert "vs torch_sdpa |" in sections["attn"] and "| 2.00x |" in sections["attn"]
    assert "| 0.67x |" in sections["attn"]
    assert "| seqfuse | 7.00 | - | - | - | - |" in sections["gru-only"]
    # Summary: fastest impl and seqfuse's speed-up per group.
    summary = sections["Summary"]
    assert "| lstm-B8 | 10.0 | seqfuse (4.00 ms) | 2.50x |" in summary
    assert "| attn | 2.00 (torch_sdpa) | seqfuse (1.00 ms) | 2.00x |" in summary
    assert "| gru-only | - | seqfuse (7.00 ms) | - |" in summary


def test_markdown_gpu_columns_and_dirty_commit():
    run = make_run([bench("gemm", "eager", 2.0, flops=4e12, bytes=1e12, floor_ms=0.5, device="cuda"),
                    bench("gemm", "seqfuse-triton", 1.0, flops=4e12, bytes=1e12, floor_ms=0.5,
                          device="cuda")], dirty=True)
    md = sb.markdown_report(run)
    assert "| impl | median ms | p90 ms | p99 ms | throughput seq/s | vs eager | TFLOP/s | TB/s | floor ms |" in md
    assert "| seqfuse-triton | 1.00 |" in md and "| 2.00x | 4000.0 | 1000.00 | 0.500 |" in md
    assert "2.00x (seqfuse-triton)" in md
    assert "0123456789 (dirty)" in md


def test_print_tables(capsys):
    sb.print_tables(basic_run())
    out = capsys.readouterr().out
    assert "lstm-B8" in out and "2.50x vs eager" in out and "2.00x vs torch_sdpa" in out


def sweep_run() -> dict:
    benches = []
    for series, scale in (("lstm-inference-cpu-B8-H256-uni", 1.0), ("gru-inference-cpu-B8-H256-uni", 0.8)):
        for t in (16, 32, 64, 128):
            for impl, factor in (("eager", 2.0), ("seqfuse", 1.0), ("onnxruntime", 1.3)):
                b = bench(f"{series}-T{t}", impl, scale * factor * t / 16, data=False, batch=8,
                          sweep={"series": series, "axis": "T", "value": t})
                b["fullname"] += f"-T{t}-{series}"
                benches.append(b)
    for model in ("bilstm-attention", "lstm-tagger"):
        for batch in (1, 32):
            for impl, ms in (("eager", 4.0), ("seqfuse", 2.0), ("onnxruntime", 1.5)):
                b = bench(f"zoo-{model}-B{batch}", impl, ms * batch ** 0.5, data=False, batch=batch,
                          model=model)
                b["fullname"] += f"-{model}-B{batch}"
                benches.append(b)
    return make_run(benches)


def assert_png(path: Path) -> None:
    assert path.exists() and path.read_bytes()[:8] == PNG
    assert path.stat().st_size > 5000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_plots(tmp_path):
    run = sweep_run()
    latency = sb.plot_latency_vs_length(run, tmp_path / "lat.png")
    speedups = sb.plot_speedups(run, tmp_path / "speed.png")
    assert latency == tmp_path / "lat.png" and speedups == tmp_path / "speed.png"
    assert_png(latency)
    assert_png(speedups)


def test_plots_without_data_write_nothing(tmp_path):
    run = basic_run()
    assert sb.plot_latency_vs_length(run, tmp_path / "lat.png") is None
    assert sb.plot_speedups(run, tmp_path / "speed.png") is None
    assert list(tmp_path.iterdir()) == []


def test_compare_runs():
    prev = make_run([bench("g1", "eager", 10.0), bench("g1", "seqfuse", 5.0),
                     bench("g2", "eager", 10.0), bench("g2", "seqfuse", 4.0),
                     bench("gone", "eager", 1.0)], commit="fedcba9876543210")
    new = make_run([bench("g1", "eager", 10.5),      # 5% slower: noise
                    bench("g1", "seqfuse", 5.75),    # 15% slower: flagged
                    bench("g2", "eager", 8.0),       # 20% faster
                    bench("g2", "seqfuse", 4.0),
                    bench("added", "eager", 1.0)])
    regressions, groups = sb.compare_runs(prev, new)
    assert groups == ["g1"]
    assert len(regressions) == 1
    r = regressions[0]
    assert (r.group, r.impl) == ("g1", "seqfuse")
    assert r.prev_median_s == pytest.approx(5e-3) and r.new_median_s == pytest.approx(5.75e-3)
    assert r.ratio == pytest.approx(1.15)
    assert sb.compare_runs(prev, new, threshold=0.20) == ([], [])

    md = sb.compare_markdown(prev, new)
    assert md.startswith("## Compared with the previous run")
    assert "fedcba9876" in md and "4 benchmarks in both runs" in md
    assert "1 only in the previous run" in md and "1 only in this run" in md
    assert "| group | impl | previous ms | now ms | change |" in md
    assert "| g1 | seqfuse | 5.00 | 5.75 | +15% |" in md
    assert "`g1`" in md and "`g2`" not in md.split("faster")[0]
    assert "| g2 | eager | 10.0 | 8.00 | -20% |" in md
    assert "+5%" not in md

    quiet = sb.compare_markdown(prev, prev)
    assert "No group is more than 10% slower." in quiet and "faster" not in quiet


def test_compare_regressions_sorted_by_ratio():
    prev = make_run([bench("a", "eager", 1.0), bench("b", "eager", 1.0), bench("c", "eager", 1.0)])
    new = make_run([bench("a", "eager", 1.2), bench("b", "eager", 2.0), bench("c", "eager", 1.5)])
    regressions, groups = sb.compare_runs(prev, new)
    assert [r.group for r in regressions] == ["b", "c", "a"] and groups == ["a", "b", "c"]


def test_load_run_errors(tmp_path):
    not_bench = save(tmp_path, "other.json", {"hello": 1})
    with pytest.raises(ValueError, match=re.escape(str(not_bench))):
        sb.load_run(not_bench)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        sb.load_run(broken)
    with pytest.raises(FileNotFoundError):
        sb.load_run(tmp_path / "missing.json")
    assert sb.load_run(save(tmp_path, "ok.json", basic_run()))["version"] == "5.3.1"


def test_machine_id():
    ident = sb.machine_id()
    assert re.fullmatch(r"[a-z0-9-]+", ident) and "--" not in ident
    assert re.search(r"-\d+c(-|$)", ident)


def test_write_report(tmp_path):
    prev = sweep_run()
    new = sweep_run()
    slower = next(b for b in new["benchmarks"] if b["extra_info"]["impl"] == "seqfuse")
    slower["stats"]["median"] *= 1.3
    out = tmp_path / "out" / "report"
    written = sb.write_report(save(tmp_path, "new.json", new), out,
                              prev_path=save(tmp_path, "prev.json", prev), title="CPU run")
    assert written == {"report": out / "report.md", "latency_plot": out / "latency-vs-length.png",
                       "speedup_plot": out / "speedups.png"}
    md = written["report"].read_text()
    assert md.startswith("# CPU run\n")
    assert "## Compared with the previous run" in md and "+30%" in md and f"`{slower['group']}`" in md
    assert "![latency vs length](latency-vs-length.png)" in md and "![speed-ups](speedups.png)" in md
    assert_png(written["latency_plot"])
    assert_png(written["speedup_plot"])


def test_write_report_without_plots_or_previous(tmp_path):
    written = sb.write_report(save(tmp_path, "run.json", basic_run()), tmp_path / "out")
    assert set(written) == {"report"}
    md = written["report"].read_text()
    assert "Compared with the previous run" not in md and "![" not in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md"]


@pytest.mark.skipif(not LATEST.exists(), reason="no saved run under bench/results/<machine-id>/ in this checkout")
def test_real_run():
    run = sb.load_run(LATEST)
    groups = sb.summarize(run)
    assert groups and sum(len(rows) for rows in groups.values()) == len(run["benchmarks"])
    eager = [r for rows in groups.values() for r in rows if r.impl == "eager"]
    assert eager and all(r.speedup == pytest.approx(1.0) for r in eager)
    md = sb.markdown_report(run)
    assert all(f"## {g}" in md for g in groups)


# ---------------------------------------------------------------------------------------
# seqfuse bench (the runner and its command line)


def _cli(*argv) -> int:
    from seqfuse.cli import main
    return main(list(argv))


def test_cli_report_from_saved_run_and_compare(tmp_path, capsys):
    prev = save(tmp_path, "prev.json", make_run([bench("g", "eager", 10.0), bench("g", "seqfuse", 4.0, seed=1)]))
    same = save(tmp_path, "same.json", make_run([bench("g", "eager", 10.5), bench("g", "seqfuse", 4.1, seed=1)]))
    slow = save(tmp_path, "slow.json", make_run([bench("g", "eager", 10.0), bench("g", "seqfuse", 5.0, seed=1)]))
    assert _cli("bench", "--from-json", str(same), "--compare", str(prev), "--report", str(tmp_path / "a")) == 0
    assert "No group is more than 10% slower" in (tmp_path / "a" / "report.md").read_text()
    # seqfuse 4.0 -> 5.0 ms: +25%, flagged, exit 1, the group named
    assert _cli("bench", "--from-json", str(slow), "--compare", str(prev), "--report", str(tmp_path / "b")) == 1
    out = capsys.readouterr().out
    assert "slower by more than 10%: 1 benchmarks in 1 groups: g" in out
    assert "+25%" in (tmp_path / "b" / "report.md").read_text()
    # a higher threshold lets it pass
    assert _cli("bench", "--from-json", str(slow), "--compare", str(prev), "--threshold", "0.3",
                "--report", str(tmp_path / "c")) == 0


def test_cli_bad_arguments(tmp_path, capsys):
    assert _cli("bench", "--only", "lstm,zoo") == 2
    assert "unknown suite ['lstm']" in capsys.readouterr().err
    assert _cli("bench", "--threshold", "0") == 2
    bad = tmp_path / "x.json"
    bad.write_text('{"not": "a run"}')
    assert _cli("bench", "--from-json", str(bad), "--report", str(tmp_path / "r")) == 2
    assert "x.json is not a pytest-benchmark JSON file" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()
    # quick mode times nothing, so it cannot be compared
    assert _cli("bench", "--quick", "--compare") == 2


def test_suites_are_the_bench_files():
    files = sb.suite_files(None)
    assert [f.name for f in files] == list(sb.SUITES.values())
    assert all(f.is_file() for f in files)
    on_disk = {p.name for p in sb.bench_dir().glob("test_bench_*.py")}
    assert on_disk == set(sb.SUITES.values()), "every bench file belongs to a suite"


def test_previous_run_picks_latest_saved_json(tmp_path, monkeypatch):
    monkeypatch.setattr(sb, "results_dir", lambda: tmp_path)
    assert sb.previous_run() is None
    for stamp in ("20261120T101010", "20261121T090000", "20261122T080000"):
        save(tmp_path, f"{stamp}.json", make_run([]))
    (tmp_path / ".20261123T000000.json.partial").write_text("{}")   # an interrupted run
    (tmp_path / "notes.json").write_text("{}")
    assert sb.previous_run().name == "20261122T080000.json"
    assert sb.previous_run(before="20261122T000000").name == "20261121T090000.json"


def test_quick_suite_subset_runs(tmp_path):
    """The runner's quick mode end to end on a small subset (CI runs all of it: make benchcheck)."""
    result = sb.run_suite(only=["recurrent"], keyword="gru2_packed", quick=True)
    assert result.returncode == 0 and result.json_path is None


def test_machine_line_names_the_cpu_capability():
    run = make_run([])
    assert "CPU kernels" not in sb.machine_line(run)  # older runs did not record it
    run["machine_info"]["cpu_capability"] = "avx512_bf16"
    line = sb.machine_line(run)
    assert line.startswith("**Machine**: AMD EPYC (`amd-epyc-2c`); 2 threads; CPU kernels: avx512_bf16;"), line
