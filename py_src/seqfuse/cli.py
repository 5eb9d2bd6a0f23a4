"""The `seqfuse` command line.

  seqfuse train NAME [--epochs --batch-size --lr --max-minutes --out DIR --force --seed --device]
  seqfuse evaluate CHECKPOINT_DIR [--split test]   re-compute a checkpoint's metrics
  seqfuse models                                   the zoo: names, data, defaults
  seqfuse demo   [--epochs N] [--out DIR]          train, export, check parity, time
  seqfuse export CHECKPOINT_DIR --out DIR [--formats onnx,torchscript,pt2,aoti] [--opset N]
                 [--variants fp16,int8,ort-opt] [--triton-repo DIR] [--atol X] [--force]
  seqfuse predict ARTIFACT_DIR [INPUT ...|--file F] [--json] [--runtime onnx|aoti|auto]   serve it

--out replaces a folder only when it is missing, empty or a previous output of the same
command; --force replaces any other folder, but never the current folder or one of its
parents, a symbolic link, or a folder that is or holds the checkpoint being read.
  seqfuse bench  [--only recurrent,attention,zoo,...] [-k EXPR] [--report DIR] [--compare [RUN]]
                 [--quick] [--from-json RUN]     latency suite: saved run, report, plots
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path


def _quiet_exporter() -> None:
    # torch.onnx logs one warning per missing torchvision op and its progress banners.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _device_error(device: str) -> str | None:
    """Why --device cannot run models (None when it can): cpu, or cuda[:N] with CUDA."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device must be cpu or cuda[:N], got {device!r}"
    if dev.type not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda[:N], got {device!r}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device} but torch sees no CUDA device"
    return None


# The library's names of the destinations (seqfuse.atomic.DestinationError.label) -> options
_OPTIONS = {"out_dir": "--out", "triton_repo": "--triton-repo"}
MAX_FILE_BYTES = 64 << 20  # predict --file: more (or an endless file, /dev/zero) is refused


def _destination(exc) -> str:
    """A DestinationError in the command line's words: its option, and --force."""
    return exc.message(_OPTIONS.get(exc.label, exc.label), "--force")


def _finite_positive(option: str, value: float | None) -> str | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        return f"{option} must be a finite number > 0, got {value}"
    return None


def cmd_export(args) -> int:
    from seqfuse.atomic import DestinationError
    from seqfuse.export import FORMATS, ExportError, ParityError
    from seqfuse.export.exporter import check_destinations
    from seqfuse.export.variants import VARIANTS
    from seqfuse.zoo.export import export_checkpoint

    formats, variants = _csv(args.formats), _csv(args.variants)
    try:  # every destination, before anything is read (again with the model's names later)
        check_destinations(args.out, triton_repo=args.triton_repo, force=args.force, inputs=[args.checkpoint])
    except DestinationError as exc:
        print(f"seqfuse export: {_destination(exc)}", file=sys.stderr)
        return 2
    if _finite_positive("--atol", args.atol):
        print(f"seqfuse export: {_finite_positive('--atol', args.atol)}", file=sys.stderr)
        return 2
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        print(f"seqfuse export: --formats: unknown {bad}; choose from {list(FORMATS)}", file=sys.stderr)
        return 2
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"seqfuse export: --variants: unknown {bad}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    _quiet_exporter()
    try:
        result = export_checkpoint(args.checkpoint, args.out, formats=formats, opset=args.opset,
                                   atol=args.atol, variants=variants, triton_repo=args.triton_repo,
                                   use_data=not args.no_data, progress=not args.quiet, force=args.force)
    except DestinationError as exc:
        print(f"seqfuse export: {_destination(exc)}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"seqfuse export: {exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"seqfuse export: {exc}\nnothing was written.", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"seqfuse export: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"seqfuse export: {exc}", file=sys.stderr)
        return 1
    print(result.parity.summary())
    _print_variants(result.manifest.get("variants", {}))
    print(f"\nwrote {result.out_dir}: " + ", ".join(sorted(result.files)))
    if result.triton_models:
        print(f"Triton model repository: " + ", ".join(str(p) for p in result.triton_models))
    return 0


def _print_variants(info: dict) -> None:
    if not info:
        return
    print(f"\n{'variant':<10} {'metrics (test split)':<44} {'latency ms':<28} worse by (points)")
    for name, v in info.items():
        metrics = ", ".join(f"{k} {x:.4f}" for k, x in v.get("metrics", {}).items())
        lat = ", ".join(f"{part} {t['median_ms']:.3f}" for part, t in v.get("latency_ms", {}).items())
        worse = "" if "worse_by_points" not in v else f"{v['worse_by_points']:+.2f}" + (
            "  DEGRADED" if v["degraded"] else "")
        print(f"{name:<10} {metrics:<44} {lat:<28} {worse}")


def cmd_predict(args) -> int:
    from seqfuse.zoo.predict import PredictError, Predictor, format_rows

    inputs = list(args.inputs)
    if args.file:
        try:
            text = _read_file(args.file)
        except OSError as exc:
            print(f"seqfuse predict: --file: {exc}", file=sys.stderr)
            return 2
        except UnicodeDecodeError as exc:
            print(f"seqfuse predict: --file: {args.file} is not UTF-8 text ({exc.reason} at byte "
                  f"{exc.start})", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"seqfuse predict: --file: {exc}", file=sys.stderr)
            return 2
        # Lines end at "\n" (or "\r\n") only: str.splitlines() would also split at \x85,
        # \u2028, \x1c, \x0c... inside an input.
        lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
        inputs += [line for line in lines if line.strip()]
    if not inputs:
        print("seqfuse predict: give inputs as arguments or with --file", file=sys.stderr)
        return 2
    try:
        # Predictor checks the sha256 of every file it loads against manifest.json first;
        # a missing, truncated or modified file is a ValueError naming it.
        rows = Predictor(args.artifact, variant=args.variant, runtime=args.runtime)(
            inputs, batch_size=args.batch_size)
    except (PredictError, OSError, ValueError) as exc:
        print(f"seqfuse predict: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


def _read_file(name: str) -> str:
    """predict --file's text ('-': stdin), read up to MAX_FILE_BYTES: a bigger or endless
    input is a ValueError, not a process that fills its memory."""
    if name == "-":
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read(MAX_FILE_BYTES + 1) if stream is not None else sys.stdin.read(MAX_FILE_BYTES + 1).encode()
    else:
        with open(name, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{name} holds more than {MAX_FILE_BYTES >> 20} MiB (the limit of --file): split it")
    return data.decode("utf-8")


def cmd_train(args) -> int:
    from seqfuse.atomic import DestinationError
    from seqfuse.zoo.tasks import ZOO
    from seqfuse.zoo.train import check_checkpoint_destination, train

    if args.name not in ZOO:
        print(f"seqfuse train: unknown model {args.name!r}; choose from {', '.join(sorted(ZOO))}",
              file=sys.stderr)
        return 2
    problem = _device_error(args.device) or _finite_positive("--lr", args.lr)
    out = Path(args.out) if args.out else Path("artifacts") / args.name
    try:  # before the data is loaded (train checks again, and once more before the swap)
        check_checkpoint_destination(out, force=args.force)
    except DestinationError as exc:
        problem = problem or _destination(exc)
    if problem:
        print(f"seqfuse train: {problem}", file=sys.stderr)
        return 2
    try:
        _, result = train(args.name, out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          max_minutes=args.max_minutes, seed=args.seed, device=args.device,
                          backend=args.backend, limit=args.limit, force=args.force)
    except DestinationError as exc:
        print(f"seqfuse train: {_destination(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"seqfuse train: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != 0:
            return 0
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.test.items())
    print(f"{args.name}: best epoch {result.best_epoch}, test {shown} ({result.seconds:.0f} s)")
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args) -> int:
    from seqfuse.zoo.train import evaluate_checkpoint

    if _device_error(args.device):
        print(f"seqfuse evaluate: {_device_error(args.device)}", file=sys.stderr)
        return 2
    try:
        scores = evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device)
    except (OSError, ValueError) as exc:  # a missing, truncated or corrupted checkpoint file
        print(f"seqfuse evaluate: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores))
    else:
        print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


def cmd_models(args) -> int:
    from seqfuse.zoo.tasks import ZOO

    for name, e in ZOO.items():
        d = e.defaults
        print(f"{name:24s} {e.description}\n{'':24s} epochs {d['epochs']}, batch {d['batch_size']}, lr {d['lr']}")
    return 0


def cmd_demo(args) -> int:
    from seqfuse.atomic import DestinationError
    from seqfuse.zoo.demo import run_demo

    _quiet_exporter()
    try:
        run_demo(epochs=args.epochs, out=Path(args.out), seed=args.seed)
    except DestinationError as exc:  # its --out holds the checkpoint and artifact folders
        print(f"seqfuse demo: {exc.path} {exc.reason}; give another --out", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    from seqfuse import benchmark as B

    only = _csv(args.only) if args.only else None
    if not args.threshold > 0:  # (NaN too)
        print("seqfuse bench: --threshold must be > 0 (0.10 = 10% slower)", file=sys.stderr)
        return 2
    try:
        if only:
            B.suite_files(only)
        if args.from_json:
            # Re-report a saved run (optionally against another): no benchmark runs.
            out = Path(args.report) if args.report else Path(args.from_json).with_suffix("")
            prev = args.compare if isinstance(args.compare, str) else None
            files = B.write_report(args.from_json, out, prev)
            regressions, flagged = (B.compare_runs(B.load_run(prev), B.load_run(args.from_json), args.threshold)
                                    if prev else ([], []))
            result = B.SuiteRun(0, Path(args.from_json), files, regressions, flagged)
        else:
            result = B.run_suite(only, args.keyword, args.quick, args.report, args.compare or False,
                                 args.threshold)
    except (ValueError, OSError) as exc:
        print(f"seqfuse bench: {exc}", file=sys.stderr)
        return 2
    if result.json_path:
        print(f"run:    {result.json_path}")
    for kind, path in result.report.items():
        print(f"{kind + ':':<7} {path}")
    if result.flagged:
        print(f"slower by more than {args.threshold:.0%}: {len(result.regressions)} benchmarks in "
              f"{len(result.flagged)} groups: {', '.join(result.flagged)}")
        return 1
    return 1 if result.returncode else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="seqfuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a checkpoint to ONNX/TorchScript/torch.export after parity checks")
    p.add_argument("checkpoint", help="checkpoint folder written by seqfuse train")
    p.add_argument("--out", required=True, help="artifact folder to write (replaced atomically): missing, "
                                                "empty or a previous export")
    p.add_argument("--formats", default="onnx,torchscript,pt2",
                   help="any of onnx, torchscript, pt2, aoti (AOTInductor: compiled C++ on seqfuse's "
                        "kernels, about 20 s a graph to build)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18..23; 23 uses the Attention op)")
    p.add_argument("--variants", default="", help="any of ort-opt, fp16, int8 (ONNX, measured on the test split)")
    p.add_argument("--triton-repo", default=None, help="also write a Triton Inference Server model repository")
    p.add_argument("--atol", type=float, default=1e-5, help="max absolute difference allowed (float32 formats)")
    p.add_argument("--force", action="store_true", help="replace --out (and the Triton model folders) even "
                                                        "when they are not previous exports")
    p.add_argument("--no-data", action="store_true", help="random parity inputs only; no test-split metrics")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="serve an exported artifact in onnxruntime: predictions for raw inputs")
    p.add_argument("artifact", help="artifact folder written by seqfuse export")
    p.add_argument("inputs", nargs="*", help="texts (classifiers), words (seq2seq), phonemes (tagger), "
                                             "or .npy / JSON arrays (dense models)")
    p.add_argument("--file", default=None, help="one input per line ('\\n' or '\\r\\n'; '-' for stdin), "
                                                "at most 64 MiB")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--variant", default=None, help="serve a variant (ort-opt, fp16, int8) instead of float32")
    p.add_argument("--runtime", default="onnx", choices=["onnx", "aoti", "auto"],
                   help="onnx: onnxruntime; aoti: the AOTInductor package on seqfuse's kernels "
                        "(export with --formats ...,aoti); auto: the one the export measured fastest")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="train a zoo model on its real data set and write a checkpoint")
    p.add_argument("name", help="zoo model name (seqfuse models lists them)")
    p.add_argument("--epochs", type=int, default=None, help="default: the model's own")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (all processes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    p.add_argument("--out", default=None, help="checkpoint folder (default artifacts/NAME): missing, empty "
                                               "or a previous checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out even when it is not a previous checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="auto, native, triton or reference")
    p.add_argument("--limit", type=int, default=None, help="use the first N examples of each split")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-compute a checkpoint's metrics on its test split")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="train an LSTM classifier on movie reviews, export it, time it")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run the latency suite (bench/): saved run, Markdown report, plots")
    p.add_argument("--only", default=None, help="comma-separated parts: recurrent, attention, zoo, zoo-train, "
                                                "bf16, gpu (default: all)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, e.g. 'lstm and cpu'")
    p.add_argument("--report", default=None, help="folder for report.md and the plots (default "
                                                  "bench/results/<machine-id>/<timestamp>/)")
    p.add_argument("--compare", nargs="?", const=True, default=None, metavar="RUN",
                   help="compare with this machine's previous saved run (or RUN, a saved JSON); exit 1 "
                        "if a group got slower by more than --threshold")
    p.add_argument("--threshold", type=float, default=0.10, help="regression threshold (0.10 = 10%%)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, no timing: check that the suite runs")
    p.add_argument("--from-json", default=None, metavar="RUN", help="only write the report of a saved run")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
