import pytest
import torch
from conftest import requires_native

from seqfuse.zoo.models import LSTMClassifier

pytestmark = requires_native


@pytest.mark.parametrize("bidirectional,num_layers", [(False, 1), (True, 2)])
def test_classifier_trains_with_fused_kernel(bidirectional, num_layers):
    """Loss falls on a learnable synthetic task: label = whether token 3 occurs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (64, 12), generator=gen)
    labels = torch.randint(0, 2, (64,), generator=gen)
    ids[labels == 1, 5] = 3
    lengths = torch.randint(6, 13, (64,), generator=gen)
    ids[torch.arange(12) >= lengths.unsqueeze(1)] = 0
    model = LSTMClassifier(30, 16, 24, 2, num_layers=num_layers, bidirectional=bidirectional,
                           backend="native")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids, lengths), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_classifier_lengths_from_padding():
    model = LSTMClassifier(20, 8, 8, 3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(model(ids), model(ids, torch.tensor([3, 1, 1])))
    # padding past the length does not change the prediction
    torch.testing.assert_close(model(ids[:, :3]), model(ids))
