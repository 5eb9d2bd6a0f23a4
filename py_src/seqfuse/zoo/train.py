"""Training and evaluation of the zoo models, checkpoints, and distributed training.

`train(name, out_dir, ...)` is `seqfuse train NAME`: load the model's data, build it on
seqfuse layers, fit it, keep the best epoch by the validation metric, measure the test
split, and write the checkpoint folder:

  config.json          model name, constructor arguments, training settings, data info
  model.safetensors    the best epoch's weights (tensors only: nothing to unpickle)
  vocab.json, ...      the vocabularies (token list per file)
  metrics.json         per-epoch train loss, validation metrics, throughput; the test metrics
  training_curves.png  and attention.png for the attention models

The folder is replaced only when it is missing, empty or a previous checkpoint (only the
files above, and a config.json that reads), or with force (seqfuse.atomic.
check_destination); this is checked before training starts and again before the swap.

Under torchrun (WORLD_SIZE > 1) each process takes its share of every global batch and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on CUDA); the loss is
scaled so that the update equals single-process training on the same global batch.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import plots
from ..atomic import check_destination, make_temp_dir, only_regular_files, owned_prefix, recover, swap_in
from .data import Vocab
from .models import MODELS
from .tasks import Dataset, Kind, ZooEntry, _move, get

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"  # torch.save(state_dict), read with weights_only=True


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64        # the global batch (split across processes under torchrun)
    lr: float = 2e-3
    weight_decay: float = 0.0
    clip: float = 1.0           # max gradient norm
    seed: int = 0
    max_minutes: float | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes!r}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, valid, samples_per_s
    best_epoch: int = 0
    test: dict = field(default_factory=dict)
    seconds: float = 0.0
    stopped_early: bool = False  # the time budget ran out

    @property
    def best_valid(self) -> dict:
        return self.history[self.best_epoch - 1]["valid"] if self.history else {}


# ---------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------


def distributed_context(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_sum(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def _better(kind: Kind, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if kind.maximize else new < best


# ---------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------


def fit(model: nn.Module, kind: Kind, ds: Dataset, cfg: TrainConfig) -> tuple[TrainResult, dict]:
    """Adam with gradient clipping; returns (result, the best epoch's state_dict). The
    best epoch is picked on ds.splits['valid'] by kind.primary; test metrics come from it."""
    rank, world = distributed_context(cfg.device)
    device = torch.device(cfg.device)
    model.to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # the same batches in every process
    train = ds.splits["train"]
    result = TrainResult()
    best_metric, best_state = None, copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    lead = rank == 0

    def out_of_time() -> bool:
        if cfg.max_minutes is None:
            return False
        flag = torch.tensor(float(time.perf_counter() - start > 60 * cfg.max_minutes))
        return bool(_all_sum(flag, world) > 0)  # every process stops at the same batch

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = kind.index_batches(train, cfg.batch_size, shuffle=True, gen=gen)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and lead),
                   leave=False, unit="batch", mininterval=1.0)
        loss_sum = count = samples = 0.0
        t0 = time.perf_counter()
        for idx in bar:
            share = idx[rank::world]
            inputs, target = _move(kind.collate(train, share or idx[:1]), device)
            opt.zero_grad(set_to_none=True)
            total, n = kind.loss(net, (inputs, target))
            if not share:  # fewer examples than processes: join the all-reduce with zero weight
                total, n = total * 0.0, torch.zeros_like(n)
            global_n = _all_sum(n.to(torch.float64), world).item()
            (total * (world / max(global_n, 1.0))).backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            loss_sum += float(total.detach())
            count += float(n)
            samples += len(idx)
            if lead and bar.n % 20 == 0:
                bar.set_postfix(refresh=False, loss=f"{loss_sum / max(count, 1):.4f}",
                                samples_s=f"{samples / (time.perf_counter() - t0):.0f}")
            if out_of_time():
                result.stopped_early = True
                break
        seconds = time.perf_counter() - t0
        bar.close()
        if world > 1:  # the epoch's loss over whole global batches, not rank 0's share
            loss_sum, count = _all_sum(torch.tensor([loss_sum, count], dtype=torch.float64), world).tolist()
        entry = {"epoch": epoch, "train_loss": loss_sum / max(count, 1), "seconds": seconds,
                 "samples_per_s": samples / max(seconds, 1e-9)}
        if lead:
            entry["valid"] = kind.evaluate(model, ds.splits["valid"], device=device)
            metric = entry["valid"][kind.primary]
            if _better(kind, metric, best_metric):
                best_metric, result.best_epoch = metric, epoch
                best_state = copy.deepcopy(model.state_dict())
            if cfg.progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in entry["valid"].items())
                tqdm.write(f"epoch {epoch}: train loss {entry['train_loss']:.4f}, valid {shown}, "
                           f"{entry['samples_per_s']:.0f} samples/s ({seconds:.0f} s)")
        result.history.append(entry)
        if result.stopped_early:
            break
    result.seconds = time.perf_counter() - start
    if lead:
        model.load_state_dict(best_state)
        result.test = kind.evaluate(model, ds.splits["test"], device=device)
    if world > 1:
        dist.barrier()
    return result, best_state


def train(name: str, out_dir: str | Path | None, *, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, max_minutes: float | None = None, seed: int = 0, device: str = "cpu",
          backend: str = "auto", progress: bool = True, dataset: Dataset | None = None,
          limit: int | None = None, model_overrides: dict | None = None,
          force: bool = False) -> tuple[nn.Module, TrainResult]:
    """Train zoo model `name` with its defaults (each argument given overrides one) and
    write the checkpoint folder `out_dir` (replaced atomically; None writes nothing).
    `dataset` replaces the model's own data (same kind); `limit` keeps only the first
    `limit` examples of each split; `model_overrides` change constructor arguments.
    An `out_dir` that may not be replaced (check_checkpoint_destination; force: any
    folder) is refused before training, with seqfuse.atomic.DestinationError."""
    entry = get(name)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    settings = {**entry.defaults, **{k: v for k, v in given.items() if v is not None}}
    cfg = TrainConfig(**settings, seed=seed, max_minutes=max_minutes, device=device, progress=progress)
    if out_dir is not None:  # every process: all of them stop here, not rank 0 after training
        check_checkpoint_destination(out_dir, force=force)
    ds = dataset if dataset is not None else entry.load(seed)
    if limit is not None:
        ds = ds.subset(limit)
    kind = entry.kind(ds)
    torch.manual_seed(seed)
    model = entry.model(ds, backend=backend, **(model_overrides or {}))
    result, _ = fit(model, kind, ds, cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if out_dir is not None and rank == 0:
        save_checkpoint(model, name, ds.vocabs, out_dir, training=asdict(cfg), data=ds.info,
                        metrics={"best_epoch": result.best_epoch, "best_valid": result.best_valid,
                                 "test": result.test, "train_seconds": result.seconds,
                                 "stopped_early": result.stopped_early, "history": result.history},
                        plot=lambda folder: _plots(name, model, kind, ds, result, folder), force=force)
    return model, result


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------


# What a checkpoint folder holds besides its vocabularies (config.json names those).
CHECKPOINT_FILES = frozenset({"config.json", WEIGHTS, LEGACY_WEIGHTS, "metrics.json", "training_curves.png",
                              "attention.png"})


def is_checkpoint(folder: Path) -> bool:
    """`folder` is a previous checkpoint: a config.json that reads, and only the files
    save_checkpoint writes (CHECKPOINT_FILES and the vocabularies config.json lists)."""
    try:
        vocabs = set(read_config(folder).get("vocabs", []))
    except (OSError, ValueError):
        return False
    return only_regular_files(folder, lambda n: n in CHECKPOINT_FILES or n in vocabs)


def check_checkpoint_destination(out_dir: str | Path, *, force: bool = False) -> Path:
    """Raise seqfuse.atomic.DestinationError unless a checkpoint may be written to
    `out_dir`: missing, empty, a previous checkpoint (is_checkpoint), or any folder with
    force; never a link, a file, the current folder or one of its parents."""
    return check_destination(out_dir, label="out_dir", what="a checkpoint written by seqfuse train",
                             is_previous=is_checkpoint, force=force)


def save_checkpoint(model: nn.Module, name: str, vocabs: dict[str, Vocab] | Vocab, out_dir: str | Path, *,
                    training: dict | None = None, data: dict | None = None, metrics: dict | None = None,
                    plot=None, force: bool = False) -> Path:
    """Write the checkpoint folder into a temporary sibling, then swap it in: a reader
    never sees half a checkpoint, and a failure leaves the previous one. `out_dir` is
    checked first (check_checkpoint_destination); what a killed save of it left is
    cleaned up (seqfuse.atomic.recover)."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(MODELS)}")
    if isinstance(vocabs, Vocab):
        vocabs = {"vocab.json": vocabs}
    out = check_checkpoint_destination(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = make_temp_dir(out.parent, owned_prefix(out, "tmp"))
    try:
        config = {"model": name, "config": model.config, "training": training or {}, "data": data or {},
                  "vocabs": sorted(vocabs)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS)
        for fname, vocab in vocabs.items():
            vocab.save(tmp / fname)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if plot is not None:
            plot(tmp)
        check_checkpoint_destination(out, force=force)  # nothing put there meanwhile
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: a truncated or corrupted file, a config
    that does not describe the saved weights. The message names the file."""


class CheckpointShapeError(CheckpointError, RuntimeError):
    """Saved weights whose shapes differ from the model config.json builds (also a
    RuntimeError, as torch's load_state_dict raises for a size mismatch)."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not a text file (corrupted?): {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path} nests its JSON too deeply (corrupted?)") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def read_config(ckpt_dir: str | Path) -> dict:
    """A checkpoint's config.json, checked: an object naming a known model, with its
    constructor arguments."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    path = ckpt / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint folder {ckpt} has no config.json")
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("model", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} has no {' or '.join(map(repr, missing))} key (truncated, or not "
                              "written by seqfuse train?)")
    if not isinstance(meta["model"], str) or meta["model"] not in MODELS:
        raise CheckpointError(f"{path} names model {meta['model']!r}; known: {sorted(MODELS)}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: 'config' must be an object of constructor arguments, "
                              f"got {type(meta['config']).__name__}")
    for key, kind in (("training", dict), ("data", dict), ("vocabs", list)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: {key!r} must be a JSON {'object' if kind is dict else 'array'}")
    vocabs = meta.get("vocabs", [])
    bad = [v for v in vocabs if not isinstance(v, str) or Path(v).name != v or v.startswith(".")]
    if bad:
        raise CheckpointError(f"{path}: 'vocabs' must list file names in the checkpoint folder, got {bad}")
    return meta


def load_vocab(path: Path) -> Vocab:
    """A vocabulary file (a JSON list of distinct tokens), checked."""
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    tokens = _read_json(path)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path} must hold a non-empty JSON list of tokens (strings)")
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{path} lists a token twice (corrupted?)")
    return Vocab(tokens)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    if (ckpt / WEIGHTS).is_file():
        try:
            return load_file(ckpt / WEIGHTS)
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"{ckpt / WEIGHTS} is not a readable safetensors file (truncated or "
                                  f"corrupted?): {_first_line(exc)}") from exc
    path = ckpt / LEGACY_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint folder {ckpt} has no {WEIGHTS}")
    # weights_only=True: the restricted unpickler builds tensors and plain containers
    # only; a pickle that names any other callable (os.system...) is refused, not run.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines()
                       if line.strip().startswith("Trying to load") or "GLOBAL" in line), "")
        raise CheckpointError(f"{path} is not a plain state_dict of tensors; refusing to unpickle it "
                              f"(weights_only=True){': ' + reason if reason else ''}") from exc
    except Exception as exc:  # a truncated zip, random bytes: RuntimeError, EOFError...
        raise CheckpointError(f"{path} is not a readable torch.save file (truncated or corrupted?): "
                              f"{_first_line(exc)}") from exc
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    return state


def _check_state(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The saved tensors are exactly the model's, with its shapes: else an error naming them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")]
                 if missing else []) + ([f"unexpected {unexpected[:5]}" + (
                     f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")] if unexpected else [])
        raise CheckpointError(f"{path} does not match the {type(model).__name__} built from config.json: "
                              f"{'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointShapeError(f"{path}: size mismatch for {k}: the file has shape "
                                       f"{list(state[k].shape)}, the {type(model).__name__} built from config.json "
                                       f"has {list(v.shape)}")
        if state[k].is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{path}: {k} has dtype {state[k].dtype}, the model needs {v.dtype}")


def load_checkpoint(ckpt_dir: str | Path, backend: str = "auto") -> tuple[nn.Module, str, Path]:
    """-> (model in eval mode, model name, path of the input vocabulary vocab.json).

    Weights are read from model.safetensors (tensors only) or a legacy model.pt with
    torch.load(weights_only=True): nothing is unpickled beyond tensors. A truncated or
    corrupted file raises CheckpointError (a ValueError) naming it."""
    ckpt = Path(ckpt_dir)
    meta = read_config(ckpt)
    if (ckpt / "metrics.json").is_file():
        metrics = _read_json(ckpt / "metrics.json")
        if not isinstance(metrics, dict):
            raise CheckpointError(f"{ckpt / 'metrics.json'} must hold a JSON object")
    try:
        model = MODELS[meta["model"]](**meta["config"], backend=backend)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}/config.json: cannot build {meta['model']} from its config: {exc}") from exc
    state = _read_weights(ckpt)
    _check_state(ckpt / (WEIGHTS if (ckpt / WEIGHTS).is_file() else LEGACY_WEIGHTS), model, state)
    model.load_state_dict(state)
    return model.eval(), meta["model"], ckpt / "vocab.json"


def checkpoint_data(ckpt_dir: str | Path) -> tuple[ZooEntry, Dataset]:
    """The zoo entry and the data set a checkpoint was trained on (same seed, same
    splits, same --limit), with its saved vocabularies checked against the rebuilt ones."""
    ckpt = Path(ckpt_dir)
    meta = read_config(ckpt)
    entry = get(meta["model"])
    try:
        seed = int(meta.get("training", {}).get("seed", 0))
        limit = meta.get("data", {}).get("limit")
        limit = int(limit) if limit else None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'config.json'}: bad training seed or data limit: {exc}") from exc
    ds = entry.load(seed)
    if limit:
        ds = ds.subset(limit)
    for fname in meta.get("vocabs", []):  # the splits must be encoded with the saved vocabulary
        if fname not in ds.vocabs:
            raise CheckpointError(f"{ckpt / 'config.json'} lists vocabulary {fname!r}, which "
                                  f"{meta['model']}'s data does not have ({sorted(ds.vocabs)})")
        if load_vocab(ckpt / fname).itos != ds.vocabs[fname].itos:
            raise ValueError(f"{ckpt / fname} differs from the vocabulary rebuilt from the data; "
                             "the data package version may have changed")
    return entry, ds


def evaluate_checkpoint(ckpt_dir: str | Path, split: str = "test", device: str = "cpu",
                        backend: str = "auto") -> dict[str, float]:
    """Re-compute a checkpoint's metrics on a split of its data (same seed, same split)."""
    model, _, _ = load_checkpoint(ckpt_dir, backend=backend)
    entry, ds = checkpoint_data(ckpt_dir)
    if split not in ds.splits:
        raise ValueError(f"split must be one of {sorted(ds.splits)}, got {split!r}")
    return entry.kind(ds).evaluate(model.to(device), ds.splits[split], device=torch.device(device))


# ---------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------


def _plots(name: str, model: nn.Module, kind: Kind, ds: Dataset, result: TrainResult, folder: Path) -> None:
    plots.training_curves(result.history, kind.primary, folder / "training_curves.png",
                          f"{name}: best epoch {result.best_epoch}, test {kind.primary} "
                          f"{result.test.get(kind.primary, float('nan')):.4f}")
    if name == "bilstm-attention":
        _pooling_plot(model, ds, folder / "attention.png")
    elif name == "seq2seq-attention":
        _alignment_plot(model, ds, folder / "attention.png")


@torch.no_grad()
def _pooling_plot(model: nn.Module, ds: Dataset, path: Path, n: int = 6) -> None:
    from .data import pad_batch
    vocab, split = ds.vocabs["vocab.json"], ds.splits["test"]
    idx = [i for i in range(len(split)) if 8 <= len(split.ids[i]) <= 16][:n]
    ids, lengths = pad_batch([split.ids[i] for i in idx])
    model.eval()
    logits, weights = model(ids.to(next(model.parameters()).device), lengths)
    rows = []
    for r, i in enumerate(idx):
        L = int(lengths[r])
        p = torch.softmax(logits[r], -1)[1].item()
        label = "fresh" if int(split.labels[i]) == 1 else "rotten"
        rows.append(([vocab.itos[t] for t in split.ids[i]], weights[r, :L].tolist(),
                     f"label {label}, P(fresh) = {p:.2f}"))
    plots.token_attention(rows, path, "bilstm-attention: pooling weights on test reviews")


@torch.no_grad()
def _alignment_plot(model: nn.Module, ds: Dataset, path: Path, n: int = 4) -> None:
    from .data import pad_batch
    chars, phones, split = ds.vocabs["vocab.json"], ds.vocabs["tgt_vocab.json"], ds.splits["test"]
    idx = [i for i in range(len(split)) if 6 <= len(split.src[i]) <= 10][:n]
    src, lengths = pad_batch([split.src[i] for i in idx])
    model.eval()
    out, weights = model.greedy_decode(src.to(next(model.parameters()).device), lengths)
    items = []
    for r, i in enumerate(idx):
        L, S = max(len(out[r]), 1), int(lengths[r])
        items.append(([chars.itos[t] for t in split.src[i]], [phones.itos[t] for t in out[r]] or ["<eos>"],
                      weights[r, :L, :S].tolist()))
    plots.alignment(items, path, "seq2seq-attention: decoder attention (greedy decoding, test words)")
