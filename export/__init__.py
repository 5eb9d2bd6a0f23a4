"""seqfuse.export: trained model -> ONNX / TorchScript artifacts, proven by parity checks.

    from seqfuse.export import export_model
    result = export_model(model, "artifacts/my-model")
    print(result.parity.table())
"""
from .exporter import FORMATS, ExportResult, export_model, export_onnx, export_torchscript
from .parity import ParityError, ParityReport
from .specs import ExportSpec, spec_for

__all__ = ["export_model", "export_onnx", "export_torchscript", "ExportResult", "ExportSpec",
           "spec_for", "ParityError", "ParityReport", "FORMATS"]
