"""Export a zoo checkpoint (what `seqfuse export CHECKPOINT_DIR` runs): the model, its
vocabularies, real held-out inputs for the parity suite, and its test split to measure
the variants on, all from the checkpoint folder and the data set it was trained on."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .train import _read_json, checkpoint_data, load_checkpoint

from seqfuse.export.exporter import DEFAULT_FORMATS, ExportResult, check_destinations, export_model
from seqfuse.export.onnx_ops import OPSET
from seqfuse.export.specs import plan_for

# sizes of the real held-out batches added to the parity cases (and, for seq2seq, decoded
# greedily in onnxruntime and eagerly: 76 words compared token for token)
HELDOUT_BATCHES = (1, 3, 8, 64)


def heldout_batches(kind, split, seed: int = 0, sizes=HELDOUT_BATCHES) -> list[tuple]:
    """Model inputs of a few random held-out examples per batch (so rows of different
    lengths share a batch: real mixed padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        idx = torch.randperm(len(split), generator=gen)[:size].tolist()
        inputs, _ = kind.collate(split, idx)
        out.append(tuple(inputs))
    return out


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, formats=DEFAULT_FORMATS,
                      opset: int = OPSET, atol: float = 1e-5, variants=(), triton_repo=None,
                      use_data: bool = True, progress: bool = False, seed: int = 0,
                      force: bool = False) -> ExportResult:
    """Load a `seqfuse train` checkpoint and export it. With use_data (default) the
    parity suite includes real held-out inputs and the variants are measured on the test
    split; without, random inputs only and no metrics. The destinations are checked
    (seqfuse.export.exporter.check_destinations: the checkpoint is never replaced; force:
    replace a folder that is not a previous export) before the data is loaded."""
    ckpt = Path(ckpt_dir)
    model, name, _ = load_checkpoint(ckpt)
    check_destinations(out_dir, triton_repo=triton_repo, model_name=name,
                       parts=[p.name for p in plan_for(model).parts], force=force, inputs=[ckpt])
    meta = _read_json(ckpt / "config.json")
    # listed vocabularies, links included: publishing refuses a link (open_regular)
    vocabs = {fname: ckpt / fname for fname in meta.get("vocabs", [])
              if (ckpt / fname).is_file() or (ckpt / fname).is_symlink()}
    heldout, evaluate, metric = None, None, None
    serving = {}
    if use_data:
        entry, ds = checkpoint_data(ckpt)
        kind = entry.kind(ds)
        test = ds.splits["test"]
        heldout = heldout_batches(kind, test, seed)
        evaluate = lambda m: kind.evaluate(m, test)  # noqa: E731
        metric = (kind.primary, kind.maximize)
        serving = dict(entry.serving)
    else:
        from .tasks import get
        serving = dict(get(name).serving)
    serving["trained"] = {"data": meta.get("data", {}).get("data"), "test": _test_metrics(ckpt)}
    # The vocabulary files are those of the checkpoint, byte for byte.
    return export_model(model, None, out_dir, formats=formats, opset=opset, atol=atol,
                        variants=variants, heldout=heldout, evaluate=evaluate, metric=metric,
                        triton_repo=triton_repo, model_name=name, extra_files=vocabs,
                        serving=serving, seed=seed, progress=progress, force=force, inputs=[ckpt])


def _test_metrics(ckpt: Path) -> dict:
    path = ckpt / "metrics.json"
    if not path.is_file():
        return {}
    test = _read_json(path).get("test", {})  # load_checkpoint checked it is an object
    return test if isinstance(test, dict) else {}
