"""Evaluation metrics of the model zoo: accuracy and macro F1 (classifiers), RMSE
(regressor), token accuracy (tagger), phoneme error rate and BLEU (seq2seq)."""
from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _same_shape(pred: Tensor, target: Tensor) -> None:
    # broadcasting [N, 1] against [N] would silently compare N x N pairs
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")


def accuracy(pred: Tensor, target: Tensor) -> float:
    """pred, target: [N] class ids."""
    _same_shape(pred, target)
    return float((pred == target).float().mean()) if target.numel() else float("nan")


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from
    both pred and target is skipped (scikit-learn's zero_division aside, the same value)."""
    _same_shape(pred, target)
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def rmse(pred: Tensor, target: Tensor) -> float:
    _same_shape(pred, target)
    return float(torch.sqrt(torch.mean((pred.double() - target.double()) ** 2)))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def error_rate(hypotheses: Sequence[Sequence], references: Sequence[Sequence]) -> float:
    """Total edit distance over total reference length: the phoneme (or word) error rate."""
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} references")
    total = sum(len(r) for r in references)
    return sum(edit_distance(h, r) for h, r in zip(hypotheses, references)) / max(total, 1)


def _ngrams(seq: Sequence, n: int) -> collections.Counter:
    return collections.Counter(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence], references: Sequence[Sequence], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) with one reference per hypothesis: the geometric
    mean of clipped n-gram precisions for n = 1..max_n, times the brevity penalty; in
    [0, 1]. No smoothing, as sacrebleu's default: 0 when some order has no match."""
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)
