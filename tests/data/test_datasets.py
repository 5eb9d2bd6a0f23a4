"""seqfuse.zoo.data: the data sets that ship in wheels (sizes, shapes, value ranges, seeded and
disjoint splits), padding, bucketing, vocabularies, and Dataset.subset. Each loader runs
once per module (the CMU dictionary takes a couple of seconds to parse)."""
import collections

import pytest
import torch

from seqfuse.zoo import data as D
from seqfuse.zoo.data import cmudict
from seqfuse.zoo.tasks import Dataset


def same_split(a, b):
    """Two split objects hold the same examples in the same order."""
    if isinstance(a, D.TensorSplit):
        return torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    if isinstance(a, D.TextSplit):
        return a.ids == b.ids and torch.equal(a.labels, b.labels)
    return a.src == b.src and a.tgt == b.tgt


# ---------------------------------------------------------------------------------
# Movie reviews
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviews():
    return D.movie_review_splits(seed=0)


def test_movie_review_sizes_and_tokens(reviews):
    splits, vocab = reviews
    assert {k: len(v) for k, v in splits.items()} == {"train": 10248, "valid": 1280, "test": 1280}
    assert vocab.itos[:2] == [D.PAD, D.UNK]
    for split in splits.values():
        assert split.labels.dtype == torch.int64 and set(split.labels.tolist()) == {0, 1}
        assert len(split.labels) == len(split.ids)
        lengths = [len(s) for s in split.ids]
        assert min(lengths) >= 1 and max(lengths) <= 64     # an empty text becomes [<unk>]
        assert all(0 < t < len(vocab) for s in split.ids for t in s)   # no <pad> inside a text


def test_movie_review_vocabulary_comes_from_train_only(reviews):
    splits, vocab = reviews
    counts = collections.Counter(t for s in splits["train"].ids for t in s)
    # every word of the vocabulary occurs at least twice (min_freq) in the training texts
    assert all(counts[i] >= 2 for i in range(2, len(vocab)))
    unk = vocab.stoi[D.UNK]
    assert any(unk in s for s in splits["test"].ids)   # words only seen outside train


def test_movie_review_splits_are_seeded(reviews):
    splits, vocab = reviews
    again, vocab_again = D.movie_review_splits(seed=0)
    assert vocab_again.itos == vocab.itos
    assert all(same_split(splits[k], again[k]) for k in splits)
    other, _ = D.movie_review_splits(seed=1)
    assert {k: len(v) for k, v in other.items()} == {k: len(v) for k, v in splits.items()}
    assert not same_split(splits["test"], other["test"])


def test_tokenize_and_vocab(tmp_path):
    assert D.tokenize("It's GREAT -- really great!? 10/10") == ["it's", "great", "really", "great",
                                                              "!", "?", "10", "10"]
    vocab = D.Vocab.build([["a", "b", "a"], ["c", "a", "b"]], min_freq=2)
    assert vocab.itos == [D.PAD, D.UNK, "a", "b"]
    assert vocab.encode(["b", "zzz", "a"]) == [3, 1, 2]
    vocab.save(tmp_path / "v.json")
    assert D.Vocab.load(tmp_path / "v.json").itos == vocab.itos
    assert len(D.Vocab.build([list("aabbbc")], min_freq=1, max_size=2)) == 4  # b, a (+ pad, unk)


# ---------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return D.mnist_splits(seed=0)


def test_mnist_shapes_and_ranges(mnist):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 4000, "valid": 500, "test": 500}
    for split in mnist.values():
        assert split.x.shape == (len(split), 28, 28) and split.x.dtype == torch.float32
        assert split.x.min() >= 0 and split.x.max() <= 1
        assert split.y.dtype == torch.int64 and set(split.y.tolist()) == set(range(10))
        assert split.baseline is None
    assert mnist["train"].x.max() == 1  # scaled by 255, not by the max of each image


def test_mnist_splits_are_disjoint_and_seeded(mnist):
    images = {k: {bytes(img.numpy()) for img in v.x} for k, v in mnist.items()}
    assert not images["train"] & images["valid"]
    assert not images["train"] & images["test"]
    assert not images["valid"] & images["test"]
    again = D.mnist_splits(seed=0)
    assert all(same_split(mnist[k], again[k]) for k in mnist)
    other = D.mnist_splits(seed=1)
    assert not same_split(mnist["test"], other["test"])


# ---------------------------------------------------------------------------------
# MSFT prices
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def msft():
    return D.msft_splits()


def test_msft_windows(msft):
    splits, stats = msft
    # 7,983 days -> 7,982 day-over-day features: 6,386 / 798 / 798 days, less 30 per split
    assert {k: len(v) for k, v in splits.items()} == {"train": 6356, "valid": 768, "test": 768}
    for split in splits.values():
        assert split.x.shape == (len(split), 30, 5) and split.x.dtype == torch.float32
        assert split.y.shape == (len(split),) and split.y.dtype == torch.float32
        assert torch.equal(split.baseline, torch.zeros(len(split)))  # tomorrow = today
        assert torch.isfinite(split.x).all() and torch.isfinite(split.y).all()
        # consecutive windows step one day forward
        assert torch.equal(split.x[1:, :-1], split.x[:-1, 1:])
    days = splits["train"].x[:, -1]
    torch.testing.assert_close(days.mean(0), torch.zeros(5), atol=0.05, rtol=0)
    torch.testing.assert_close(days.std(0), torch.ones(5), atol=0.05, rtol=0)
    assert stats["window"] == 30 and stats["test_first_date"] == "2014-09-15"


def test_msft_target_is_the_next_days_close(msft):
    """y of a window is the close of the day after it: the next window's last day."""
    splits, stats = msft
    mean, std = stats["feature_mean"][3], stats["feature_std"][3]
    for split in splits.values():
        next_close = split.x[1:, -1, 3].double() * std + mean          # log(close / previous close)
        from_y = torch.log1p(split.y[:-1].double() * stats["return_scale"])
        torch.testing.assert_close(from_y, next_close, atol=1e-5, rtol=0)


def test_msft_splits_are_chronological_and_share_no_day(msft):
    splits, _ = msft
    days = {k: {tuple(d.tolist()) for w in v.x for d in w} for k, v in splits.items()}
    assert not days["train"] & days["valid"]
    assert not days["valid"] & days["test"]
    assert not days["train"] & days["test"]
    with pytest.raises(ValueError, match="window must be >= 1"):
        D.msft_splits(window=0)
    short, _ = D.msft_splits(window=1)
    assert short["test"].x.shape[1:] == (1, 5)
    assert len(short["test"]) == 768 + 29


# ---------------------------------------------------------------------------------
# CMU dictionary: g2p and stress tagging
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def g2p():
    return D.g2p_splits(seed=0)


@pytest.fixture(scope="module")
def stress():
    return D.stress_splits(seed=0)


def words(split, chars):
    return ["".join(chars.itos[c] for c in s) for s in split.src]


def test_g2p_vocabularies_and_sizes(g2p):
    splits, chars, phones = g2p
    n = sum(len(s) for s in splits.values())
    assert n > 100_000
    assert len(splits["valid"]) == len(splits["test"]) == int(n * 0.05)
    assert chars.itos[:2] == [D.PAD, D.UNK] and set(chars.itos[2:]) == set("abcdefghijklmnopqrstuvwxyz")
    assert phones.itos[:4] == [D.PAD, D.UNK, D.BOS, D.EOS]
    assert phones.stoi[D.BOS] == 2 and phones.stoi[D.EOS] == 3
    assert "AH0" in phones.stoi and "K" in phones.stoi
    for split in splits.values():
        assert len(split.src) == len(split.tgt)
        assert all(1 <= len(s) <= 16 for s in split.src)
        # targets come without <bos>/<eos> (the model adds them) and without padding
        assert all(t > 3 for s in split.tgt for t in s)


def test_g2p_splits_are_disjoint_by_word(g2p):
    splits, chars, phones = g2p
    by_split = {k: words(v, chars) for k, v in splits.items()}
    assert len(set(by_split["train"])) == len(by_split["train"])   # one pronunciation a word
    assert not set(by_split["train"]) & set(by_split["valid"])
    assert not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["valid"]) & set(by_split["test"])
    everywhere = {w: (k, i) for k, ws in by_split.items() for i, w in enumerate(ws)}
    k, i = everywhere["cat"]
    assert [phones.itos[p] for p in splits[k].tgt[i]] == ["K", "AE1", "T"]


def test_g2p_splits_are_seeded_and_limited(g2p):
    splits, chars, phones = g2p
    limited, chars_l, phones_l = D.g2p_splits(seed=0, max_train=500, max_eval=50)
    assert {k: len(v) for k, v in limited.items()} == {"train": 500, "valid": 50, "test": 50}
    # the limit cuts the same seeded order: a prefix of the full split (vocabularies are
    # built from the smaller train split, so compare decoded words)
    for k in limited:
        assert words(limited[k], chars_l) == words(splits[k], chars)[:len(limited[k])]
    other, chars_o, _ = D.g2p_splits(seed=1, max_train=500, max_eval=50)
    assert words(other["test"], chars_o) != words(limited["test"], chars_l)


def test_stress_tags_match_g2p_phonemes(g2p, stress):
    """Same seed, same word split: each stress example is its g2p target with the stress
    digits moved into tags ('-' for a consonant), as long as the phoneme sequence."""
    g2p_splits, _, phones = g2p
    splits, bare, tags = stress
    assert tags.itos == [D.PAD, D.UNK, cmudict.NO_STRESS, "0", "1", "2"]
    assert bare.itos[:2] == [D.PAD, D.UNK]
    assert not any(p[-1].isdigit() for p in bare.itos[2:])
    assert {k: len(v) for k, v in splits.items()} == {k: len(v) for k, v in g2p_splits.items()}
    for k, split in splits.items():
        assert all(len(s) == len(t) and len(s) >= 1 for s, t in zip(split.src, split.tgt))
        for i in range(0, len(split), 97):
            want = [cmudict.strip_stress(phones.itos[p]) for p in g2p_splits[k].tgt[i]]
            assert [bare.itos[p] for p in split.src[i]] == [b for b, _ in want]
            assert [tags.itos[t] for t in split.tgt[i]] == [s for _, s in want]
    assert cmudict.strip_stress("AH0") == ("AH", "0") and cmudict.strip_stress("K") == ("K", "-")


# ---------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------


def test_pad_batch():
    ids, lengths = D.pad_batch([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and ids.dtype == torch.int64
    assert lengths.tolist() == [3, 1, 2] and lengths.dtype == torch.int64
    ids, _ = D.pad_batch([[1], [2, 3]], pad_idx=-1)
    assert ids.tolist() == [[1, -1], [2, 3]]


@pytest.mark.parametrize("n,batch_size", [(1, 4), (13, 1), (97, 7), (1000, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_bucketed_indices_cover_every_index_once(n, batch_size, shuffle):
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 30, (n,), generator=gen).tolist()
    batches = D.bucketed_indices(lengths, batch_size, shuffle, torch.Generator().manual_seed(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= -(-n // (batch_size * 50))  # one short batch a chunk
    again = D.bucketed_indices(lengths, batch_size, shuffle, torch.Generator().manual_seed(0))
    assert again == batches
    if not shuffle:  # sorted by length within each chunk of 50 batches
        for s in range(0, n, batch_size * 50):
            chunk = flat[s:s + batch_size * 50]
            assert [lengths[i] for i in chunk] == sorted(lengths[i] for i in chunk)


def test_bucketed_indices_shuffle_and_padding():
    lengths = torch.randint(1, 60, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    a = D.bucketed_indices(lengths, 16, True, torch.Generator().manual_seed(0))
    b = D.bucketed_indices(lengths, 16, True, torch.Generator().manual_seed(1))
    assert a != b
    # bucketing pads far less than random batches would
    padded = sum(len(x) * max(lengths[i] for i in x) for x in a)
    assert padded < 1.2 * sum(lengths)
    assert D.bucketed_indices([], 4, True) == []
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        D.bucketed_indices(lengths, 0, False)


def test_seeded_split():
    parts = D.seeded_split(101, seed=3, valid=0.1, test=0.2)
    assert {k: len(v) for k, v in parts.items()} == {"train": 71, "valid": 10, "test": 20}
    assert sorted(parts["train"] + parts["valid"] + parts["test"]) == list(range(101))
    assert D.seeded_split(101, seed=3, valid=0.1, test=0.2) == parts
    with pytest.raises(ValueError, match="fractions summing below 1"):
        D.seeded_split(10, 0, valid=0.5, test=0.5)


# ---------------------------------------------------------------------------------
# Dataset.subset
# ---------------------------------------------------------------------------------


def test_dataset_subset_keeps_the_first_examples(reviews, msft):
    splits, vocab = reviews
    ds = Dataset(splits, {"vocab.json": vocab}, {"data": "reviews"})
    small = ds.subset(7)
    assert {k: len(v) for k, v in small.splits.items()} == {"train": 7, "valid": 7, "test": 7}
    assert small.splits["train"].ids == splits["train"].ids[:7]
    assert torch.equal(small.splits["test"].labels, splits["test"].labels[:7])
    assert small.vocabs is ds.vocabs
    assert small.info == {"data": "reviews", "limit": 7, "sizes": {"train": 7, "valid": 7, "test": 7}}
    assert len(ds.splits["train"]) == 10248  # the original is untouched

    prices = Dataset(msft[0], {}).subset(3)
    assert prices.splits["valid"].x.shape == (3, 30, 5)
    assert torch.equal(prices.splits["valid"].baseline, torch.zeros(3))
    digits = Dataset({"train": D.TensorSplit(torch.rand(5, 2, 2), torch.arange(5))}, {})
    assert digits.subset(2).splits["train"].baseline is None   # absent fields stay absent
    assert len(digits.subset(100).splits["train"]) == 5          # a limit past the size keeps all
    pairs = Dataset({"train": D.PairSplit([[1], [2, 3], [4]], [[5], [6, 7], [8]])}, {}).subset(2)
    assert pairs.splits["train"].tgt == [[5], [6, 7]]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        ds.subset(0)
