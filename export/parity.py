"""Parity of exported formats with the eager model, over many shapes and lengths.

The criterion, per element: |exported - eager| <= atol * max(1, |eager|). For outputs of
magnitude <= 1 (probabilities, attention weights, recurrent states) that is the absolute
bound atol; above, it is relative: float32 carries 24 bits, so a logit of 20 is only
known to 2e-6, and two correct GEMMs that sum in different orders (onnxruntime's MLAS and
torch's) differ by a few of those units (1.9e-5 on trained seq2seq keys of magnitude 20,
seen). max_abs is reported as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree


@dataclass
class ParityRow:
    part: str
    format: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    top1_agree: float | None
    passed: bool
    max_scaled: float = 0.0  # max |diff| / max(1, |eager|): what atol bounds


@dataclass
class SequenceCheck:
    """An end-to-end check over whole sequences, e.g. greedy decoding in onnxruntime
    against eager greedy decoding, token for token."""
    name: str
    rows: int
    identical: int
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.rows > 0 and self.identical == self.rows


@dataclass
class ParityReport:
    atol: float
    rows: list[ParityRow] = field(default_factory=list)
    sequence_checks: list[SequenceCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows) and all(
            c.passed for c in self.sequence_checks)

    def worst(self) -> dict[str, float]:
        """format -> the largest max abs difference over every part, case and output."""
        out: dict[str, float] = {}
        for r in self.rows:
            out[r.format] = max(out.get(r.format, 0.0), r.max_abs)
        return out

    def table(self, only_failed: bool = False) -> str:
        rows = [r for r in self.rows if not (only_failed and r.passed)]
        lines = [f"{'part':<8} {'format':<12} {'case':<22} {'output':<18} {'max abs':>9} {'scaled':>9} "
                 f"{'top-1':>6}  ok", "-" * 96]
        for r in rows:
            top1 = "" if r.top1_agree is None else f"{r.top1_agree:.3f}"
            lines.append(f"{r.part:<8} {r.format:<12} {r.case:<22} {r.output:<18} {r.max_abs:>9.2e} "
                         f"{r.max_scaled:>9.2e} {top1:>6}  {'yes' if r.passed else 'NO'}")
        for c in self.sequence_checks:
            if not (only_failed and c.passed):
                lines.append(f"{c.name}: {c.identical}/{c.rows} sequences identical"
                             f"{'' if c.passed else '  NO'}{'  ' + c.detail if c.detail else ''}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line per part and format: cases, worst difference, top-1 agreement."""
        groups: dict[tuple[str, str], list[ParityRow]] = {}
        for r in self.rows:
            groups.setdefault((r.part, r.format), []).append(r)
        lines = [f"{'part':<8} {'format':<12} {'cases':>5} {'outputs':>7} {'max abs':>9} {'scaled':>9} "
                 f"{'min top-1':>9}  ok", "-" * 72]
        for (part, fmt), rows in groups.items():
            top1 = [r.top1_agree for r in rows if r.top1_agree is not None]
            lines.append(f"{part:<8} {fmt:<12} {len({r.case for r in rows}):>5} {len({r.output for r in rows}):>7} "
                         f"{max(r.max_abs for r in rows):>9.2e} {max(r.max_scaled for r in rows):>9.2e} "
                         f"{min(top1) if top1 else float('nan'):>9.3f}  "
                         f"{'yes' if all(r.passed for r in rows) else 'NO'}")
        for c in self.sequence_checks:
            lines.append(f"{c.name}: {c.identical}/{c.rows} sequences identical{'' if c.passed else '  NO'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"atol": self.atol, "passed": self.passed, "worst_max_abs": self.worst(),
                "rows": [r.__dict__ for r in self.rows],
                "sequence_checks": [{**c.__dict__, "passed": c.passed} for c in self.sequence_checks]}


class ParityError(RuntimeError):
    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(
            f"export parity failed: some outputs differ from the eager model by more than "
            f"atol={report.atol:g} (times |eager| where that exceeds 1); nothing was written.\n"
            + report.table(only_failed=True))


BATCHES = (1, 3, 8)


def parity_cases(spec, trace_length: int, gen: torch.Generator) -> list[tuple[str, tuple]]:
    """Batch 1, 3 and 8 at lengths 1, an odd length, the traced length and twice it;
    and batch 8 with mixed padding (every row its own length) where the graph takes
    lengths."""
    half = trace_length // 2
    odd = half + 1 if half % 2 == 0 else half
    lengths = sorted(n for n in {1, odd, trace_length, 2 * trace_length} if n <= spec.max_length)
    cases = []
    for length in lengths:
        for batch in BATCHES:
            cases.append((f"b={batch} t={length}", spec.make_inputs(batch, length, gen, False)))
        if length > 1 and spec.has_lengths:
            cases.append((f"b=8 t={length} mixed pad", spec.make_inputs(8, length, gen, True)))
    return cases


def _as_list(out) -> list:
    """A model's outputs as the exported graphs give them: nested tuples and lists (an
    LSTM's `(output, (h_n, c_n))`) flattened in order, as ONNX flattens them."""
    return pytree.tree_leaves(out) if isinstance(out, (tuple, list)) else [out]


def compare(part: str, fmt: str, case: str, spec, expected: list, got: list, atol: float) -> list[ParityRow]:
    """Rows for one format at one case: every output's max abs/rel difference, top-1
    agreement (over the last axis) for class-score outputs, and the shapes."""
    rows = []
    if len(got) != len(expected):
        raise ValueError(f"{part} {fmt}: {len(got)} outputs, the eager model gives {len(expected)}")
    for name, e, g in zip(spec.output_names, expected, got):
        e, g = e.detach().float(), g.detach().float()
        same_shape = tuple(e.shape) == tuple(g.shape)
        if same_shape and e.numel():
            diff = (e - g).abs()
            max_abs = float(diff.max())
            max_rel = float((diff / e.abs().clamp_min(1e-6)).max())
            max_scaled = float((diff / e.abs().clamp_min(1.0)).max())
        else:
            max_abs = max_rel = max_scaled = 0.0 if same_shape else float("inf")
        top1 = None
        if name in spec.top1_outputs and same_shape and e.numel():
            top1 = float((e.argmax(-1) == g.argmax(-1)).float().mean())
        ok = same_shape and bool(torch.isfinite(g).all()) and max_scaled <= atol
        rows.append(ParityRow(part, fmt, case, name, max_abs, max_rel, top1, ok, max_scaled))
    return rows


def run_parity(part: str, module, runners: dict, cases, spec, atol: float) -> list[ParityRow]:
    rows = []
    with torch.inference_mode():
        for case_name, inputs in cases:
            expected = _as_list(module(*inputs))
            for fmt, run in runners.items():
                rows += compare(part, fmt, case_name, spec, expected, _as_list(run(*inputs)), atol)
    return rows
