"""Drop-in modules on seqfuse's fused kernels."""
from .attention import AdditiveAttention, DotProductAttention, MultiheadAttention
from .convert import convert, to_torch
from .rnn import GRU, LSTM, RNN, serving_trace
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["GRU", "LSTM", "RNN", "AdditiveAttention", "DotProductAttention", "MultiheadAttention",
           "TransformerEncoder", "TransformerEncoderLayer", "convert", "serving_trace", "to_torch"]
