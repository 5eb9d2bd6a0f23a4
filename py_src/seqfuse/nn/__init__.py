"""Drop-in modules on seqfuse's fused kernels."""
from .convert import convert
from .rnn import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "convert"]
