"""Zoo models end to end: single-request latency (batch 1) and throughput (batch 32) of
every zoo model in every implementation, on the same inputs.

Implementations (CPU, float32, THREADS threads):
  eager          the model built from torch.nn layers (seqfuse.nn.to_torch): nn.LSTM/GRU on
                 packed sequences, attention in eager PyTorch ops: what users write today
  seqfuse        the model on seqfuse's fused kernels, eager mode
  torchscript    the seqfuse model traced to TorchScript (seqfuse.export's .ts artifact)
  torch.compile  torch.compile (inductor, static shapes) of the seqfuse model: the fused ops
                 stay opaque custom ops, inductor fuses what is around them
  onnxruntime    the exported ONNX graph(s) in onnxruntime (seqfuse.export.export_onnx)
  ort-opt        the same with onnxruntime's extended graph optimisations saved offline
  ort-int8       dynamically quantised int8 weights (seqfuse.export.variants)
  aoti           the seqfuse model's AOTInductor package (seqfuse.export's .aoti.pt2):
                 compiled C++ that calls the fused ops, no Python graph
  openvino       the exported ONNX graph(s) compiled by OpenVINO for CPU, LATENCY hint,
                 INFERENCE_PRECISION_HINT f32 (left alone it runs bfloat16 on AMX CPUs)
GPU (skipped without one): eager (cuDNN), seqfuse (CUDA kernels), onnxruntime-cuda.

Inputs: random weights (latency does not depend on training) at the models' default sizes
(the zoo's, on the vocabularies of their real data sets); random tokens/features of the
median length of the model's real test split; batch 32 mixes lengths (the longest at
that median). seq2seq-attention is timed as a served request: the encoder once, then a
fixed number of greedy decoder steps (the median source length + 1, no early stop, so
every implementation does the same work).

Every implementation's output is checked against eager's before timing: float32
implementations within 1e-4 relative (greedy tokens: at least 99% identical); int8's
difference and top-1 agreement are recorded in extra_info, not asserted.
"""
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import cases, ort_providers, ort_session, record, require_device, rounds_for, timed

from seqfuse.export.exporter import export_aoti, export_onnx, export_torchscript, load_runner
from seqfuse.export.runtime import AotiGraph
from seqfuse.export.specs import ExportPlan, plan_for
from seqfuse.export.variants import make_variant
from seqfuse.zoo.models.seq2seq import BOS_ID
from seqfuse.nn import to_torch
from seqfuse.zoo.tasks import ZOO

CPU_IMPLS = ["eager", "seqfuse", "torchscript", "torch.compile", "aoti", "onnxruntime", "ort-opt",
             "ort-int8", "openvino"]
GPU_IMPLS = ["eager", "seqfuse", "onnxruntime-cuda"]
DEVICE_IMPLS = [("cpu", i) for i in CPU_IMPLS] + [("cuda", i) for i in GPU_IMPLS]
ONNX_VARIANTS = {"onnxruntime": None, "onnxruntime-cuda": None, "ort-opt": "ort-opt", "ort-int8": "int8"}
BATCHES, QUICK_BATCHES = [1, 32], [1, 3]
QUICK_LENGTH = 4
_DATA: dict = {}


@dataclass
class ZooBench:
    """One zoo model, its eager torch.nn twin, inputs and (lazily) its exported forms."""
    name: str
    model: torch.nn.Module          # seqfuse layers
    eager: torch.nn.Module          # torch.nn layers, same weights
    length: int
    steps: int                      # seq2seq decoder steps (0: single graph)
    work: Path
    _runners: dict = field(default_factory=dict)

    @property
    def plan(self) -> ExportPlan:
        return plan_for(self.model)

    def inputs(self, batch: int, device: str) -> tuple:
        gen = torch.Generator().manual_seed(batch)
        first = self.plan.parts[0].spec
        return tuple(t.to(device) for t in first.make_inputs(batch, self.length, gen, batch > 1))

    def parts(self, impl: str, device: str) -> list:
        """One callable per graph: (*tensors) -> tuple of tensors."""
        key = (impl, device)
        if key not in self._runners:
            self._runners[key] = self._build(impl, device)
        return self._runners[key]

    def _build(self, impl: str, device: str) -> list:
        if impl in ("eager", "seqfuse"):
            model = self.eager if impl == "eager" else self.model
            model = model if device == "cpu" else copy.deepcopy(model).to(device)
            return [_no_grad(p.module) for p in plan_for(model).parts]
        if impl == "torch.compile":
            return [_no_grad(torch.compile(p.module, dynamic=False)) for p in self.plan.parts]
        examples = self._trace_examples()
        if impl == "torchscript":
            return [_no_grad(load_runner("torchscript", export_torchscript(
                p.module, ex, self.work / f"{p.name}.ts"))) for p, ex in zip(self.plan.parts, examples)]
        if impl == "aoti":
            return [_as_tuple(AotiGraph(export_aoti(p.module, ex, p.spec, self.work / f"{p.name}.aoti.pt2")))
                    for p, ex in zip(self.plan.parts, examples)]
        if impl == "openvino":
            return [_openvino_graph(self._onnx(p, ex)) for p, ex in zip(self.plan.parts, examples)]
        variant = ONNX_VARIANTS[impl]
        graphs = []
        for p, ex in zip(self.plan.parts, examples):
            path = self._onnx(p, ex)
            if variant:
                path = make_variant(variant, path, self.work / f"{p.name}.{variant}.onnx")
            graphs.append(_ort_graph(ort_session(path, impl), device))
        return graphs

    def _onnx(self, part, example) -> Path:
        path = self.work / f"{part.name}.onnx"
        if not path.exists():
            export_onnx(part.module, example, part.spec, path)
        return path

    def _trace_examples(self) -> list[tuple]:
        gen = torch.Generator().manual_seed(0)
        return [p.spec.make_inputs(2, max(self.length, 2), gen, True) for p in self.plan.parts]

    def run(self, parts: list, inputs: tuple):
        """The model's answer: its outputs, or (seq2seq) the greedy tokens of `steps` steps."""
        if len(parts) == 1:
            return parts[0](*inputs)
        encoder, decoder = parts
        src_ids, src_lengths = inputs
        memory, keys, state = encoder(src_ids, src_lengths)[:3]
        prev = torch.full((src_ids.shape[0],), BOS_ID, dtype=torch.long, device=src_ids.device)
        tokens = []
        for _ in range(self.steps):
            logits, state, _ = decoder(prev, state, memory, keys, src_lengths)[:3]
            prev = logits.argmax(1)
            tokens.append(prev)
        return (torch.stack(tokens, 1),)


def _no_grad(fn):
    def call(*inputs):
        with torch.inference_mode():
            out = fn(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return call


def _as_tuple(fn):
    def call(*inputs):
        return tuple(fn(*inputs))
    return call


def _openvino_graph(path: Path):
    """The ONNX graph compiled by OpenVINO for CPU in float32, THREADS threads."""
    try:
        import openvino as ov
    except ImportError:
        pytest.skip("openvino is not installed (requirements.txt pins it)")
    from conftest import THREADS
    try:
        compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": THREADS})
    except RuntimeError as exc:  # e.g. the transformer classifier in 2026.4.1: a snippets check
        lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
        pytest.skip(f"OpenVINO cannot compile {path.name}: {lines[0] if lines else exc}")
    request = compiled.create_infer_request()

    def call(*inputs):
        request.infer([t.detach().cpu().numpy() for t in inputs])
        return tuple(torch.from_numpy(request.get_output_tensor(i).data.copy())
                     for i in range(len(compiled.outputs)))
    return call


def _ort_graph(sess, device: str):
    names = [i.name for i in sess.get_inputs()]

    def call(*inputs):
        outs = sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})
        return tuple(torch.from_numpy(o).to(device) for o in outs)
    return call


def _median_length(name: str, quick: bool) -> int:
    entry = ZOO[name]
    if quick:
        return QUICK_LENGTH if entry.serving.get("input") != "dense" else entry.serving["shape"][0]
    ds = _dataset(name)
    lengths = entry.kind(ds).lengths(ds.splits["test"])
    return int(statistics.median(lengths)) if lengths else entry.serving["shape"][0]


def _dataset(name: str):
    loader = ZOO[name].load
    if loader not in _DATA:
        _DATA[loader] = loader(0)
    return _DATA[loader]


_BENCHES: dict = {}


def zoo_bench(name: str, quick: bool) -> ZooBench:
    if (name, quick) not in _BENCHES:
        torch.manual_seed(0)
        model = ZOO[name].model(_dataset(name)).eval()
        eager = to_torch(copy.deepcopy(model)).eval()
        length = _median_length(name, quick)
        steps = length + 1 if len(plan_for(model).parts) > 1 else 0
        work = Path(tempfile.mkdtemp(prefix=f"seqfuse-bench-{name}-"))
        _BENCHES[(name, quick)] = ZooBench(name, model, eager, length, steps, work)
    return _BENCHES[(name, quick)]


def _check(got: tuple, want: tuple, impl: str, steps: int) -> dict:
    """Agreement of an implementation's outputs with eager's: asserted for float32
    implementations, recorded for int8."""
    g, w = got[0].float().cpu(), want[0].float().cpu()
    if steps:   # greedy tokens
        agree = float((g == w).float().mean())
        if impl != "ort-int8":
            assert agree >= 0.99, f"{impl}: {agree:.1%} of greedy tokens agree with eager"
        return {"token_agreement": agree}
    diff = float((g - w).abs().max())
    info = {"max_abs_diff": diff}
    if g.dim() >= 2 and g.shape[-1] > 1:
        info["top1_agreement"] = float((g.argmax(-1) == w.argmax(-1)).float().mean())
    if impl != "ort-int8":
        torch.testing.assert_close(g, w, atol=1e-4 * max(1.0, float(w.abs().max())), rtol=0)
    return info


@cases(full=BATCHES, quick=QUICK_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS, ids=[f"{d}-{i}" for d, i in DEVICE_IMPLS])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model(benchmark, name, device, impl, case, quick):
    require_device(device)
    if impl == "onnxruntime-cuda":
        ort_providers(impl)   # skips without onnxruntime's CUDA provider
    batch = case
    zb = zoo_bench(name, quick)
    inputs = zb.inputs(batch, device)
    parts = zb.parts(impl, device)
    want = zb.run(zb.parts("eager", device), inputs)
    got = zb.run(parts, inputs)          # also the warm-up / compilation call
    shape = f"b{batch}-T{zb.length}" + (f"-{zb.steps}steps" if zb.steps else "")
    try:
        agreement = _check(got, want, impl, zb.steps)
    except AssertionError as exc:
        if impl != "openvino":
            raise
        # Measured with OpenVINO 2026.4.1: ONNX LSTM/GRU nodes with sequence_lens give wrong
        # outputs as soon as a batch mixes lengths (0.28 off on a 16-unit LSTM classifier,
        # one direction or two), while onnxruntime runs the same file exactly. A wrong answer
        # is not a peer's latency.
        pytest.skip(f"openvino's outputs differ from eager's ({str(exc).splitlines()[0]}): OpenVINO "
                    f"mishandles ONNX recurrent sequence_lens at mixed lengths; not timed")
    record(benchmark, f"zoo-{name}-b{batch}-{device}", impl, shape, batch=batch, device=device, model=name,
           **agreement)
    t0 = time.perf_counter()
    zb.run(parts, inputs)
    timed(benchmark, lambda: zb.run(parts, inputs), rounds_for(time.perf_counter() - t0, budget=2.0), device)
