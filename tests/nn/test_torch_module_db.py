"""The nn.RNN, nn.GRU and nn.LSTM entries of torch.testing._internal.common_modules.module_db
run through torch.nn and seqfuse.nn (issue 23).

For every sample of an entry's module_inputs_func (float32 and float64, train and eval;
RNN/GRU also with_packed_sequence=True): torch.nn's module is built from the sample's
constructor input, seqfuse.nn's from the same and given torch's state_dict, and both run
the sample's forward input. Outputs (PackedSequence data and batch_sizes too) and the
gradients of every input that requires grad and of every parameter are compared with
torch.testing.assert_close at per-dtype tolerances; the sample's reference_fn (the
unbatched-input reference) is checked on seqfuse's module as TestModule.test_forward does.
For every error input of module_error_inputs_func, torch.nn raises the listed type with
the listed message (the port's sanity check) and seqfuse.nn raises an instance of the type
torch.nn raised. The LSTM samples with proj_size > 0 are in test_torch_rnn_ported_proj.py.

torch.testing._internal.common_utils imports `expecttest` (PyTorch's test dependency, not
installed by this project) for one base class only: a stand-in module is put in its place
when it is missing. common_utils also calls torch.backends.disable_global_flags() at import,
which would forbid `torch.backends.cudnn.enabled = ...` in every later test of the session:
the flag is restored after the import.
"""
import importlib.util
import sys
import types
import unittest

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence


def _import_module_db():
    if importlib.util.find_spec("expecttest") is None and "expecttest" not in sys.modules:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        stub.ACCEPT = False
        sys.modules["expecttest"] = stub
    flags = vars(torch.backends)
    allow = flags.get("__allow_nonbracketed_mutation_flag", True)
    try:
        from torch.testing._internal import common_modules
    finally:
        flags["__allow_nonbracketed_mutation_flag"] = allow
    return common_modules


common_modules = _import_module_db()

import seqfuse.nn  # noqa: E402

INFOS = {info.module_cls.__name__: info for info in common_modules.module_db
         if info.module_cls in (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM)}
DTYPES = [torch.float32, torch.float64]
# outputs absolute, gradients relative + absolute, against torch.nn on the same dtype
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-8)}


def module_inputs(name, dtype, training, device="cpu"):
    info = INFOS[name]
    kwargs = {} if name == "LSTM" else {"with_packed_sequence": True}
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                   training=training, **kwargs)


def sample_id(sample) -> str:
    c, f = sample.constructor_input, sample.forward_input
    ctor = ",".join([*map(str, c.args), *(f"{k}={v}" for k, v in c.kwargs.items())])
    fwd = ",".join("packed" if isinstance(a, PackedSequence) else
                   "x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else
                   "(" + ",".join("x".join(map(str, t.shape)) for t in a) + ")"
                   for a in f.args)
    return f"{ctor}|{fwd}"


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, PackedSequence):
        return [x.data]
    return [t for y in x for t in _flat(y)]


def _detached(args):
    """The forward arguments anew, as leaves requiring grad where the sample's do."""
    def one(a):
        if isinstance(a, PackedSequence):
            return PackedSequence(one(a.data), a.batch_sizes, a.sorted_indices, a.unsorted_indices)
        if isinstance(a, torch.Tensor):
            return a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, (tuple, list)):
            return type(a)(one(t) for t in a)
        return a
    return [one(a) for a in args]


def run_and_compare(name, sample, dtype, training, ours_ns=seqfuse.nn):
    """Build both modules from `sample`, run them, compare outputs and gradients."""
    c, f = sample.constructor_input, sample.forward_input
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*c.args, **c.kwargs).to(dtype).train(training)
    ours = getattr(ours_ns, name)(*c.args, **c.kwargs).to(dtype).train(training)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())

    args_ref, args_ours = _detached(f.args), _detached(f.args)
    out_ref, out_ours = ref(*args_ref, **f.kwargs), ours(*args_ours, **f.kwargs)
    tol = TOL[dtype]
    if isinstance(out_ref[0], PackedSequence):
        assert isinstance(out_ours[0], PackedSequence)
        assert torch.equal(out_ours[0].batch_sizes, out_ref[0].batch_sizes)
    flat_ref, flat_ours = _flat(out_ref), _flat(out_ours)
    assert [t.shape for t in flat_ours] == [t.shape for t in flat_ref]
    for a, b in zip(flat_ours, flat_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tol["atol"], rtol=0)

    # a loss that weights every output element differently
    def loss(outs):
        return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in outs)

    leaves_ref = [t for t in _flat(args_ref) if t.requires_grad]
    leaves_ours = [t for t in _flat(args_ours) if t.requires_grad]
    g_ref = torch.autograd.grad(loss(flat_ref), leaves_ref + list(ref.parameters()))
    g_ours = torch.autograd.grad(loss(flat_ours), leaves_ours + list(ours.parameters()))
    names = [f"input {i}" for i in range(len(leaves_ref))] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, msg=n, **tol)

    # the sample's reference (unbatched input against a batch of one), as TestModule runs it
    if sample.reference_fn is not None and not any(isinstance(a, PackedSequence) for a in f.args):
        with torch.no_grad():
            got = ours(*_detached(f.args), **f.kwargs)
            want = sample.reference_fn(ours, *_detached(f.args), **f.kwargs)
        for a, b in zip(_flat(got), _flat(want), strict=True):
            torch.testing.assert_close(a, b, atol=tol["atol"], rtol=0)


def _forward_params(include_proj: bool):
    params = []
    for name in INFOS:
        for sample in module_inputs(name, torch.float32, True):
            proj = sample.constructor_input.kwargs.get("proj_size", 0) > 0
            if proj != include_proj:
                continue
            params.append(pytest.param(name, sample_id(sample), id=f"{name}-{sample_id(sample)}"))
    return params


def _sample(name, sid, dtype, training):
    for sample in module_inputs(name, dtype, training):
        if sample_id(sample) == sid:
            return sample
    raise LookupError(sid)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,sid", _forward_params(include_proj=False))
def test_module_db_forward_and_gradients(name, sid, dtype, training):
    run_and_compare(name, _sample(name, sid, dtype, training), dtype, training)


# -- error inputs -----------------------------------------------------------------------------

def error_inputs(name, dtype=torch.float32):
    info = INFOS[name]
    return info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                         training=True)


def error_id(err) -> str:
    c = err.module_error_input.constructor_input
    ctor = ",".join([*map(repr, c.args), *(f"{k}={v!r}" for k, v in c.kwargs.items())])
    return f"{err.error_on.name.lower()}({ctor})"


def _error_params():
    params = []
    for name in INFOS:
        for i, err in enumerate(error_inputs(name)):
            params.append(pytest.param(name, i, id=f"{name}-{error_id(err)}"))
    return params


@pytest.mark.parametrize("name,index", _error_params())
def test_module_db_error_inputs(name, index):
    err = error_inputs(name)[index]
    mi = err.module_error_input
    c, f = mi.constructor_input, mi.forward_input
    construction = err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR

    def call(ns):
        m = getattr(ns, name)(*c.args, **c.kwargs)
        if not construction:
            m(*f.args, **f.kwargs)

    with pytest.raises(err.error_type, match=err.error_regex) as want:
        call(torch.nn)
    with pytest.raises(Exception) as got:
        call(seqfuse.nn)
    assert isinstance(got.value, type(want.value)), (type(got.value).__mro__, type(want.value))
