"""The `seqfuse` command line.

  seqfuse demo   [--epochs N] [--out DIR]          train, export, check parity, time
  seqfuse export CHECKPOINT_DIR --out DIR [--formats onnx,torchscript] [--opset N] [--atol X]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _quiet_exporter() -> None:
    # torch.onnx logs one warning per missing torchvision op and its progress banners.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def cmd_export(args) -> int:
    from seqfuse.export import FORMATS, ParityError, export_model
    from seqfuse.train import load_checkpoint

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        print(f"seqfuse export: --formats: unknown {bad}; choose from {list(FORMATS)}", file=sys.stderr)
        return 2
    try:
        model, name, vocab = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"seqfuse export: cannot load checkpoint: {exc}", file=sys.stderr)
        return 2
    _quiet_exporter()
    try:
        result = export_model(model, args.out, formats=formats, opset=args.opset, atol=args.atol,
                              model_name=name,
                              extra_files={"vocab.json": vocab} if vocab.is_file() else None)
    except ParityError as exc:
        print(f"seqfuse export: {exc}", file=sys.stderr)
        return 1
    print(result.parity.table())
    print(f"\nwrote {result.out_dir}: " + ", ".join(p.name for p in result.files.values()) + ", manifest.json")
    return 0


def cmd_demo(args) -> int:
    from seqfuse.demo import run_demo

    _quiet_exporter()
    run_demo(epochs=args.epochs, out=Path(args.out), seed=args.seed)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="seqfuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a checkpoint to ONNX/TorchScript after parity checks")
    p.add_argument("checkpoint", help="checkpoint folder (config.json, model.pt, vocab.json)")
    p.add_argument("--out", required=True, help="artifact folder to write (replaced atomically)")
    p.add_argument("--formats", default="onnx,torchscript")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--atol", type=float, default=1e-5, help="max absolute difference allowed")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train an LSTM classifier on movie reviews, export it, time it")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
