"""Quick latency comparison of one model in several implementations (medians)."""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from .backend import use_backend


def median_ms(fn, repeat: int = 100, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def compare(model, inputs: tuple, onnx_path=None, input_names=None, repeat: int = 100) -> dict[str, float]:
    """Median latency (ms) of `model(*inputs)`: seqfuse fused, eager PyTorch (the
    reference backend = torch's own LSTM kernels), and onnxruntime on `onnx_path`."""
    model.eval()
    out = {}
    with torch.inference_mode():
        with use_backend("native"):
            out["seqfuse fused"] = median_ms(lambda: model(*inputs), repeat)
        with use_backend("reference"):
            out["eager PyTorch"] = median_ms(lambda: model(*inputs), repeat)
    if onnx_path is not None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feeds = {n: t.numpy() for n, t in zip(input_names, inputs)}
        out["onnxruntime"] = median_ms(lambda: sess.run(None, feeds), repeat)
    return out
