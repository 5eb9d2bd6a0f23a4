"""Parity of exported formats with the eager model, over many shapes and lengths."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ParityRow:
    format: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    top1_agree: float | None
    passed: bool


@dataclass
class ParityReport:
    atol: float
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def worst(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rows:
            out[r.format] = max(out.get(r.format, 0.0), r.max_abs)
        return out

    def table(self, only_failed: bool = False) -> str:
        rows = [r for r in self.rows if not (only_failed and r.passed)]
        lines = [f"{'format':<12} {'case':<28} {'output':<10} {'max abs':>10} {'max rel':>10} {'top-1':>6}  ok",
                 "-" * 86]
        for r in rows:
            top1 = "" if r.top1_agree is None else f"{r.top1_agree:.3f}"
            lines.append(f"{r.format:<12} {r.case:<28} {r.output:<10} {r.max_abs:>10.2e} "
                         f"{r.max_rel:>10.2e} {top1:>6}  {'yes' if r.passed else 'NO'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"atol": self.atol, "passed": self.passed, "worst_max_abs": self.worst(),
                "rows": [r.__dict__ for r in self.rows]}


class ParityError(RuntimeError):
    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(
            f"export parity failed: some outputs differ from the eager model by more than "
            f"atol={report.atol:g}; nothing was written.\n" + report.table(only_failed=True))


def parity_cases(spec, trace_length: int, gen: torch.Generator) -> list[tuple[str, tuple]]:
    """Batch 1 and 5; lengths 1, an odd length, the traced length and twice it; batch 5
    with mixed padding (every row its own length)."""
    odd = trace_length // 2 + 1 if (trace_length // 2) % 2 == 0 else trace_length // 2
    cases = []
    for length in sorted({1, odd, trace_length, 2 * trace_length}):
        for batch in (1, 5):
            cases.append((f"b={batch} t={length}", spec.make_inputs(batch, length, gen, False)))
        if length > 1:
            cases.append((f"b=5 t={length} mixed pad", spec.make_inputs(5, length, gen, True)))
    return cases


def run_parity(model, runners: dict, cases, output_names, atol: float, is_classifier: bool) -> ParityReport:
    report = ParityReport(atol)
    with torch.inference_mode():
        for case_name, inputs in cases:
            expected = model(*inputs)
            expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
            for fmt, run in runners.items():
                got = run(*inputs)
                for name, e, g in zip(output_names, expected, got):
                    e = e.float()
                    g = g.float()
                    diff = (e - g).abs()
                    max_abs = float(diff.max()) if diff.numel() else 0.0
                    max_rel = float((diff / e.abs().clamp_min(1e-6)).max()) if diff.numel() else 0.0
                    top1 = None
                    if is_classifier and e.dim() == 2:
                        top1 = float((e.argmax(1) == g.argmax(1)).float().mean())
                    ok = bool(torch.isfinite(g).all()) and max_abs <= atol and tuple(e.shape) == tuple(g.shape)
                    report.rows.append(ParityRow(fmt, case_name, name, max_abs, max_rel, top1, ok))
    return report
