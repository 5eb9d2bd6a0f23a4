"""Print a saved pytest-benchmark run as one table per group (median, p90, p99,
throughput, speed-up over the group's baseline), or write its Markdown report and plots.

    python bench/report.py RUN.json                 # tables on stdout
    python bench/report.py RUN.json --markdown      # the Markdown report on stdout
    python bench/report.py RUN.json --out DIR [--compare PREV.json]   # report.md + PNGs

The tables, plots and comparison are seqfuse.benchmark's (also behind `seqfuse bench`).
"""
import argparse

from seqfuse import benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--compare", default=None)
    args = p.parse_args()
    if args.out:
        for kind, path in benchmark.write_report(args.run, args.out, args.compare).items():
            print(f"{kind}: {path}")
    elif args.markdown:
        print(benchmark.markdown_report(benchmark.load_run(args.run)))
    else:
        benchmark.print_tables(benchmark.load_run(args.run))


if __name__ == "__main__":
    main()
