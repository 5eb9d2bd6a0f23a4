"""Exported models in onnxruntime, behind the eager model's interface.

`OrtModel` is callable like the eager zoo model (torch tensors in, torch tensors out) and,
for seq2seq, has the same `greedy_decode` (the very loop of seqfuse.models.seq2seq, around
the exported one-step decoder). So the task code that evaluates eager models (accuracy,
PER, RMSE...) evaluates an artifact or any of its variants unchanged, and `seqfuse
predict` serves exactly what the parity checks proved.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from seqfuse.models.seq2seq import greedy_loop


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtGraph:
    """One ONNX graph: call(*torch tensors) -> list of torch tensors (graph output order)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs "
                             f"{self.input_names}, got {len(inputs)}")
        return {n: (t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t))
                for n, t in zip(self.input_names, inputs)}

    def __call__(self, *inputs) -> list[Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, self.feeds(inputs))]


class OrtModel:
    """An artifact's ONNX graphs (float32 or a variant) run like the eager model."""

    def __init__(self, graphs: dict[str, OrtGraph], config: dict | None = None):
        self.graphs = graphs
        self.config = config or {}

    @classmethod
    def from_artifact(cls, artifact_dir: str | Path, variant: str | None = None,
                      threads: int | None = None) -> "OrtModel":
        art = Path(artifact_dir)
        manifest_path = art / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{art} is not an export artifact: it has no manifest.json")
        manifest = json.loads(manifest_path.read_text())
        if variant in (None, "float32"):
            names = {part: info["files"].get("onnx") for part, info in manifest["parts"].items()}
        else:
            names = manifest.get("variants", {}).get(variant, {}).get("files", {})
        missing = [part for part in manifest["parts"] if not names.get(part)]
        if missing:
            known = ["float32"] + sorted(v for v in manifest.get("variants", {}) if v != "float32")
            raise ValueError(f"{art}: variant {variant or 'float32'!r} has no ONNX file for "
                             f"{missing}; this artifact has variants {known}")
        graphs = {part: OrtGraph(art / names[part], threads) for part in manifest["parts"]}
        return cls(graphs, manifest.get("config", {}))

    @classmethod
    def from_files(cls, files: dict[str, str | Path], config: dict | None = None) -> "OrtModel":
        return cls({part: OrtGraph(path) for part, path in files.items()}, config)

    def eval(self) -> "OrtModel":  # the task code calls model.eval()
        return self

    def __call__(self, *inputs):
        if "model" not in self.graphs:
            raise TypeError(f"this artifact has graphs {sorted(self.graphs)}: call greedy_decode")
        out = self.graphs["model"](*inputs)
        return out[0] if len(out) == 1 else tuple(out)

    @torch.no_grad()
    def greedy_decode(self, src_ids: Tensor, src_lengths: Tensor | None = None,
                      max_len: int | None = None) -> tuple[list[list[int]], Tensor]:
        """Greedy decoding in onnxruntime: the encoder graph once, then the one-step
        decoder graph per output token, fed its own state."""
        if not {"encoder", "decoder"} <= set(self.graphs):
            raise TypeError("greedy_decode needs an artifact with encoder and decoder graphs")
        if src_lengths is None:
            src_lengths = (src_ids != 0).sum(1).clamp(min=1)
        max_len = self.config.get("max_decode_len", 24) if max_len is None else max_len
        memory, keys, state = self.graphs["encoder"](src_ids, src_lengths)
        decoder = self.graphs["decoder"]

        def step(prev, state):
            logits, state, weights = decoder(prev, state, memory, keys, src_lengths)
            return logits, state, weights

        return greedy_loop(step, state, src_ids.shape[0], max_len)
