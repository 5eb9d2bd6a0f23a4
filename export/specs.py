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

Nested inputs: an example argument may be a tuple or list of tensors (nested to any
depth), e.g. `forward(enc_X, dec_X, *args)` or `forward(x, (h0, c0))`. Its tensors are
the graph's inputs, flattened in order (depth first, torch.utils._pytree's order, which
is how ONNX and torch.export flatten them): input_names names those leaves, and
dynamic_axes gives one {axis: dim name} per leaf, as a list in the same order or as a
dict keyed by leaf name (a leaf it omits is static). Outputs are flattened the same way:
output_names names the leaves of what forward returns. torch.export's dynamic_shapes are
re-nested to mirror the arguments as forward's signature binds them (the extra positional
arguments of `*args` form one tuple), and parity inputs are drawn per leaf and re-nested.
"""
from __future__ import annotations

import inspect
import re

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

MAX_DIM = 1 << 16  # upper bound of a dynamic dimension, where the model sets none

MakeInputs = Callable[[int, int, torch.Generator, bool], tuple]


class ExportError(RuntimeError):
    """A graph could not be exported (e.g. an op with no ONNX translation, or inputs that
    do not match their names and axes); nothing was written."""


class ExportSpecError(ExportError, ValueError, TypeError):
    """Example inputs, names or axes that do not describe each other: an ExportError, and
    the ValueError / TypeError that seqfuse.export raised for them before."""


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
    # How the flat graph inputs (input_names' order) nest into forward's arguments
    # (a pytree TreeSpec); None: one tensor per argument.
    input_tree: pytree.TreeSpec | None = None

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

    def dynamic_shapes(self, module: nn.Module | None = None) -> tuple:
        """torch.export's dynamic_shapes: one {axis: Dim} per input, nested as the inputs
        nest, and grouped as `module.forward`'s signature binds the arguments (torch.export
        matches dynamic_shapes to the bound parameters: `*args` is one tuple)."""
        dims = self.dims()
        flat = [{ax: dims[name] for ax, name in axes.items()} for axes in self.dynamic_axes]
        shapes = tuple(flat) if self.input_tree is None else tuple(pytree.tree_unflatten(flat, self.input_tree))
        if module is None:
            return shapes
        try:
            bound = inspect.signature(module.forward).bind(*shapes)
        except TypeError as exc:
            raise ExportSpecError(f"example_inputs ({len(shapes)} arguments) do not fit "
                                  f"{type(module).__name__}.forward{inspect.signature(module.forward)}: "
                                  f"{exc}") from exc
        return tuple(bound.arguments.values())

    def flatten(self, inputs) -> list:
        """The graph's inputs (input_names' order) of nested model inputs."""
        return list(inputs) if self.input_tree is None else pytree.tree_leaves(inputs)

    def nest(self, leaves) -> tuple:
        """Model inputs (forward's arguments) of the flat graph inputs."""
        return tuple(leaves) if self.input_tree is None else tuple(pytree.tree_unflatten(list(leaves), self.input_tree))

    @staticmethod
    def from_example(example_inputs: tuple, input_names: list[str], output_names: list[str],
                     dynamic_axes: list[dict[int, str]] | dict[str, dict[int, str]],
                     output_axes: list[dict[int, str]] | None = None,
                     top1_outputs: tuple[str, ...] = ()) -> "ExportSpec":
        """A spec for any model, from one example (its arguments may nest tensors in
        tuples and lists: see the module docstring for how the leaves are named). New
        inputs resize the axes named "batch" and "time" (any other dynamic axis gets
        length + 1 + its rank among those names, clamped to max_length: sizes the
        example did not have, and distinct from "time") and draw values like the
        example's (floats: normal with its mean/std; integers: uniform in its [min, max]).
        An integer input that counts a dynamic axis (it has no such axis of its own, and
        is named like lengths, valid_lens, src_lengths or seq_lens, or its example values
        lie in [1, n] with a full row, n the size of a dynamic axis) gets values in
        [1, new n], one of them n: lengths and valid_lens stay valid at every new length
        (a key length of 1 had broken valid_lens drawn from the example's [min, max])."""
        if not isinstance(example_inputs, tuple):
            raise ExportSpecError(f"example_inputs must be a tuple (forward's arguments), got "
                                  f"{type(example_inputs).__name__}")
        paths, tree = pytree.tree_flatten_with_path(example_inputs)
        where = [f"example_inputs{pytree.keystr(path)}" for path, _ in paths]
        leaves = [leaf for _, leaf in paths]
        for at, leaf in zip(where, leaves):
            if not isinstance(leaf, Tensor):
                raise ExportSpecError(f"{at} is {type(leaf).__name__}: every argument must be a tensor, "
                                      "or a tuple/list (or dict) of them")
        if not isinstance(input_names, (list, tuple)) or not all(isinstance(n, str) and n for n in input_names):
            raise ExportSpecError("input_names must be a list of non-empty strings, one per input tensor")
        if len(input_names) != len(leaves):
            raise ExportSpecError(f"input_names has {len(input_names)} names for {len(leaves)} example input "
                                  f"tensors: name every tensor, nested ones too, in this order: "
                                  f"{', '.join(where)}")
        if len(set(input_names)) != len(input_names):
            dup = sorted({n for n in input_names if list(input_names).count(n) > 1})
            raise ExportSpecError(f"input_names must be distinct, got {dup} more than once")
        if isinstance(dynamic_axes, dict):
            unknown = [k for k in dynamic_axes if k not in input_names]
            if unknown:
                raise ExportSpecError(f"dynamic_axes names {unknown}, which are not input_names "
                                      f"{list(input_names)}")
            dynamic_axes = [dict(dynamic_axes.get(n) or {}) for n in input_names]
        dynamic_axes = list(dynamic_axes)
        if len(dynamic_axes) != len(leaves):
            raise ExportSpecError(f"dynamic_axes has {len(dynamic_axes)} entries for {len(leaves)} input "
                                  f"tensors {list(input_names)}: one {{axis: name}} per tensor (or a dict "
                                  "keyed by input name)")
        for name, at, x, axes in zip(input_names, where, leaves, dynamic_axes):
            if not isinstance(axes, dict) or not all(
                    isinstance(a, int) and 0 <= a < x.dim() and isinstance(d, str) and d for a, d in axes.items()):
                raise ExportSpecError(f"dynamic_axes of '{name}' ({at}, shape {tuple(x.shape)}) must map "
                                      f"axes in [0, {x.dim()}) to dimension names, got {axes!r}")
        nested = any(len(path) != 1 for path, _ in paths) or len(leaves) != len(example_inputs)
        counted = [_counted_axis(name, x, axes, leaves, dynamic_axes)
                   for name, x, axes in zip(input_names, leaves, dynamic_axes)]
        others = sorted({d for axes in dynamic_axes for d in axes.values()} - {"batch", "time"})

        def size(dim: str, batch: int, length: int, max_length: int) -> int:
            if dim == "batch":
                return batch
            if dim == "time":
                return length
            return min(max_length, length + 1 + others.index(dim))

        def make(batch: int, length: int, gen: torch.Generator, mixed_padding: bool):
            out = []
            for x, axes, count in zip(leaves, dynamic_axes, counted):
                shape = [size(axes[i], batch, length, spec.max_length) if i in axes else s
                         for i, s in enumerate(x.shape)]
                if x.is_floating_point():
                    std = float(x.float().std()) if x.numel() > 1 else 1.0
                    out.append((torch.randn(shape, generator=gen) * std + float(x.float().mean())).to(x.dtype))
                elif count is not None:
                    out.append(_counts(shape, size(count, batch, length, spec.max_length), gen,
                                       mixed_padding).to(x.dtype))
                else:
                    lo, hi = int(x.min()), int(x.max())
                    out.append(torch.randint(lo, hi + 1, shape, generator=gen).to(x.dtype))
            return tuple(out) if not nested else tuple(pytree.tree_unflatten(out, tree))

        spec = ExportSpec(list(input_names), list(output_names), dynamic_axes,
                          list(output_axes or [{0: "batch"} for _ in output_names]), make,
                          top1_outputs=tuple(top1_outputs), has_lengths=any(c is not None for c in counted),
                          input_tree=tree if nested else None)
        return spec


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


def _counted_axis(name: str, x: Tensor, axes: dict, leaves: list, dynamic_axes: list) -> str | None:
    """The dynamic axis whose positions an input counts (lengths, valid_lens), or None: an
    integer tensor without dynamic axes other than "batch", named like a count or whose
    example values lie in [1, n] with one equal to n, n the example size of a dynamic
    axis (the one it matches; "time" where a name alone says it counts)."""
    if x.is_floating_point() or x.dtype == torch.bool or x.numel() == 0 or set(axes.values()) - {"batch"}:
        return None
    sizes: dict[str, set[int]] = {}
    for t, a in zip(leaves, dynamic_axes):
        for i, d in a.items():
            if d != "batch":
                sizes.setdefault(d, set()).add(t.shape[i])
    lo, hi = int(x.min()), int(x.max())
    matching = [d for d in sorted(sizes) if hi in sizes[d]] if lo >= 1 else []
    if len(matching) > 1 and "time" in matching:
        matching = ["time"]
    if len(matching) == 1:
        return matching[0]
    if _COUNT_NAMES.search(name) and sizes:
        return "time" if "time" in sizes else sorted(sizes)[0]
    return None


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
