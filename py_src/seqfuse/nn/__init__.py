"""Drop-in modules on seqfuse's fused kernels."""
from .convert import convert
from .rnn import GRU, LSTM

__all__ = ["GRU", "LSTM", "convert"]
