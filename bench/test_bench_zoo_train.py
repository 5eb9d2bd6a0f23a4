"""Training throughput of zoo models on real data: the model on seqfuse layers vs the
same model with torch.nn layers (seqfuse.nn.to_torch: nn.LSTM/nn.GRU on packed batches,
attention in eager PyTorch ops), same weights, same batches. CPU float32, 2 threads.

Each round is one epoch-slice: N_BATCHES training steps (forward, backward, gradient
clipping, Adam) over the same length-bucketed real batches of the model's default
training set-up. extra_info carries samples/s; bench/report.py shows the ratio.

Groups: zoo-train-bilstm-attention, zoo-train-bigru-classifier.
"""
import copy

import pytest
import torch
from conftest import record, timed

from seqfuse.nn import to_torch
from seqfuse.zoo.tasks import ZOO

N_BATCHES = 12
MODELS = ["bilstm-attention", "bigru-classifier"]
_DATA = {}


def _batches(name, n_batches):
    entry = ZOO[name]
    if "movie" not in _DATA:
        _DATA["movie"] = entry.load(0)
    ds = _DATA["movie"]
    kind = entry.kind(ds)
    gen = torch.Generator().manual_seed(0)
    idx = kind.index_batches(ds.splits["train"], entry.defaults["batch_size"], True, gen)[:n_batches]
    return ds, kind, [kind.collate(ds.splits["train"], i) for i in idx]


@pytest.mark.parametrize("impl", ["torch.nn", "seqfuse"])
@pytest.mark.parametrize("name", MODELS)
def test_zoo_train_step(benchmark, name, impl, quick):
    ds, kind, batches = _batches(name, 2 if quick else N_BATCHES)
    torch.manual_seed(0)
    model = ZOO[name].model(ds)
    if impl == "torch.nn":
        model = to_torch(copy.deepcopy(model))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=ZOO[name].defaults["lr"])

    def epoch_slice():
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            total, n = kind.loss(model, batch)
            (total / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    samples = sum(len(b[1]) for b in batches)
    record(benchmark, f"zoo-train-{name}-cpu", impl,
           f"{len(batches)} real batches of {ZOO[name].defaults['batch_size']}", batch=samples,
           baseline="torch.nn", samples=samples)
    timed(benchmark, epoch_slice, rounds=9, warmup=1)
    if benchmark.stats:   # None under --benchmark-disable
        benchmark.extra_info["samples_per_s"] = samples / benchmark.stats.stats.median
