"""Drop-in modules on seqfuse's fused kernels."""
from .convert import convert
from .rnn import LSTM

__all__ = ["LSTM", "convert"]
