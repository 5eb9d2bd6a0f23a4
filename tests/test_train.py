"""Real-data smoke training of every zoo model (the first examples of each split, one
short epoch): the loop runs end to end on the model's own data, the loss is finite and
falls, the checkpoint holds what `seqfuse train` promises and evaluates to its metrics."""
import json

import pytest
import torch
from conftest import requires_native

from seqfuse.zoo.tasks import ZOO
from seqfuse.zoo.train import TrainConfig, evaluate_checkpoint, train

pytestmark = requires_native

_DATA = {}


def _data(name):
    load = ZOO[name].load
    if load not in _DATA:
        _DATA[load] = load(0)
    return _DATA[load]


@pytest.mark.parametrize("name", list(ZOO))
def test_smoke_train_on_real_data(tmp_path, name):
    out = tmp_path / name
    model, result = train(name, out, epochs=2, batch_size=16, limit=96, progress=False,
                          dataset=_data(name))
    entry = ZOO[name]
    assert [h["epoch"] for h in result.history] == [1, 2]
    losses = [h["train_loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    if name != "lstm-regressor":  # next-day returns: 12 steps of noise need not lower the loss
        assert losses[1] < losses[0], losses
    assert set(result.test) >= {entry.target[0]}
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "training_curves.png"} <= files
    assert set(json.loads((out / "config.json").read_text())["vocabs"]) <= files
    if name in ("bilstm-attention", "seq2seq-attention"):
        assert "attention.png" in files
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == result.test
    assert evaluate_checkpoint(out) == pytest.approx(result.test, abs=1e-6)


def test_train_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0)


def test_unknown_model_name():
    with pytest.raises(KeyError, match="lstm-classifier"):
        train("no-such-model", None)
