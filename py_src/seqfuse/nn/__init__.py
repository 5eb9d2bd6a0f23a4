"""Drop-in modules on seqfuse's fused kernels."""
from .attention import AdditiveAttention, DotProductAttention, MultiheadAttention
from .convert import (ConversionError, ConversionHandle, ConversionWarning, convert,
                      register_conversion, to_torch, unregister_conversion)
from .quantized import QuantizedGRU, QuantizedLSTM, quantize_dynamic
from .rnn import GRU, LSTM, RNN, serving_trace
from .textbook import AdditivePooling
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["GRU", "LSTM", "RNN", "AdditiveAttention", "AdditivePooling", "ConversionError",
           "ConversionHandle", "ConversionWarning", "DotProductAttention", "MultiheadAttention",
           "QuantizedGRU", "QuantizedLSTM", "quantize_dynamic",
           "TransformerEncoder", "TransformerEncoderLayer", "convert", "register_conversion",
           "serving_trace", "to_torch", "unregister_conversion"]
