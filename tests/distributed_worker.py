"""Helper for tests/test_distributed.py (not a test module: pytest does not collect it).

Runs `seqfuse.zoo.train.train` on a small slice of a zoo model's real data, either in one
process (`python tests/distributed_worker.py ...`) or under torchrun
(`torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py ...`), where
train() joins a gloo process group and wraps the model in DistributedDataParallel.

Rank 0 writes the checkpoint folder --out (as `seqfuse train` does). Every rank also
writes, into --ranks-dir, rank{R}.safetensors (the weights that process holds after
training) and rank{R}.json (world size, process-group backend, the TrainResult), so the
test can check that the processes agree with each other and with single-process training.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ranks-dir", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="native")
    p.add_argument("--no-dropout", action="store_true", help="model_overrides={'dropout': 0.0}")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="torch's default dtype while the model is built (its parameters' dtype)")
    args = p.parse_args()

    torch.set_num_threads(1)  # the same (single-threaded) kernels in every run
    torch.set_default_dtype(getattr(torch, args.dtype))
    from seqfuse.zoo.train import train

    overrides = {"dropout": 0.0} if args.no_dropout else None
    model, result = train(args.name, args.out, epochs=args.epochs, batch_size=args.batch_size,
                          seed=args.seed, backend=args.backend, progress=False, limit=args.limit,
                          model_overrides=overrides)

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    group_backend = dist.get_backend() if dist.is_initialized() else None
    ranks_dir = Path(args.ranks_dir)
    ranks_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, ranks_dir / f"rank{rank}.safetensors")
    (ranks_dir / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "env_world_size": os.environ.get("WORLD_SIZE"),
        "group_backend": group_backend, "model_type": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype),
        "best_epoch": result.best_epoch, "history": result.history, "test": result.test,
        "stopped_early": result.stopped_early}, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
