"""bfloat16: the recurrent ops take bfloat16 inputs, weights and states (accumulating in
float32), and the modules run under torch.autocast("cpu", dtype=torch.bfloat16). Their
error against a float32 reference must stay within 2x of eager PyTorch's own bfloat16
error on the same inputs, for outputs and for every gradient."""
import pytest
import torch
from conftest import requires_native
from cases import KINDS as OP_KINDS

from seqfuse.nn import GRU, LSTM, RNN

pytestmark = requires_native


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def run(kind, args, fn):
    """Outputs and gradients (of a fixed random weighting of the outputs) of fn(*args)."""
    out = fn(*args)
    leaves = kind.tensors(args)
    torch.manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape)).sum() for o in out)
    return list(out), list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("kind", OP_KINDS, ids=[k.name for k in OP_KINDS])
@pytest.mark.parametrize("D,with_lengths", [(1, False), (2, True)])
# projection first; fused into the steps; 16-row AMX blocks and a tail (where the CPU has AMX)
@pytest.mark.parametrize("B", [1, 7, 37])
def test_op_error_within_twice_eager_bfloat16(kind, D, with_lengths, B):
    T, I, H = 12, 37, 53  # odd I and H: half pairs of k in the bfloat16 tiles
    torch.manual_seed(B * 10 + D)  # the same draw whatever ran before
    lengths = torch.randint(1, T + 1, (B,)) if with_lengths else None
    args32 = kind.make_args(T, B, I, H, D, lengths=lengths)

    def cast(dtype):
        return [a.detach().to(dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args32]
    ref_out, ref_grads = run(kind, cast(torch.float32), kind.ref)          # the float32 truth
    bf = cast(torch.bfloat16)
    ours_out, ours_grads = run(kind, bf, kind.op)
    eager_out, eager_grads = run(kind, cast(torch.bfloat16), kind.ref)     # PyTorch's own bf16
    for o in ours_out:
        assert o.dtype == torch.bfloat16
    for g, leaf in zip(ours_grads, kind.tensors(bf)):
        assert g.dtype == torch.bfloat16 and g.shape == leaf.shape
    with torch.no_grad():  # inference: the bfloat16 tiles, where the CPU has them
        infer_out = list(kind.op(*bf))
    checks = [("outputs", ours_out, eager_out, ref_out),
              ("inference outputs", infer_out, eager_out, ref_out)]
    # relu: where bfloat16 rounding puts a pre-activation on the other side of 0 than the
    # float32 truth, the gradient there is off by O(1) (a kink, not an error), and eager's
    # bfloat16 flips other units: the gradients are compared only when ours flips none
    # (the rule of tests/reliability/properties_common.py). On CPUs with AVX512-BF16
    # this draw flipped 2 units (eager 1), which put the input gradient at 3x eager's.
    kinked = kind.name == "rnn-relu" and bool(((ours_out[0].float() > 0) != (ref_out[0] > 0)).any())
    if not kinked:
        checks.append(("gradients", ours_grads, eager_grads, ref_grads))
    for name, ours, eager, ref in checks:
        for i, (a, e, r) in enumerate(zip(ours, eager, ref, strict=True)):
            err, eager_err = max_err(a, r), max_err(e, r)
            # a floor of half a bf16 ulp of the value's scale: both may round exactly
            floor = r.abs().max().item() * 2 ** -9
            assert err <= 2 * max(eager_err, floor), f"{name}[{i}]: {err:.2e} vs eager bf16 {eager_err:.2e}"


@pytest.mark.parametrize("kind", OP_KINDS, ids=[k.name for k in OP_KINDS])
def test_opcheck_bfloat16(kind):
    args = kind.make_args(5, 3, 4, 6, 2, dtype=torch.bfloat16, lengths=torch.tensor([5, 2, 4]),
                          requires_grad=True)
    torch.library.opcheck(kind.raw, (*args, True) if kind.keep_flag else tuple(args))


@pytest.mark.parametrize("cls,torch_cls", [(LSTM, torch.nn.LSTM), (GRU, torch.nn.GRU), (RNN, torch.nn.RNN)])
def test_autocast_module(cls, torch_cls):
    ref = torch_cls(24, 40, num_layers=2, bidirectional=True, batch_first=True)
    m = cls(24, 40, num_layers=2, bidirectional=True, batch_first=True)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 9, 24, requires_grad=True)
    lengths = torch.tensor([9, 1, 4, 7, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x, lengths=lengths)
        y_bf16_input, _ = m(x.detach().bfloat16(), lengths=lengths)  # bf16 input, fp32 module
    assert y.dtype == torch.bfloat16 and y_bf16_input.dtype == torch.bfloat16
    y32, _ = m(x, lengths=lengths)
    assert max_err(y, y32) < 0.03
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    g_ref = torch.autograd.grad(y32.sum(), m.weight_hh_l0)[0]
    assert max_err(m.weight_hh_l0.grad, g_ref) < 0.05 * g_ref.abs().max().item()
