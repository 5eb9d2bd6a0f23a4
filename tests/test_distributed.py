"""Multi-process training with torch.distributed (DDP; gloo on CPU) through torchrun,
tested with 2 CPU processes: the result matches single-process training on the same
global batch.

Each case trains a zoo model on a small slice of its real data twice, with the seqfuse
native kernels and dropout off: once under `torchrun --standalone --nproc_per_node 2`
(each rank takes idx[rank::2] of every global batch, DistributedDataParallel averages the
gradients, the loss is scaled by world / global count) and once in a plain process. The
checkpoints rank 0 and the single process write (model.safetensors, metrics.json) must
agree.

In float64 the two runs agree to rounding (~1e-14), so the comparison is tight enough to
catch any mis-weighting of the examples: scaling each rank's loss by its own count instead
of the global one moves the weights by ~4e-3 in the uneven case below. In float32 (what
`seqfuse train` uses) the summation order differs (two half-batch sums + all-reduce vs one
sum), and Adam's g / (sqrt(v) + 1e-8) turns rounding noise on gradients that are ~0 into
weight differences of up to ~1e-2 * lr, so that case is compared at a looser tolerance.

The worker is tests/distributed_worker.py (not collected: its name has no test_ prefix).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import requires_native
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
BATCH = 32
TIMEOUT_S = 240

pytestmark = [
    pytest.mark.skipif(not dist.is_available(),
                       reason="torch.distributed is not available in this torch build"),
    pytest.mark.skipif(dist.is_available() and not dist.is_gloo_available(),
                       reason="torch.distributed has no gloo backend (needed for CPU DDP)"),
    requires_native,
    pytest.mark.slow,
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(cmd: list[str]) -> subprocess.Popen:
    # Own process group, so that a hung torchrun and its workers can be killed together.
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, what: str, deadline: float) -> None:
    try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {TIMEOUT_S} s; output:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}; output:\n{out[-4000:]}")


class Run:
    """One training run's outputs: the checkpoint folder and each rank's report."""

    def __init__(self, root: Path, world: int):
        self.ckpt = root / "ckpt"
        self.weights = load_file(self.ckpt / "model.safetensors")
        self.metrics = json.loads((self.ckpt / "metrics.json").read_text())
        self.config = json.loads((self.ckpt / "config.json").read_text())
        ranks = root / "ranks"
        self.ranks = [json.loads((ranks / f"rank{r}.json").read_text()) for r in range(world)]
        self.rank_weights = [load_file(ranks / f"rank{r}.safetensors") for r in range(world)]


_CACHE: dict = {}


def _pair(tmp_path_factory, name: str, *, dtype: str, limit: int, epochs: int,
          dropout: bool = True) -> tuple[Run, Run]:
    """(torchrun with 2 processes, single process) for the same settings; the two are
    launched side by side and each pair is trained once per session."""
    key = (name, dtype, limit, epochs, dropout)
    if key in _CACHE:
        return _CACHE[key]
    root = tmp_path_factory.mktemp(f"ddp-{name}-{dtype}-{limit}")
    args = ["--name", name, "--epochs", str(epochs), "--batch-size", str(BATCH),
            "--limit", str(limit), "--dtype", dtype, "--backend", "native"]
    args += ["--no-dropout"] if dropout else []
    ddp = _start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(WORLD), str(WORKER), *args,
                  "--out", str(root / "ddp" / "ckpt"), "--ranks-dir", str(root / "ddp" / "ranks")])
    single = _start([sys.executable, str(WORKER), *args, "--out", str(root / "single" / "ckpt"),
                     "--ranks-dir", str(root / "single" / "ranks")])
    deadline = time.monotonic() + TIMEOUT_S
    try:
        _finish(single, f"single-process training of {name}", deadline)
    finally:
        _finish(ddp, f"torchrun --nproc_per_node {WORLD} training of {name}", deadline)
    _CACHE[key] = Run(root / "ddp", WORLD), Run(root / "single", 1)
    return _CACHE[key]


def _check_ran_distributed(ddp: Run, single: Run, dtype: str) -> None:
    for r, rep in enumerate(ddp.ranks):
        assert (rep["rank"], rep["world"], rep["group_backend"]) == (r, WORLD, "gloo"), rep
        assert rep["dtype"] == f"torch.{dtype}"
    assert (single.ranks[0]["world"], single.ranks[0]["group_backend"]) == (1, None)
    # The same data, model and settings on both sides (only rank 0 wrote a checkpoint).
    assert ddp.config == single.config
    assert ddp.config["training"]["batch_size"] == BATCH


def _assert_weights_close(ddp: dict, single: dict, atol: float, rtol: float) -> None:
    assert ddp.keys() == single.keys()
    worst = {k: (ddp[k] - single[k]).abs().max().item() for k in ddp}
    for k in ddp:
        assert ddp[k].dtype == single[k].dtype and ddp[k].shape == single[k].shape, k
        torch.testing.assert_close(
            ddp[k], single[k], atol=atol, rtol=rtol,
            msg=lambda m, k=k: f"{k}: DDP differs from single-process training "
                               f"(max abs diff per tensor {worst}):\n{m}")


def _assert_metrics_match(ddp: dict, single: dict, abs_tol: float) -> None:
    assert ddp["best_epoch"] == single["best_epoch"]
    assert len(ddp["history"]) == len(single["history"])
    for h_ddp, h_single in zip(ddp["history"], single["history"]):
        assert h_ddp["valid"] == pytest.approx(h_single["valid"], abs=abs_tol), h_ddp["epoch"]
    assert ddp["best_valid"] == pytest.approx(single["best_valid"], abs=abs_tol)
    assert ddp["test"] == pytest.approx(single["test"], abs=abs_tol)
    assert ddp["test"] and not ddp["stopped_early"]


# name, limit, epochs: lstm-classifier with 249 examples has an odd last global batch (25:
# rank 0 takes 13 reviews, rank 1 12); lstm-tagger's loss is a sum over tokens, so even with
# 16 words per rank the two ranks' counts differ in every batch.
EXACT_CASES = [
    pytest.param("lstm-classifier", 249, 2, True, id="lstm-classifier-odd-last-batch"),
    pytest.param("lstm-tagger", 256, 1, False, id="lstm-tagger-token-weighted"),
]


@pytest.mark.parametrize("name, limit, epochs, dropout", EXACT_CASES)
def test_ddp_matches_single_process_float64(tmp_path_factory, name, limit, epochs, dropout):
    ddp, single = _pair(tmp_path_factory, name, dtype="float64", limit=limit, epochs=epochs,
                        dropout=dropout)
    _check_ran_distributed(ddp, single, "float64")
    assert ddp.config["data"]["sizes"]["train"] == limit
    if name == "lstm-classifier":
        assert limit % BATCH % WORLD == 1, "this case is meant to have an odd last global batch"
    _assert_weights_close(ddp.weights, single.weights, atol=1e-10, rtol=1e-9)
    _assert_metrics_match(ddp.metrics, single.metrics, abs_tol=1e-12)
    # DDP keeps the replicas identical: when the best epoch is the last one, rank 1 (which
    # keeps its last weights) holds exactly what rank 0 saved.
    if ddp.metrics["best_epoch"] == epochs:
        for k, v in ddp.weights.items():
            assert torch.equal(ddp.rank_weights[1][k], v), k


def test_ddp_matches_single_process_float32(tmp_path_factory):
    """The default float32 run of `seqfuse train`: the same weights up to rounding noise
    that Adam amplifies (see the module docstring), the same predictions."""
    ddp, single = _pair(tmp_path_factory, "lstm-classifier", dtype="float32", limit=256, epochs=1)
    _check_ran_distributed(ddp, single, "float32")
    _assert_weights_close(ddp.weights, single.weights, atol=1e-4, rtol=1e-3)
    # Rounding may flip a prediction that sits on the decision boundary: allow a couple.
    _assert_metrics_match(ddp.metrics, single.metrics, abs_tol=0.01)
    for r in range(1, WORLD):  # one epoch: best = last, and the replicas are bit-identical
        for k, v in ddp.weights.items():
            assert torch.equal(ddp.rank_weights[r][k], v), (r, k)


def test_ddp_train_loss_history_is_global(tmp_path_factory):
    ddp, single = _pair(tmp_path_factory, "lstm-classifier", dtype="float64", limit=249, epochs=2)
    got = [h["train_loss"] for h in ddp.metrics["history"]]
    want = [h["train_loss"] for h in single.metrics["history"]]
    assert got == pytest.approx(want, rel=1e-9)


def test_ddp_matches_single_process_with_a_one_example_last_batch(tmp_path_factory):
    # 257 = 8 * 32 + 1: the last global batch holds a single review.
    ddp, single = _pair(tmp_path_factory, "lstm-classifier", dtype="float64", limit=257, epochs=1)
    _check_ran_distributed(ddp, single, "float64")
    _assert_weights_close(ddp.weights, single.weights, atol=1e-10, rtol=1e-9)
