"""The package's layering: the library (seqfuse, ops, nn, triton, export) does not import the
application (seqfuse.zoo); an export plan comes from the model itself or a registry, so the
export stage knows no zoo class; and each op's Python pieces live in one place."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import seqfuse.export as E
from seqfuse.zoo.models import MODELS


def _imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(*sorted(sys.modules))"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return set(out.split())


def test_library_and_export_stage_do_not_import_the_zoo():
    mods = _imported_after("import seqfuse, seqfuse.nn, seqfuse.functional, seqfuse.export, "
                           "seqfuse.export.exporter, seqfuse.export.triton")
    assert "seqfuse.export.exporter" in mods
    assert not {m for m in mods if m.startswith("seqfuse.zoo")}, sorted(m for m in mods if "zoo" in m)


def test_every_zoo_model_declares_its_export_plan():
    for cls in MODELS.values():
        assert callable(getattr(cls, "export_plan", None)), cls.__name__


class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class _Sub(_Doubler):
    pass


def test_plan_registry_along_the_mro_and_clear_error_without_a_plan():
    with pytest.raises(TypeError, match="no export plan for _Doubler"):
        E.plan_for(_Doubler())
    spec = E.ExportSpec.from_example((torch.randn(2, 3),), ["x"], ["y"], [{0: "batch"}])

    def make(model):
        return E.ExportPlan([E.ExportPart("model", model, spec)])

    E.register_plan(_Doubler, make)
    try:
        assert E.plan_for(_Sub()).parts[0].spec is spec   # a subclass finds its base's plan
    finally:
        from seqfuse.export import specs

        specs._PLANS.pop(_Doubler)
    with pytest.raises(TypeError, match="register_plan"):
        E.register_plan("not a class", make)


def test_a_model_method_that_returns_no_plan_is_refused():
    class Bad(nn.Module):
        def export_plan(self):
            return {"parts": []}

    with pytest.raises(TypeError, match="must be an ExportPlan, got dict"):
        E.plan_for(Bad())
