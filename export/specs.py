"""How to export each kind of model: input/output names, dynamic dimensions, and a
generator of inputs at any batch size and length (for tracing and parity checks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from seqfuse.models import LSTMClassifier


@dataclass
class ExportSpec:
    input_names: list[str]
    output_names: list[str]
    # per input: {axis: name} of its dynamic dimensions
    dynamic_axes: list[dict[int, str]]
    # make_inputs(batch, length, generator, mixed_padding) -> inputs tuple
    make_inputs: Callable[[int, int, torch.Generator, bool], tuple[Tensor, ...]]
    is_classifier: bool = True


def _token_inputs(vocab_size: int, pad_idx: int):
    def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
        ids[ids == pad_idx] = (pad_idx + 1) % vocab_size
        if mixed_padding and batch > 1:
            lengths = torch.randint(1, length + 1, (batch,), generator=gen)
            lengths[0] = length  # keep the longest row at full length
        else:
            lengths = torch.full((batch,), length, dtype=torch.long)
        ids[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = pad_idx
        return ids, lengths
    return make


def spec_for(model: nn.Module) -> ExportSpec:
    if isinstance(model, LSTMClassifier):
        c = model.config
        return ExportSpec(
            input_names=["input_ids", "lengths"],
            output_names=["logits"],
            dynamic_axes=[{0: "batch", 1: "time"}, {0: "batch"}],
            make_inputs=_token_inputs(c["vocab_size"], c["pad_idx"]),
        )
    raise TypeError(f"seqfuse.export has no export spec for {type(model).__name__}; "
                    "pass an ExportSpec explicitly")
