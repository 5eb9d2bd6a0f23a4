"""The model zoo: classic sequence models built on seqfuse layers, by name (the names the
CLI and checkpoints use)."""
from .classifier import (AttentionPooling, BiGRUClassifier, BiLSTMAttention, BiLSTMClassifier,
                         LSTMClassifier, TransformerClassifier)
from .seq2seq import Seq2SeqAttention
from .sequence import LSTMRegressor, LSTMRows, LSTMTagger

# name -> class; a checkpoint's config.json names one of these
MODELS = {
    "lstm-classifier": LSTMClassifier,
    "bilstm-classifier": BiLSTMClassifier,
    "bilstm-attention": BiLSTMAttention,
    "bigru-classifier": BiGRUClassifier,
    "transformer-classifier": TransformerClassifier,
    "lstm-rows": LSTMRows,
    "lstm-regressor": LSTMRegressor,
    "lstm-tagger": LSTMTagger,
    "seq2seq-attention": Seq2SeqAttention,
}

__all__ = ["MODELS", "AttentionPooling", "BiGRUClassifier", "BiLSTMAttention", "BiLSTMClassifier",
           "LSTMClassifier", "LSTMRegressor", "LSTMRows", "LSTMTagger", "Seq2SeqAttention",
           "TransformerClassifier"]
