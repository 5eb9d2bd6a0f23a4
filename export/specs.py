"""How to export a model: which graphs (parts) it becomes, their input/output names,
dynamic dimensions, and a generator of inputs at any batch size and length (for tracing
and for the parity checks).

A model declares its plan itself: an `export_plan()` method returning an ExportPlan (the
zoo's models have one, in seqfuse.zoo.plans), or a function registered for its class
with `register_plan`. The export stage knows no model class. Most models are one graph,
"model"; an encoder-decoder can be two, an "encoder" run once per input and a one-step
"decoder" whose state is explicit inputs and outputs, so that a serving loop
(onnxruntime, Triton) can decode around it.

Any other model (e.g. one built from torch.nn layers) is described by
`ExportSpec.from_example(example_inputs, input_names, output_names, dynamic_axes)`.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

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
        mean/std; integers: uniform in its [min, max]). An integer input that counts the
        time axis (it has no time axis of its own, and is named like lengths, valid_lens,
        src_lengths or seq_lens, or its example values lie in [1, T] with a full row)
        gets values in [1, new T], one of them T: lengths and valid_lens stay valid at
        every new length (a key length of 1 had broken valid_lens drawn from the example's
        [min, max])."""
        if not isinstance(example_inputs, tuple) or not all(isinstance(t, Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a tuple of tensors")
        if len(input_names) != len(example_inputs):
            raise ValueError(f"input_names has {len(input_names)} names for {len(example_inputs)} example inputs")
        counts = [_counts_time(name, x, axes, example_inputs, dynamic_axes)
                  for name, x, axes in zip(input_names, example_inputs, dynamic_axes)]

        def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
            out = []
            for x, axes, count in zip(example_inputs, dynamic_axes, counts):
                shape = [batch if axes.get(i) == "batch" else length if axes.get(i) == "time" else s
                         for i, s in enumerate(x.shape)]
                if x.is_floating_point():
                    std = float(x.float().std()) if x.numel() > 1 else 1.0
                    out.append((torch.randn(shape, generator=gen) * std + float(x.float().mean())).to(x.dtype))
                elif count:
                    out.append(_counts(shape, length, gen, mixed_padding).to(x.dtype))
                else:
                    lo, hi = int(x.min()), int(x.max())
                    out.append(torch.randint(lo, hi + 1, shape, generator=gen).to(x.dtype))
            return tuple(out)

        return ExportSpec(list(input_names), list(output_names), list(dynamic_axes),
                          list(output_axes or [{0: "batch"} for _ in output_names]), make,
                          top1_outputs=tuple(top1_outputs), has_lengths=any(counts))


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
    # An encoder + one-step decoder pair decoded greedily (parts "encoder" and "decoder",
    # the model has greedy_decode): {"bos_id": int, "eos_id": int, "max_len": int}. The
    # exporter then checks onnxruntime's decoding against eager token for token, and
    # records these in the manifest for OrtModel.greedy_decode.
    decoding: dict | None = None


_COUNT_NAMES = re.compile(r"(^|_)(lengths?|lens?|valid_lens?|seq_lens?|sequence_lengths?)$")


def _counts_time(name: str, x: Tensor, axes: dict, example_inputs: tuple, dynamic_axes: list) -> bool:
    """Whether an input holds counts of the time axis (lengths, valid_lens), by name or by
    its values, when it is an integer tensor without a time axis of its own."""
    if x.is_floating_point() or x.dtype == torch.bool or x.numel() == 0 or "time" in axes.values():
        return False
    if _COUNT_NAMES.search(name):
        return True
    times = {t.shape[i] for t, a in zip(example_inputs, dynamic_axes) for i, n in a.items() if n == "time"}
    lo, hi = int(x.min()), int(x.max())
    return lo >= 1 and hi in times


def _counts(shape: list[int], length: int, gen: torch.Generator, mixed: bool) -> Tensor:
    """Counts in [1, length] (mixed; the first element full) or all `length`."""
    if not mixed:
        return torch.full(shape, length, dtype=torch.long)
    values = torch.randint(1, length + 1, shape, generator=gen)
    values.view(-1)[:1] = length
    return values


def random_lengths(batch: int, length: int, gen: torch.Generator, mixed: bool) -> Tensor:
    """Row lengths [B] in [1, length] (mixed, the first row full) or all `length`."""
    if mixed and batch > 1:
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        lengths[0] = length  # the longest row sets the batch's width
        return lengths
    return torch.full((batch,), length, dtype=torch.long)


# Plans of model classes that cannot carry an `export_plan` method (third-party classes):
# type -> function(model) -> ExportPlan. Looked up along the class's MRO.
_PLANS: dict[type, Callable[[nn.Module], "ExportPlan"]] = {}


def register_plan(cls: type, make_plan: Callable[[nn.Module], "ExportPlan"]) -> None:
    """Give every instance of `cls` (and of its subclasses) the plan `make_plan(model)`."""
    if not isinstance(cls, type) or not callable(make_plan):
        raise TypeError("register_plan(cls, make_plan) takes a class and a callable")
    _PLANS[cls] = make_plan


def plan_for(model: nn.Module) -> ExportPlan:
    """The export plan a model declares: its `export_plan()` method (the zoo's models have
    one, and so do the models seqfuse.nn.to_torch makes of them: same classes), else a
    plan registered for its class with `register_plan`."""
    make = getattr(model, "export_plan", None)
    if callable(make):
        plan = make()
    else:
        found = next((_PLANS[c] for c in type(model).__mro__ if c in _PLANS), None)
        if found is None:
            raise TypeError(f"seqfuse.export has no export plan for {type(model).__name__}; pass "
                            "example_inputs with input_names, output_names and dynamic_axes (or an "
                            "ExportSpec), give the class an export_plan() method, or register one "
                            "with seqfuse.export.register_plan")
        plan = found(model)
    if not isinstance(plan, ExportPlan):
        raise TypeError(f"the export plan of {type(model).__name__} must be an ExportPlan, got "
                        f"{type(plan).__name__}")
    return plan


def spec_for(model: nn.Module) -> ExportSpec:
    """The spec of a single-graph zoo model."""
    plan = plan_for(model)
    if len(plan.parts) != 1:
        raise TypeError(f"{type(model).__name__} exports as {len(plan.parts)} graphs "
                        f"({', '.join(p.name for p in plan.parts)}): use plan_for")
    return plan.parts[0].spec
