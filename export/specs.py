"""How to export each model: which graphs (parts) it becomes, their input/output names,
dynamic dimensions, and a generator of inputs at any batch size and length (for tracing
and for the parity checks).

Most models are one graph, "model". `seq2seq-attention` is two: an "encoder" run once per
input and a one-step "decoder" whose attention state (decoder state, encoder memory and
its projected keys, source lengths) is explicit inputs and outputs, so that a serving
loop (onnxruntime, Triton) can run greedy or beam decoding around it.

A model the zoo does not know (e.g. one built from torch.nn layers) is described by
`ExportSpec.from_example(example_inputs, input_names, output_names, dynamic_axes)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from seqfuse.models import (BiGRUClassifier, BiLSTMAttention, BiLSTMClassifier, LSTMClassifier,
                            LSTMRegressor, LSTMRows, LSTMTagger, Seq2SeqAttention,
                            TransformerClassifier)

MAX_DIM = 1 << 16  # upper bound of a dynamic dimension, where the model sets none

MakeInputs = Callable[[int, int, torch.Generator, bool], tuple]


@dataclass
class ExportSpec:
    """One exported graph's interface.

    make_inputs(batch, length, generator, mixed_padding) -> an input tuple with that
    batch size and sequence length; with mixed_padding every row gets its own length
    (the first keeps the full length, so the batch's width is `length`).
    """
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: list[dict[int, str]]   # per input: {axis: dim name}
    output_axes: list[dict[int, str]]    # per output: {axis: dim name}
    make_inputs: MakeInputs
    top1_outputs: tuple[str, ...] = ()   # class scores: top-1 agreement is reported
    has_lengths: bool = True             # a lengths input: mixed padding is a distinct case
    max_length: int = MAX_DIM            # largest "time" the graph supports

    def __post_init__(self):
        if len(self.dynamic_axes) != len(self.input_names):
            raise ValueError(f"dynamic_axes has {len(self.dynamic_axes)} entries for "
                             f"{len(self.input_names)} inputs {self.input_names}")
        if len(self.output_axes) != len(self.output_names):
            raise ValueError(f"output_axes has {len(self.output_axes)} entries for "
                             f"{len(self.output_names)} outputs {self.output_names}")

    def dims(self) -> dict[str, "torch.export.Dim"]:
        """One torch.export.Dim per dynamic dimension name."""
        names = {n for axes in self.dynamic_axes for n in axes.values()}
        return {n: torch.export.Dim(n, min=1, max=self.max_length if n in ("time", "src_time") else MAX_DIM)
                for n in sorted(names)}

    def dynamic_shapes(self) -> tuple:
        dims = self.dims()
        return tuple({ax: dims[name] for ax, name in axes.items()} for axes in self.dynamic_axes)

    @staticmethod
    def from_example(example_inputs: tuple, input_names: list[str], output_names: list[str],
                     dynamic_axes: list[dict[int, str]], output_axes: list[dict[int, str]] | None = None,
                     top1_outputs: tuple[str, ...] = ()) -> "ExportSpec":
        """A spec for any model, from one example: new inputs resize the axes named
        "batch" and "time" and draw values like the example's (floats: normal with its
        mean/std; integers: uniform in its [min, max]; an input named "lengths": row
        lengths in [1, time])."""
        if not isinstance(example_inputs, tuple) or not all(isinstance(t, Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a tuple of tensors")
        if len(input_names) != len(example_inputs):
            raise ValueError(f"input_names has {len(input_names)} names for {len(example_inputs)} example inputs")
        lengths_at = input_names.index("lengths") if "lengths" in input_names else None

        def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
            out = []
            for x, axes in zip(example_inputs, dynamic_axes):
                shape = [batch if axes.get(i) == "batch" else length if axes.get(i) == "time" else s
                         for i, s in enumerate(x.shape)]
                if x.is_floating_point():
                    std = float(x.float().std()) if x.numel() > 1 else 1.0
                    out.append((torch.randn(shape, generator=gen) * std + float(x.float().mean())).to(x.dtype))
                else:
                    lo, hi = int(x.min()), int(x.max())
                    out.append(torch.randint(lo, hi + 1, shape, generator=gen).to(x.dtype))
            if lengths_at is not None:
                out[lengths_at] = _lengths(batch, length, gen, mixed_padding).to(example_inputs[lengths_at].dtype)
            return tuple(out)

        return ExportSpec(list(input_names), list(output_names), list(dynamic_axes),
                          list(output_axes or [{0: "batch"} for _ in output_names]), make,
                          top1_outputs=tuple(top1_outputs), has_lengths=lengths_at is not None)


@dataclass
class ExportPart:
    """One graph to export: `module(*inputs)` computes it in eager PyTorch."""
    name: str               # file stem: model, encoder, decoder
    module: nn.Module
    spec: ExportSpec


@dataclass
class ExportPlan:
    parts: list[ExportPart]
    # held-out model inputs (as the task batches them) -> one input tuple per part
    split_inputs: Callable[[tuple], list[tuple]] = field(default=lambda inputs: [inputs])


def _lengths(batch: int, length: int, gen: torch.Generator, mixed: bool) -> Tensor:
    if mixed and batch > 1:
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        lengths[0] = length  # the longest row sets the batch's width
        return lengths
    return torch.full((batch,), length, dtype=torch.long)


def _token_inputs(vocab_size: int, pad_idx: int):
    def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
        ids[ids == pad_idx] = (pad_idx + 1) % vocab_size
        lengths = _lengths(batch, length, gen, mixed_padding)
        ids[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = pad_idx
        return ids, lengths
    return make


def _dense_inputs(features: int, scale: float = 1.0, positive: bool = False):
    def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        x = torch.randn(batch, length, features, generator=gen) * scale
        return (x.abs() if positive else x,)
    return make


_TOKENS_IN = dict(input_names=["input_ids", "lengths"], dynamic_axes=[{0: "batch", 1: "time"}, {0: "batch"}])


def _classifier(model: nn.Module, outputs=("logits",)) -> ExportSpec:
    c = model.config
    out_axes = {"logits": {0: "batch"}, "attention_weights": {0: "batch", 1: "time"}}
    return ExportSpec(**_TOKENS_IN, output_names=list(outputs), output_axes=[out_axes[o] for o in outputs],
                      make_inputs=_token_inputs(c["vocab_size"], c["pad_idx"]), top1_outputs=("logits",),
                      max_length=c.get("max_len", MAX_DIM))


class Seq2SeqEncoder(nn.Module):
    """The encoder graph: (src_ids [B, S], src_lengths [B]) -> (memory [B, S, 2H],
    memory_keys [B, S, A], state [B, H])."""

    def __init__(self, model: Seq2SeqAttention):
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_lengths: Tensor):
        memory, keys, _, state = self.model.encode(src_ids, src_lengths)
        return memory, keys, state


class Seq2SeqDecoderStep(nn.Module):
    """The one-step decoder graph: (prev_tokens [B], state [B, H], memory, memory_keys,
    src_lengths) -> (logits [B, V], next_state [B, H], attention_weights [B, S])."""

    def __init__(self, model: Seq2SeqAttention):
        super().__init__()
        self.model = model

    def forward(self, prev_tokens: Tensor, state: Tensor, memory: Tensor, memory_keys: Tensor,
                src_lengths: Tensor):
        return self.model.step(prev_tokens, state, memory, memory_keys, src_lengths)


def _seq2seq_plan(model: Seq2SeqAttention) -> ExportPlan:
    c = model.config
    encoder, decoder = Seq2SeqEncoder(model), Seq2SeqDecoderStep(model)
    make_src = _token_inputs(c["src_vocab_size"], 0)

    def decoder_inputs(src_ids: Tensor, src_lengths: Tensor, prev_tokens: Tensor) -> tuple:
        # The decoder is checked on states the encoder really produces.
        with torch.no_grad():
            memory, keys, state = encoder(src_ids, src_lengths)
        return prev_tokens, state, memory, keys, src_lengths

    def make_decoder(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        src_ids, src_lengths = make_src(batch, length, gen, mixed_padding)
        prev = torch.randint(0, c["tgt_vocab_size"], (batch,), generator=gen)
        return decoder_inputs(src_ids, src_lengths, prev)

    def split_inputs(inputs: tuple) -> list[tuple]:
        src_ids, src_lengths, tgt_in = inputs  # a teacher-forcing batch
        return [(src_ids, src_lengths), decoder_inputs(src_ids, src_lengths, tgt_in[:, min(1, tgt_in.shape[1] - 1)])]

    src = {0: "batch", 1: "src_time"}
    enc = ExportSpec(["src_ids", "src_lengths"], ["memory", "memory_keys", "state"],
                     [src, {0: "batch"}], [src, src, {0: "batch"}], make_src)
    dec = ExportSpec(["prev_tokens", "state", "memory", "memory_keys", "src_lengths"],
                     ["logits", "next_state", "attention_weights"],
                     [{0: "batch"}, {0: "batch"}, src, src, {0: "batch"}],
                     [{0: "batch"}, {0: "batch"}, src], make_decoder, top1_outputs=("logits",))
    return ExportPlan([ExportPart("encoder", encoder, enc), ExportPart("decoder", decoder, dec)], split_inputs)


def plan_for(model: nn.Module) -> ExportPlan:
    """The export plan of a zoo model (by class). Models built with torch.nn layers by
    seqfuse.nn.to_torch are the same classes, so they get the same plan."""
    if isinstance(model, BiLSTMAttention):
        return ExportPlan([ExportPart("model", model, _classifier(model, ("logits", "attention_weights")))])
    if isinstance(model, (LSTMClassifier, BiLSTMClassifier, BiGRUClassifier, TransformerClassifier)):
        return ExportPlan([ExportPart("model", model, _classifier(model))])
    if isinstance(model, LSTMTagger):
        c = model.config
        spec = ExportSpec(**_TOKENS_IN, output_names=["logits"], output_axes=[{0: "batch", 1: "time"}],
                          make_inputs=_token_inputs(c["vocab_size"], c["pad_idx"]), top1_outputs=("logits",))
        return ExportPlan([ExportPart("model", model, spec)])
    if isinstance(model, LSTMRows):
        spec = ExportSpec(["images"], ["logits"], [{0: "batch", 1: "time"}], [{0: "batch"}],
                          _dense_inputs(model.config["cols"], positive=True), top1_outputs=("logits",),
                          has_lengths=False)
        return ExportPlan([ExportPart("model", model, spec)])
    if isinstance(model, LSTMRegressor):
        spec = ExportSpec(["features"], ["prediction"], [{0: "batch", 1: "time"}], [{0: "batch"}],
                          _dense_inputs(model.config["num_features"], scale=0.02), has_lengths=False)
        return ExportPlan([ExportPart("model", model, spec)])
    if isinstance(model, Seq2SeqAttention):
        return _seq2seq_plan(model)
    raise TypeError(f"seqfuse.export has no export plan for {type(model).__name__}; pass "
                    "example_inputs with input_names, output_names and dynamic_axes (or an ExportSpec)")


def spec_for(model: nn.Module) -> ExportSpec:
    """The spec of a single-graph zoo model."""
    plan = plan_for(model)
    if len(plan.parts) != 1:
        raise TypeError(f"{type(model).__name__} exports as {len(plan.parts)} graphs "
                        f"({', '.join(p.name for p in plan.parts)}): use plan_for")
    return plan.parts[0].spec
