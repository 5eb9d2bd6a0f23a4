"""The `seqfuse` command line.

  seqfuse train NAME [--epochs --batch-size --lr --max-minutes --out DIR --seed --device]
  seqfuse evaluate CHECKPOINT_DIR [--split test]   re-compute a checkpoint's metrics
  seqfuse models                                   the zoo: names, data, defaults
  seqfuse demo   [--epochs N] [--out DIR]          train, export, check parity, time
  seqfuse export CHECKPOINT_DIR --out DIR [--formats onnx,torchscript] [--opset N] [--atol X]
"""
from __future__ import annotations

import argparse
import json
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


def cmd_train(args) -> int:
    from seqfuse.tasks import ZOO
    from seqfuse.train import train

    if args.name not in ZOO:
        print(f"seqfuse train: unknown model {args.name!r}; choose from {', '.join(sorted(ZOO))}",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("seqfuse train: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path("artifacts") / args.name
    try:
        _, result = train(args.name, out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          max_minutes=args.max_minutes, seed=args.seed, device=args.device,
                          backend=args.backend, limit=args.limit)
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
    from seqfuse.train import evaluate_checkpoint

    try:
        scores = evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"seqfuse evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores))
    else:
        print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


def cmd_models(args) -> int:
    from seqfuse.tasks import ZOO

    for name, e in ZOO.items():
        d = e.defaults
        print(f"{name:24s} {e.description}\n{'':24s} epochs {d['epochs']}, batch {d['batch_size']}, lr {d['lr']}")
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

    p = sub.add_parser("train", help="train a zoo model on its real data set and write a checkpoint")
    p.add_argument("name", help="zoo model name (seqfuse models lists them)")
    p.add_argument("--epochs", type=int, default=None, help="default: the model's own")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (all processes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    p.add_argument("--out", default=None, help="checkpoint folder (default artifacts/NAME)")
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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
