"""The model zoo: classic sequence models built on seqfuse layers."""
from .classifier import LSTMClassifier

# name -> class, for checkpoints and the CLI
MODELS = {"lstm-classifier": LSTMClassifier}

__all__ = ["LSTMClassifier", "MODELS"]
