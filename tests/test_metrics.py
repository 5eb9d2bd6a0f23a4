"""seqfuse.zoo.metrics against hand-computed cases and independent definitions."""
import math

import pytest
import torch

from seqfuse.zoo.metrics import accuracy, corpus_bleu, edit_distance, error_rate, macro_f1, rmse


def t(*values):
    return torch.tensor(values)


def test_accuracy():
    assert accuracy(t(1, 0, 2, 2), t(1, 1, 2, 0)) == 0.5
    assert accuracy(t(3), t(3)) == 1.0
    assert accuracy(t(0, 1, 2), t(1, 2, 0)) == 0.0
    assert math.isnan(accuracy(t(), t()))


def test_macro_f1_hand_computed():
    pred = t(0, 0, 1, 1, 2, 2, 0)
    target = t(0, 1, 1, 1, 2, 0, 2)
    # class 0: TP 1, FP 2, FN 1 -> 2/5; class 1: TP 2, FP 0, FN 1 -> 4/5;
    # class 2: TP 1, FP 1, FN 1 -> 2/4; class 3 appears nowhere and is skipped
    assert macro_f1(pred, target, num_classes=4) == pytest.approx((0.4 + 0.8 + 0.5) / 3)
    assert macro_f1(target, target, num_classes=3) == 1.0


def test_macro_f1_class_only_predicted_or_only_true_counts_as_zero():
    # class 2 only predicted (F1 0); class 1: TP 1, FP 0, FN 0 -> 1; class 0: TP 0, FN 1 -> 0
    assert macro_f1(t(2, 1), t(0, 1), num_classes=3) == pytest.approx(1 / 3)
    assert math.isnan(macro_f1(t(), t(), num_classes=2))


def sklearn_macro_f1(pred, target):
    """scikit-learn's f1_score(average='macro', zero_division=0): per label of
    union(pred, target), F1 = 2 P R / (P + R)."""
    scores = []
    for c in sorted(set(pred.tolist()) | set(target.tolist())):
        tp = int(((pred == c) & (target == c)).sum())
        p = tp / int((pred == c).sum()) if (pred == c).any() else 0.0
        r = tp / int((target == c).sum()) if (target == c).any() else 0.0
        scores.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("n,num_classes", [(1, 2), (13, 3), (101, 7)])
def test_macro_f1_matches_the_precision_recall_definition(n, num_classes):
    gen = torch.Generator().manual_seed(n)
    target = torch.randint(0, num_classes, (n,), generator=gen)
    pred = torch.where(torch.rand(n, generator=gen) < 0.6, target,
                       torch.randint(0, num_classes, (n,), generator=gen))
    assert macro_f1(pred, target, num_classes) == pytest.approx(sklearn_macro_f1(pred, target))


def test_rmse():
    assert rmse(t(1.0, 2.0, 3.0), t(1.0, 2.0, 5.0)) == pytest.approx(math.sqrt(4 / 3))
    assert rmse(t(0.5), t(0.5)) == 0.0
    # computed in float64: no float32 rounding of a large offset
    x = torch.full((4,), 1e6, dtype=torch.float32)
    assert rmse(x + 1, x) == 1.0


def test_edit_distance_known_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "") == 3
    assert edit_distance("", "") == 0
    assert edit_distance("same", "same") == 0
    assert edit_distance(["K", "AE1", "T"], ["K", "AH0", "T"]) == 1     # token lists too
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2
    assert edit_distance([1], [2]) == 1


def test_edit_distance_is_symmetric():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = (torch.randint(0, 3, (int(n),), generator=gen).tolist()
                for n in torch.randint(0, 7, (2,), generator=gen))
        d = edit_distance(a, b)
        assert d == edit_distance(b, a)
        assert abs(len(a) - len(b)) <= d <= max(len(a), len(b))


def test_error_rate():
    # edits 1 + 1 over reference length 3 + 2
    assert error_rate([[1, 2, 3], [4]], [[1, 2, 4], [4, 5]]) == pytest.approx(0.4)
    assert error_rate([[1, 2]], [[1, 2]]) == 0.0
    assert error_rate([[]], [[1, 2]]) == 1.0
    assert error_rate([], []) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        error_rate([[1], [2]], [[1]])


def test_corpus_bleu_perfect_match_is_one():
    refs = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert corpus_bleu(refs, refs) == pytest.approx(1.0)


def test_corpus_bleu_no_four_gram_match_is_zero():
    # 1-, 2- and 3-grams match but no 4-gram does: no smoothing, so 0
    assert corpus_bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 9, 3, 4, 5]]) == 0.0
    assert corpus_bleu([[1, 2, 3]], [[1, 2, 3]]) == 0.0   # shorter than 4: no 4-grams at all
    assert corpus_bleu([[]], [[1, 2, 3, 4]]) == 0.0


def test_corpus_bleu_brevity_penalty():
    # all n-grams of the hypothesis are in the reference; 5 tokens for 7: BP = exp(1 - 7/5)
    assert corpus_bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5, 6, 7]]) == pytest.approx(math.exp(-0.4))
    # a longer hypothesis is not penalised (only its precision drops)
    assert corpus_bleu([[1, 2, 3, 4, 5, 6]], [[1, 2, 3, 4, 5]]) == pytest.approx(
        (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_corpus_bleu_clipped_precisions_by_hand():
    hyp, ref = [1, 2, 3, 4, 1, 2], [1, 2, 3, 4, 5, 6]
    # clipped matches / totals: 1-grams 4/6 (the second 1 and 2 are clipped), 2-grams 3/5,
    # 3-grams 2/4, 4-grams 1/3; equal lengths, so no brevity penalty
    assert corpus_bleu([hyp], [ref]) == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # corpus level: counts are summed over sentences before the precisions (not a mean of
    # sentence scores): (9/11 * 7/9 * 5/7 * 3/5) ** 1/4 = (3/11) ** 1/4
    both = corpus_bleu([hyp, [7, 8, 9, 10, 11]], [ref, [7, 8, 9, 10, 11]])
    assert both == pytest.approx((3 / 11) ** 0.25)
    assert both != pytest.approx(((1 / 15) ** 0.25 + 1) / 2)
    # max_n = 2: (4/6 * 3/5) ** 1/2
    assert corpus_bleu([hyp], [ref], max_n=2) == pytest.approx((4 / 6 * 3 / 5) ** 0.5)


def test_corpus_bleu_works_on_strings_and_stays_in_unit_interval():
    gen = torch.Generator().manual_seed(1)

    def sentences():
        lengths = torch.randint(1, 12, (30,), generator=gen).tolist()
        return [torch.randint(0, 4, (n,), generator=gen).tolist() for n in lengths]

    assert 0.0 < corpus_bleu(sentences(), sentences()) < 1.0
    words = "the cat sat on the mat".split()
    assert corpus_bleu([words], [words]) == pytest.approx(1.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        corpus_bleu([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="shape"):
        accuracy(t(1, 2, 3), t(1, 2))
    with pytest.raises(ValueError, match="shape"):
        rmse(t(1.0, 2.0, 3.0), t(1.0, 2.0))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "rmse"])
def test_broadcastable_shape_mismatch_raises(metric):
    with pytest.raises(ValueError, match="shape"):
        if metric == "accuracy":
            accuracy(t(1), t(1, 0, 1, 1))
        elif metric == "macro_f1":
            macro_f1(t(1), t(1, 0, 1, 1), num_classes=2)
        else:
            rmse(t(1.0, 2.0).view(2, 1), t(1.0, 2.0))
