"""seqfuse.nn.serving_trace (issue 22): a graph traced for an inference artifact takes the
layers' prepared weights (stacked, bias sums, packed panels, the folded embedding table)
as constants from one eager call, instead of rebuilding them in every call of the
artifact; it computes what the eager model computes."""
import pytest
import torch
from conftest import requires_native
from torch import nn

import seqfuse
from seqfuse.nn import GRU, LSTM, RNN, serving_trace

pytestmark = [requires_native,
              # one-direction entries are views of the parameters: export detaches them
              pytest.mark.filterwarnings("ignore:A model attribute")]


class Tagger(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.embedding = nn.Embedding(23, 8)
        self.rnn = layer
        self.fc = nn.Linear(layer.hidden_size * layer.num_directions, 3)

    def forward(self, ids, lengths):
        out, _ = self.rnn.forward_tokens(self.embedding, ids, lengths=lengths)
        return self.fc(out)


class Dense(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths):
        out, state = self.rnn(x, lengths=lengths)
        return out, state[0] if isinstance(state, tuple) else state


def _targets(program):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


LAYERS = {
    "lstm": lambda i, bi, L: LSTM(i, 12, num_layers=L, batch_first=True, bidirectional=bi),
    "gru": lambda i, bi, L: GRU(i, 12, num_layers=L, batch_first=True, bidirectional=bi),
    "rnn": lambda i, bi, L: RNN(i, 12, num_layers=L, batch_first=True, bidirectional=bi),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_traced_graph_takes_prepared_weights_and_matches_eager(kind, bidirectional):
    torch.manual_seed(0)
    for model, make in [
        (Tagger(LAYERS[kind](8, bidirectional, 1)).eval(),
         lambda B, T: (torch.randint(0, 23, (B, T)), torch.randint(1, T + 1, (B,)))),
        (Dense(LAYERS[kind](5, bidirectional, 2)).eval(),
         lambda B, T: (torch.randn(B, T, 5), torch.randint(1, T + 1, (B,)))),
    ]:
        example = make(3, 6)
        B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
        with torch.no_grad(), serving_trace(model, example):
            program = torch.export.export(model, example, dynamic_shapes=({0: B, 1: T}, {0: B}),
                                          strict=False)
        targets = _targets(program)
        # Nothing of the weights is rebuilt in the graph: no stacking, no packing, no table.
        assert not any("stack" in t or "pack_recurrent_weights" in t or "mm" in t.split(".")[-2:-1]
                       for t in targets), targets
        op = [n for n in program.graph.nodes if n.op == "call_function" and "seqfuse" in str(n.target)]
        assert op, targets
        # The packed panels are an argument of every layer op: a lifted constant.
        constants = set(program.graph_signature.inputs_to_lifted_tensor_constants)
        for node in op:
            packed = node.args[-1]
            assert isinstance(packed, torch.fx.Node) and packed.name in constants, (node, packed)
        runner = program.module()
        with torch.no_grad():
            for B_, T_ in [(1, 1), (2, 5), (5, 9)]:
                inputs = make(B_, T_)
                inputs[1][0] = T_  # one full row, one of length 1 where B > 1
                if B_ > 1:
                    inputs[1][1] = 1
                for got, want in zip(runner(*inputs), model(*inputs)):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_serving_trace_without_cached_weights_stacks_in_the_graph():
    """A model in training mode caches nothing: the trace falls back to stacking the
    parameters in the graph (correct, only slower), and the context leaves no state."""
    model = Dense(LSTM(5, 12, batch_first=True, bidirectional=True)).train()
    example = (torch.randn(2, 4, 5), torch.tensor([4, 2]))
    model.rnn.dropout = 0.0
    with torch.no_grad(), serving_trace(model, example):
        program = torch.export.export(model, example, strict=False)
    assert any("stack" in t for t in _targets(program))
    assert not seqfuse.nn.rnn._SERVING_TRACE
    with torch.no_grad():
        for got, want in zip(program.module()(*example), model(*example)):
            torch.testing.assert_close(got, want)
