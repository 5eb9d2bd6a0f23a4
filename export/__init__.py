"""seqfuse.export: trained model -> ONNX / TorchScript / torch.export artifacts, proven by
parity checks over many shapes, with optimised variants and serving configs.

    from seqfuse.export import export_model
    result = export_model(model, None, "artifacts/my-model")   # a zoo model: plan known
    print(result.parity.summary())
"""
from .exporter import (FORMATS, ExportError, ExportResult, export_model, export_onnx, export_pt2,
                       export_torchscript, load_runner)
from .parity import ParityError, ParityReport
from .runtime import OrtGraph, OrtModel
from .specs import ExportPart, ExportPlan, ExportSpec, plan_for, register_plan, spec_for

__all__ = ["export_model", "export_onnx", "export_torchscript", "export_pt2", "load_runner",
           "ExportResult", "ExportError", "ExportSpec", "ExportPart", "ExportPlan", "plan_for", "register_plan",
           "spec_for", "ParityError", "ParityReport", "OrtGraph", "OrtModel", "FORMATS"]
