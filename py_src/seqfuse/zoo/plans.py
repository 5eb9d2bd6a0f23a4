"""The zoo models' export plans (seqfuse.export.specs): the graphs each model becomes and
the inputs its parity checks draw. Each zoo class's `export_plan()` calls one of these, so
the export stage itself knows no zoo class."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from seqfuse.export.specs import MAX_DIM, ExportPart, ExportPlan, ExportSpec, random_lengths

from .models.seq2seq import BOS_ID, EOS_ID


def _token_inputs(vocab_size: int, pad_idx: int):
    def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
        ids[ids == pad_idx] = (pad_idx + 1) % vocab_size
        lengths = random_lengths(batch, length, gen, mixed_padding)
        ids[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = pad_idx
        return ids, lengths
    return make


def _dense_inputs(features: int, scale: float = 1.0, positive: bool = False):
    def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
        x = torch.randn(batch, length, features, generator=gen) * scale
        return (x.abs() if positive else x,)
    return make


_TOKENS_IN = dict(input_names=["input_ids", "lengths"], dynamic_axes=[{0: "batch", 1: "time"}, {0: "batch"}])


def _single(model: nn.Module, spec: ExportSpec) -> ExportPlan:
    return ExportPlan([ExportPart("model", model, spec)])


def classifier_plan(model: nn.Module, outputs=("logits",)) -> ExportPlan:
    """(input_ids [B, T], lengths [B]) -> logits [B, C] (and attention weights [B, T])."""
    c = model.config
    out_axes = {"logits": {0: "batch"}, "attention_weights": {0: "batch", 1: "time"}}
    return _single(model, ExportSpec(
        **_TOKENS_IN, output_names=list(outputs), output_axes=[out_axes[o] for o in outputs],
        make_inputs=_token_inputs(c["vocab_size"], c["pad_idx"]), top1_outputs=("logits",),
        max_length=c.get("max_len", MAX_DIM)))


def tagger_plan(model: nn.Module) -> ExportPlan:
    """(input_ids [B, T], lengths [B]) -> logits [B, T, C]."""
    c = model.config
    return _single(model, ExportSpec(
        **_TOKENS_IN, output_names=["logits"], output_axes=[{0: "batch", 1: "time"}],
        make_inputs=_token_inputs(c["vocab_size"], c["pad_idx"]), top1_outputs=("logits",)))


def rows_plan(model: nn.Module) -> ExportPlan:
    """images [B, rows, cols] (non-negative) -> logits [B, C]."""
    return _single(model, ExportSpec(
        ["images"], ["logits"], [{0: "batch", 1: "time"}], [{0: "batch"}],
        _dense_inputs(model.config["cols"], positive=True), top1_outputs=("logits",),
        has_lengths=False))


def regressor_plan(model: nn.Module) -> ExportPlan:
    """features [B, T, F] -> prediction [B]."""
    return _single(model, ExportSpec(
        ["features"], ["prediction"], [{0: "batch", 1: "time"}], [{0: "batch"}],
        _dense_inputs(model.config["num_features"], scale=0.02), has_lengths=False))


class Seq2SeqEncoder(nn.Module):
    """The encoder graph: (src_ids [B, S], src_lengths [B]) -> (memory [B, S, 2H],
    memory_keys [B, S, A], state [B, H])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_lengths: Tensor):
        memory, keys, _, state = self.model.encode(src_ids, src_lengths)
        return memory, keys, state


class Seq2SeqDecoderStep(nn.Module):
    """The one-step decoder graph: (prev_tokens [B], state [B, H], memory, memory_keys,
    src_lengths) -> (logits [B, V], next_state [B, H], attention_weights [B, S])."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prev_tokens: Tensor, state: Tensor, memory: Tensor, memory_keys: Tensor,
                src_lengths: Tensor):
        return self.model.step(prev_tokens, state, memory, memory_keys, src_lengths)


def seq2seq_plan(model) -> ExportPlan:
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
    return ExportPlan([ExportPart("encoder", encoder, enc), ExportPart("decoder", decoder, dec)],
                      split_inputs, decoding={"bos_id": BOS_ID, "eos_id": EOS_ID,
                                              "max_len": c["max_decode_len"]})


