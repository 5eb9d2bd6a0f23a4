"""OpenVINO 2026.4.1 on seqfuse's exported ONNX LSTM: right at equal lengths, wrong as soon as a
batch mixes lengths (sequence_lens), while onnxruntime runs the same file exactly. Prints
the max difference from eager for each.

    .venv/bin/python bench/openvino_lengths_check.py
"""
import torch, numpy as np, tempfile, openvino as ov
from pathlib import Path
from seqfuse.zoo.models import MODELS
from seqfuse.export.exporter import export_onnx
from seqfuse.export.specs import plan_for
from seqfuse.export.runtime import OrtGraph
torch.manual_seed(0)
for bi in (False, True):
    m = MODELS["lstm-classifier"](vocab_size=100, embed_dim=8, hidden_size=16, num_classes=2, bidirectional=bi).eval()
    part = plan_for(m).parts[0]
    p = Path(tempfile.mkdtemp())/"m.onnx"
    ex = part.spec.make_inputs(2, 6, torch.Generator().manual_seed(0), True)
    export_onnx(part.module, ex, part.spec, p)
    c = ov.Core().compile_model(ov.Core().read_model(str(p)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for lens in ([6, 6, 6], [6, 3, 1]):
        ids = torch.randint(1, 100, (3, 6)); L = torch.tensor(lens)
        with torch.no_grad(): ref = m(ids, L)
        o = c([ids.numpy(), L.numpy()])[0]
        print("bi" if bi else "uni", lens, "ov-eager", float(np.abs(o - ref.numpy()).max()), "ort-eager", float((OrtGraph(p)(ids, L)[0]-ref).abs().max()))
