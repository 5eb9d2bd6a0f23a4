"""PyTorch's own RNN tests, ported to run against torch.nn and seqfuse.nn (issue 23).

Each test takes `impl`, the namespace whose LSTM/GRU/RNN it exercises: torch.nn (the
port is checked against the original behaviour) or seqfuse.nn (the drop-in must behave
the same). The assertions, shapes and loops are PyTorch's; where a test only checks a
module against itself, the seqfuse case also compares its outputs and gradients with
torch.nn's module holding the same weights. CUDA-only tests skip without a GPU.

Sources: pytorch/pytorch test/test_nn.py (TestNN, TestNNDeviceType), test/test_autograd.py
(the *_grad_and_gradgrad tests and test_rnn_backward_to_input_but_not_parameters) and
test/nn/test_packed_sequence.py (the test_pack_* tests now live there). Projection
(proj_size) tests are in test_torch_rnn_ported_proj.py; module_db's entries in
test_torch_module_db.py.

Ported (name here = PyTorch's name; "_cpu" marks the CPU half of a test whose original
needs cuDNN or CUDA, kept because that half has a seqfuse meaning):

| PyTorch test | here |
| --- | --- |
| test_RNN_nonlinearity | test_RNN_nonlinearity |
| test_RNN_nonlinearity_passed_as_arg | test_RNN_nonlinearity_passed_as_arg |
| test_rnn_args_check | test_rnn_args_check |
| test_rnn_check_device (multi-GPU) | test_rnn_check_device (skips below 2 GPUs) |
| test_rnn_initial_hidden_state | test_rnn_initial_hidden_state |
| _test_RNN_cpu_vs_cudnn / test_RNN_cpu_vs_cudnn_no_dropout, _with_dropout | test_RNN_cpu_vs_cudnn_* (CUDA: impl on CPU vs impl on CUDA); test_RNN_cpu_vs_torch_cpu_* (the same matrix, seqfuse on CPU vs torch.nn on CPU) |
| test_RNN_cudnn_weight_norm | test_RNN_cudnn_weight_norm (CUDA); test_RNN_weight_norm_cpu |
| test_partial_flat_weights | test_partial_flat_weights (CUDA); test_partial_flat_weights_cpu |
| test_RNN_dropout | test_RNN_dropout (cuda=False half; CUDA half: test_RNN_dropout_cuda) |
| test_error_RNN_seq_len_zero | test_error_RNN_seq_len_zero (CPU device of its loop) |
| test_RNN_input_size_zero | test_RNN_input_size_zero |
| test_RNN_dropout_state | test_RNN_dropout_state (cuda=False half; CUDA half skips) |
| test_RNN_change_dropout | test_RNN_change_dropout (cuda=False half; CUDA half skips) |
| test_rnn_weight_norm | test_rnn_weight_norm (its proj_size half: _proj file) |
| test_variable_sequence | test_variable_sequence (proj_size=0; proj_size=2: _proj file) |
| test_rnn_retain_variables | test_rnn_retain_variables |
| test_rnn_fused (CUDA) | test_rnn_fused |
| test_LSTM_grad_and_gradgrad, test_GRU_grad_and_gradgrad (test_autograd.py) | same names (gradcheck + gradgradcheck in float64) |
| test_rnn_backward_to_input_but_not_parameters (test_autograd.py, CUDA) | same name on CPU, and _cuda |
| test_pack_padded_sequence (test_packed_sequence.py) | test_pack_padded_sequence: its cases fed through the modules |
| test_pack_sequence (test_packed_sequence.py) | test_pack_sequence: its sequences fed through the modules |

Not ported, and why:

| PyTorch test | why |
| --- | --- |
| test_RNN_cell, test_RNN_cell_forward_zero_hidden_size, test_LSTM_cell*, test_RNN_cell_no_broadcasting, test_lstmcell_backward_only_one_output_grad | RNNCell/GRUCell/LSTMCell: seqfuse has no cell modules |
| the cuDNN double-backward error check in _test_rnn_mod ("please disable the CuDNN backend") | cuDNN-only error; seqfuse has a double backward on every backend (test_*_grad_and_gradgrad runs it) |
| test_cudnn_weight_format, test_cudnn_weight_tying, test_cudnn_rnn_dropout_states_device, test_cudnn_forward_exception | cuDNN flat-weight buffers and dropout states: no seqfuse meaning (flatten_parameters is a no-op there) |
| test_LSTM_differentiable_backward_using_oneDNN | oneDNN on/off: no seqfuse meaning (its create_graph backward is covered by test_LSTM_grad_and_gradgrad) |
| test_pack_* assertions on torch.nn.utils.rnn alone (test_type_casts, test_wrong_order, test_total_length, test_to, pad/unpad_sequence) | they test torch's packing utilities, which seqfuse uses and does not replace; what involves the modules is ported above |

Error messages: PyTorch's regexes are asserted on torch.nn. seqfuse raises instances of
the same exception types with its own messages (issue 23 keeps them), so on seqfuse the
type is asserted, not the wording.
"""
import contextlib
import copy
import io
import itertools
import random
import re
import warnings
from copy import deepcopy
from functools import partial
from itertools import product

import pytest
import torch
import torch.nn.utils.rnn as rnn_utils
from torch.autograd import gradcheck, gradgradcheck

import seqfuse.nn

IMPLS = [pytest.param(torch.nn, id="torch"), pytest.param(seqfuse.nn, id="seqfuse")]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available: the original test compares with or runs on a GPU")
needs_multigpu = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2,
                                    reason="multi-GPU not available (the original needs 2 GPUs)")
# torch.testing._internal.common_utils.dtype2prec_DONTUSE (common_utils needs expecttest,
# which this project does not install)
DTYPE2PREC = {torch.float: 1e-5, torch.double: 1e-5, torch.half: 1e-2, torch.bfloat16: 1e-1}


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def is_seqfuse(impl) -> bool:
    return impl is seqfuse.nn


@contextlib.contextmanager
def default_dtype(dtype):
    """common_utils.set_default_dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, rnn_utils.PackedSequence):
        return [x.data]
    return [t for y in x for t in _flat(y)]


def assert_equal(a, b, atol=None, rtol=None, msg=None):
    """TestCase.assertEqual for tensors, (nested) sequences of them, numbers and None."""
    if a is None or b is None:
        assert a is None and b is None, msg
        return
    if isinstance(a, (list, tuple)) and not (isinstance(b, torch.Tensor)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), msg
        for x, y in zip(a, b):
            assert_equal(x, y, atol, rtol, msg)
        return
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    b = b if isinstance(b, torch.Tensor) else torch.as_tensor(b, dtype=a.dtype, device=a.device)
    if atol is None and rtol is None:
        torch.testing.assert_close(a, b, msg=msg, check_dtype=False)
    else:
        torch.testing.assert_close(a, b, atol=atol or 0, rtol=rtol or 0, msg=msg, check_dtype=False)


def assert_not_equal(a, b):
    with pytest.raises(AssertionError):
        assert_equal(a, b)


def raises(impl, exc_type, regex, fn):
    """assertRaisesRegex: the type on both impls, PyTorch's regex on torch.nn."""
    with pytest.raises(exc_type) as info:
        fn()
    if not is_seqfuse(impl):
        assert re.search(regex, str(info.value)), (regex, str(info.value))
    return info.value


def torch_twin(m, *args, **kwargs):
    """torch.nn's module of m's class, built with (args, kwargs), holding m's weights."""
    twin = getattr(torch.nn, type(m).__name__)(*args, **kwargs)
    twin.load_state_dict(m.state_dict())
    return twin.to(m.weight_ih_l0.device, m.weight_ih_l0.dtype).train(m.training)


# ---------------------------------------------------------------------------------------
# TestNN
# ---------------------------------------------------------------------------------------


def test_RNN_nonlinearity(impl):
    rnn = impl.RNN(1, 10)
    assert rnn.nonlinearity == 'tanh'

    rnn = impl.RNN(1, 10, nonlinearity='relu')
    assert rnn.nonlinearity == 'relu'

    raises(impl, ValueError, 'Unknown nonlinearity', lambda: impl.RNN(1, 10, nonlinearity='garbage'))


def test_RNN_nonlinearity_passed_as_arg(impl):
    rnn = impl.RNN(2, 3, 1, 'relu')
    assert rnn.nonlinearity == 'relu'
    x = torch.randn(4, 2, 2)
    torch.testing.assert_close(rnn(x)[0], torch_twin(rnn, 2, 3, 1, 'relu')(x)[0])


def test_rnn_args_check(impl):
    input_size = 3
    hidden_size = 5
    num_layers = 2
    batch_size = 4
    seq_len = 6
    num_directions = 1
    bad_size = 7  # prime number so that no size can divide it.

    def test(input_shape, hidden_shape, mode):
        for input, hidden in get_inputs(input_shape, hidden_shape, mode):
            model = getattr(impl, mode)(input_size, hidden_size, num_layers)
            with pytest.raises(RuntimeError):
                model(input, hidden)

    correct_input_shape = (seq_len, batch_size, input_size)
    correct_hidden_shape = (num_layers * num_directions, batch_size, hidden_size)

    def update_shape(shape, dim, new_dim_size):
        new_shape = list(shape)
        new_shape[dim] = new_dim_size
        return tuple(new_shape)

    def get_inputs(input_shape, hidden_shape, mode):
        '''returns list( tuple(input, hidden) )
        where input, hidden are inputs to a model'''
        input = torch.randn(input_shape)
        hidden = torch.randn(hidden_shape)
        if mode != 'LSTM':
            return [(input, hidden)]
        if hidden_shape == correct_hidden_shape:
            return [(input, (hidden, hidden))]
        good_hidden = torch.randn(correct_hidden_shape)
        return [
            (input, (hidden, good_hidden)),
            (input, (good_hidden, hidden)),
        ]

    rnn_modes = ['RNN', 'GRU', 'LSTM']
    for mode in rnn_modes:
        # Incorrect input batch size
        input_shape = update_shape(correct_input_shape, 1, bad_size)
        hidden_shape = correct_hidden_shape
        test(input_shape, hidden_shape, mode)

        # Incorrect hidden batch size
        input_shape = correct_input_shape
        hidden_shape = update_shape(correct_hidden_shape, 1, bad_size)
        test(input_shape, hidden_shape, mode)

        # Incorrect input size
        input_shape = update_shape(correct_input_shape, 2, bad_size)
        hidden_shape = correct_hidden_shape
        test(input_shape, hidden_shape, mode)

        # Incorrect hidden size
        input_shape = correct_input_shape
        hidden_shape = update_shape(correct_hidden_shape, 2, bad_size)
        test(input_shape, hidden_shape, mode)

        # Incorrect hidden[0]
        input_shape = correct_input_shape
        hidden_shape = update_shape(correct_hidden_shape, 0, bad_size)
        test(input_shape, hidden_shape, mode)


@needs_multigpu
def test_rnn_check_device(impl):
    input_size = 3
    hidden_size = 5
    num_layers = 2
    batch_size = 4
    seq_len = 6
    num_directions = 1

    correct_input_shape = (seq_len, batch_size, input_size)
    correct_hidden_shape = (num_layers * num_directions, batch_size, hidden_size)
    rnn_modes = ['RNN', 'GRU', 'LSTM']

    for mode in rnn_modes:
        model = getattr(impl, mode)(input_size, hidden_size, num_layers)
        model_cuda = copy.deepcopy(model).to('cuda:0')
        input = torch.randn(correct_input_shape)
        hidden = torch.randn(correct_hidden_shape)

        # input and weights are not at the same device
        raises(impl, RuntimeError, "Input and parameter tensors are not at the same device",
               lambda: model(input.to('cuda:0')))
        raises(impl, RuntimeError, "Input and parameter tensors are not at the same device",
               lambda: model_cuda(input))

        # input and hiddens are not at the same device
        if mode == 'LSTM':
            raises(impl, RuntimeError, r"Input and hidden tensors are not at the same device",
                   lambda: model(input, (hidden.to('cuda:0'), hidden.to('cuda:0'))))
            raises(impl, RuntimeError, r"Input and hidden tensors are not at the same device",
                   lambda: model_cuda(input.to('cuda:0'), (hidden, hidden)))
            # hidden tensors are not at the same CUDA device
            raises(impl, RuntimeError, "Input and hidden tensors are not at the same device",
                   lambda: model(input.to('cuda:0'), (hidden.to('cuda:0'), hidden.to('cuda:1'))))
        else:
            raises(impl, RuntimeError, r"Input and hidden tensors are not at the same device",
                   lambda: model(input, (hidden.to('cuda:0'))))
            raises(impl, RuntimeError, r"Input and hidden tensors are not at the same device",
                   lambda: model_cuda(input.to('cuda:0'), (hidden)))


def test_rnn_initial_hidden_state(impl):
    rnn_modes = ['RNN', 'GRU', 'LSTM']
    for mode in rnn_modes:
        rnn = getattr(impl, mode)(30, 20, 2)
        input = torch.randn(10, 32, 30)
        hidden = torch.zeros(2, 32, 20)

        if mode == 'LSTM':
            hidden = (hidden, hidden)
        output1, hidden1 = rnn(input, hidden)
        output2, hidden2 = rnn(input)
        assert_equal(output1, output2)
        assert_equal(hidden1, hidden2)
        if is_seqfuse(impl):
            output3, hidden3 = torch_twin(rnn, 30, 20, 2)(input)
            assert_equal(output1, output3, atol=1e-5, rtol=0)
            assert_equal(hidden1, hidden3, atol=1e-5, rtol=0)


# -- _test_RNN_cpu_vs_cudnn ---------------------------------------------------------------

def _forward_backward(device, rnn, input_val, grad_output, weights_val, hx_val, grad_hy,
                      cx_val=None, grad_cy=None):
    """_test_RNN_cpu_vs_cudnn's forward_backward; `cuda` became the device to run on."""
    is_lstm = type(rnn).__name__ == "LSTM"

    for x_layer, y_layer in zip(rnn.all_weights, weights_val):
        for x, y in zip(x_layer, y_layer):
            x.data.copy_(y.data)

    if isinstance(input_val, rnn_utils.PackedSequence):
        input = rnn_utils.PackedSequence(
            input_val.data.data.requires_grad_(True), input_val.batch_sizes)
        input_var = input.data
    else:
        input = input_val.clone().requires_grad_(True)
        input_var = input
    if is_lstm:
        if cx_val is None:
            hx = (hx_val.clone().requires_grad_(True),
                  hx_val.add(1).requires_grad_(True))
        else:
            hx = (hx_val.clone().requires_grad_(True),
                  cx_val.add(1).requires_grad_(True))
    else:
        hx = hx_val.clone().requires_grad_(True)

    if device != "cpu":
        rnn.to(device)
        input_var.data = input_var.data.to(device)
        if is_lstm:
            hx[0].data = hx[0].data.to(device)
            hx[1].data = hx[1].data.to(device)
        else:
            hx.data = hx.data.to(device)
        grad_hy = grad_hy.to(device)
        if grad_cy is not None:
            grad_cy = grad_cy.to(device)
        grad_output = grad_output.to(device)

    output, hy = rnn(input, hx)

    if isinstance(output, rnn_utils.PackedSequence):
        output = output.data

    if is_lstm:
        if grad_cy is None:
            torch.autograd.backward([output, hy[0], hy[1]], [grad_output, grad_hy, grad_hy + 1])
        else:
            torch.autograd.backward([output, hy[0], hy[1]], [grad_output, grad_hy, grad_cy + 1])
    else:
        torch.autograd.backward([output, hy], [grad_output, grad_hy])

    return {'output': output.data,
            'hy': hy[0].data if is_lstm else hy.data,
            'weights': rnn.all_weights,
            'grad_input': input_var.grad.data,
            'grad_hx': hx[0].grad.data if is_lstm else hx.grad.data,
            'cy': hy[1].data if is_lstm else None,
            'grad_cx': hx[1].grad.data if is_lstm else None}


def _compare_cpu_gpu(outputs_cpu, outputs_gpu):
    assert list(outputs_cpu.keys()) == list(outputs_gpu.keys())
    for key in outputs_cpu.keys():
        if key != 'weights':
            assert_equal(outputs_cpu[key], outputs_gpu[key] if outputs_gpu[key] is None
                         else outputs_gpu[key].cpu(), atol=5e-5, rtol=0, msg=key)

    # check grad weights separately, as nested dict
    for cpu_layer_weight, gpu_layer_weight in zip(outputs_cpu['weights'], outputs_gpu['weights']):
        for (cpu_weight, gpu_weight) in zip(cpu_layer_weight, gpu_layer_weight):
            assert_equal(cpu_weight.grad.data, gpu_weight.grad.data.cpu(), atol=5e-5, rtol=0)


def _make_noncontig(tensor):
    ndim = tensor.dim()
    return torch.stack([tensor.clone().zero_(), tensor], ndim).select(ndim, 1)


def _rnn_cpu_vs(ref_impl, impl, device, module_name, dropout, dtype=torch.double):
    """The module loop of _test_RNN_cpu_vs_cudnn for one module class: `ref_impl` on the
    CPU against `impl` on `device` (the original: torch.nn on CPU against torch.nn on
    cuDNN). The nonlinearity loop runs with the RNN."""
    input_size = 10
    hidden_size = 6
    num_layers = 2
    seq_length = 7
    batch = 6
    ref_module, module = getattr(ref_impl, module_name), getattr(impl, module_name)

    for bias, bidirectional, batch_first, contig, variable_len, lens_as_tensor \
            in product((True, False), repeat=6):

        num_directions = 2 if bidirectional else 1
        if batch_first:
            input_val = torch.randn(batch, seq_length, input_size, dtype=dtype)
            grad_output = torch.randn(batch, seq_length, hidden_size * num_directions, dtype=dtype)
        else:
            input_val = torch.randn(seq_length, batch, input_size, dtype=dtype)
            grad_output = torch.randn(seq_length, batch, hidden_size * num_directions, dtype=dtype)

        hx_val = torch.randn(num_layers * num_directions, batch, hidden_size, dtype=dtype)
        grad_hy = torch.randn(num_layers * num_directions, batch, hidden_size, dtype=dtype)

        if not contig:
            grad_output = _make_noncontig(grad_output)
            grad_hy = _make_noncontig(grad_hy)
            # (the original assigns this to an unused name, so its input stays contiguous;
            # here the input is made non-contiguous as the case intends)
            input_val = _make_noncontig(input_val)
            hx_val = _make_noncontig(hx_val)

        if variable_len:
            lengths = [7, 5, 5, 2, 1, 1]
            if lens_as_tensor:
                lengths = torch.tensor(lengths, dtype=torch.long)
            input_val = rnn_utils.pack_padded_sequence(input_val, lengths, batch_first=batch_first)
            grad_output = rnn_utils.pack_padded_sequence(grad_output, lengths, batch_first=batch_first).data

        rnn = ref_module(input_size, hidden_size, num_layers, bias=bias, dropout=dropout,
                         bidirectional=bidirectional, batch_first=batch_first).to(dtype)

        outputs_cpu = _forward_backward(
            "cpu", rnn, input_val, grad_output, rnn.all_weights, hx_val, grad_hy)

        rnn_gpu = module(input_size, hidden_size, num_layers, bias=bias, dropout=dropout,
                         bidirectional=bidirectional, batch_first=batch_first).to(dtype)

        outputs_gpu = _forward_backward(
            device, rnn_gpu, input_val, grad_output, rnn.all_weights, hx_val, grad_hy)

        _compare_cpu_gpu(outputs_cpu, outputs_gpu)

    if module_name != "RNN":
        return
    for nonlinearity in ('tanh', 'relu'):
        # (bias and num_directions leak from the loop above: False and 1)
        hx_val = torch.randn(num_layers, batch, hidden_size, dtype=dtype)
        input_val = torch.randn(seq_length, batch, input_size, dtype=dtype)
        grad_output = torch.randn(
            seq_length, batch, hidden_size * num_directions, dtype=dtype)
        grad_hy = torch.randn(
            num_layers * num_directions, batch, hidden_size, dtype=dtype)

        rnn = ref_impl.RNN(input_size, hidden_size, num_layers, bias=bias, nonlinearity=nonlinearity).to(dtype)
        outputs_cpu = _forward_backward("cpu", rnn, input_val, grad_output, rnn.all_weights, hx_val, grad_hy)

        rnn_gpu = impl.RNN(input_size, hidden_size, num_layers, bias=bias, nonlinearity=nonlinearity).to(dtype)
        outputs_gpu = _forward_backward(device, rnn_gpu, input_val, grad_output, rnn.all_weights, hx_val, grad_hy)

        _compare_cpu_gpu(outputs_cpu, outputs_gpu)


MODULES = ["RNN", "LSTM", "GRU"]


@needs_cuda
@pytest.mark.parametrize("module_name", MODULES)
def test_RNN_cpu_vs_cudnn_no_dropout(impl, module_name):
    _rnn_cpu_vs(impl, impl, "cuda", module_name, 0)


@needs_cuda
@pytest.mark.parametrize("module_name", MODULES)
def test_RNN_cpu_vs_cudnn_with_dropout(impl, module_name):
    # Because of dropout randomness, can only compare dropout=0 and dropout=1
    _rnn_cpu_vs(impl, impl, "cuda", module_name, 1)


@pytest.mark.parametrize("module_name", MODULES)
def test_RNN_cpu_vs_torch_cpu_no_dropout(module_name):
    """The matrix of _test_RNN_cpu_vs_cudnn with seqfuse.nn on the CPU in the place of
    cuDNN: every option, packed (lengths as a list and a tensor) and padded,
    non-contiguous inputs and states, against torch.nn's outputs and gradients."""
    _rnn_cpu_vs(torch.nn, seqfuse.nn, "cpu", module_name, 0)


@pytest.mark.parametrize("module_name", MODULES)
def test_RNN_cpu_vs_torch_cpu_with_dropout(module_name):
    _rnn_cpu_vs(torch.nn, seqfuse.nn, "cpu", module_name, 1)


# -- weight norm, partial flat weights -------------------------------------------------------

def _check_weight_norm(impl, device, m, name, seq_length=7, batch=6, input_size=10):
    """test_RNN_cudnn_weight_norm's check_weight_norm: the output is kept by weight_norm
    and by its removal (on `device`)."""
    input = torch.randn(seq_length, batch, input_size)
    expected_output = m(input)

    # adds weight normalization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        m = torch.nn.utils.weight_norm(m, name=name)

    # moves to the device
    m = m.to(device)
    input = input.to(device)

    got = m(input)
    assert_equal(_flat(got), [t.to(device) for t in _flat(expected_output)])

    # remove weight norm
    m = torch.nn.utils.remove_weight_norm(m, name=name)
    assert_equal(_flat(m(input)), [t.to(device) for t in _flat(expected_output)])


@needs_cuda
def test_RNN_cudnn_weight_norm(impl):
    input_size, hidden_size, num_layers = 10, 6, 2
    _check_weight_norm(impl, "cuda", impl.LSTM(input_size, hidden_size, num_layers), 'weight_hh_l0')


def test_RNN_weight_norm_cpu(impl):
    input_size, hidden_size, num_layers = 10, 6, 2
    _check_weight_norm(impl, "cpu", impl.LSTM(input_size, hidden_size, num_layers), 'weight_hh_l0')


def _partial_flat_weights(impl, device):
    input_size = 10
    hidden_size = 6
    num_layers = 2

    m = impl.LSTM(input_size, hidden_size, num_layers)
    inp = torch.randn(3, 2, 10)
    out_expected = m(inp)
    # deletes an attribute of original LSTM
    weight_orig = m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    # verifies that moving with only some attributes defined does not throw an error
    m.to(device)
    # recompute the weight and make sure that module can be used
    m.weight_hh_l0 = weight_orig.to(device) if device != "cpu" else weight_orig.clone()
    inp = inp.to(device)
    assert_equal(m(inp)[0].cpu(), out_expected[0])


@needs_cuda
def test_partial_flat_weights(impl):
    _partial_flat_weights(impl, "cuda")


def test_partial_flat_weights_cpu(impl):
    """On the CPU the move is .to('cpu') and the weight put back is a plain tensor (as
    `weight_orig.cuda()` is in the original)."""
    _partial_flat_weights(impl, "cpu")


# -- dropout ----------------------------------------------------------------------------------

def _rnn_dropout(impl, cuda):
    # checking the assumption that cuDNN sticks dropout in between RNN layers
    with default_dtype(torch.double):
        for p in (0, 0.276, 0.731, 1):
            for train in (True, False):
                rnn = impl.RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity='relu')
                if cuda:
                    rnn.cuda()

                if train:
                    rnn.train()
                else:
                    rnn.eval()
                rnn.weight_ih_l0.data.fill_(1)
                rnn.weight_hh_l0.data.fill_(1)
                rnn.weight_ih_l1.data.fill_(1)
                rnn.weight_hh_l1.data.fill_(1)
                input = torch.ones(1, 1, 10)
                hx = torch.zeros(2, 1, 1000)
                if cuda:
                    input = input.cuda()
                    hx = hx.cuda()

                output, hy = rnn(input, hx)
                assert_equal(output.data.min(), output.data.max())
                output_val = output.data[0][0][0]
                if p == 0 or not train:
                    assert_equal(output_val, 10000)
                elif p == 1:
                    assert_equal(output_val, 0)
                else:
                    assert output_val > 8000
                    assert output_val < 12000
                    denorm_mod = (output_val * (1 - p)) % 10
                    assert min(denorm_mod, 10 - denorm_mod) < 1e-2

                assert_equal(hy[0].data.min(), hy[0].data.max())
                assert_equal(hy[1].data.min(), hy[1].data.max())
                assert_equal(hy.data[0][0][0], 10)
                assert_equal(hy.data[1][0][0], output_val)


def test_RNN_dropout(impl):
    _rnn_dropout(impl, cuda=False)


@needs_cuda
def test_RNN_dropout_cuda(impl):
    _rnn_dropout(impl, cuda=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_error_RNN_seq_len_zero(impl, device):
    # checking error message when RNN has seq_len = 0
    with default_dtype(torch.double):
        for module in (impl.RNN, impl.LSTM, impl.GRU):
            for bidirectional in [True, False]:
                input = torch.ones(0, 10, 5)
                rnn = module(5, 6, bidirectional=bidirectional)
                if device == 'cuda':
                    rnn.cuda()
                    input = input.cuda()

                raises(impl, RuntimeError, "Expected sequence length to be larger than 0 in RNN",
                       lambda: rnn(input))


@pytest.mark.parametrize("impl", [pytest.param(torch.nn, id="torch"), pytest.param(seqfuse.nn, id="seqfuse")])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_RNN_input_size_zero(impl, device):
    for module in (impl.RNN, impl.LSTM, impl.GRU):
        input = torch.zeros((5, 0, 3))
        rnn = module(input_size=3, hidden_size=4)
        if device == 'cuda':
            rnn.cuda()
            input = input.cuda()
        outs = rnn(input)
        assert outs[0].shape == torch.Size([5, 0, 4])
        # Check that backward does not cause a hard error
        outs[0].sum().backward()


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=needs_cuda)], ids=["cpu", "cuda"])
def test_RNN_dropout_state(impl, cuda):
    for p in (0, 0.1234):
        for train in (True, False):
            rnn = impl.RNN(100, 100, 2, bias=False, dropout=p, nonlinearity='relu')
            if cuda:
                rnn.cuda()

            if train:
                rnn.train()
            else:
                rnn.eval()
            input = torch.rand(1, 1, 100)
            hx = torch.rand(2, 1, 100)
            if cuda:
                input = input.cuda()
                hx = hx.cuda()

            output1, hy1 = rnn(input, hx)
            output2, hy2 = rnn(input, hx)

            buf = io.BytesIO()
            torch.save(rnn, buf)
            buf.seek(0)
            # weights_only=False as this is legacy code that saves the model
            rnn2 = torch.load(buf, weights_only=False)
            assert type(rnn2) is type(rnn)
            rnn2.flatten_parameters()
            output3, hy3 = rnn2(input, hx)

            if p == 0 or not train:
                assert_equal(output1, output2)
                assert_equal(output1, output3)
                assert_equal(hy1, hy2)
                assert_equal(hy1, hy3)
            else:
                assert_not_equal(output1, output2)
                assert_not_equal(output1, output3)
                assert_not_equal(hy1, hy2)
                assert_not_equal(hy1, hy3)


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=needs_cuda)], ids=["cpu", "cuda"])
def test_RNN_change_dropout(impl, cuda):
    with default_dtype(torch.double):
        for train in (True, False):
            rnn = impl.RNN(100, 100, 2, dropout=0, nonlinearity='relu')
            input = torch.rand(3, 2, 100)
            if cuda:
                input.data = input.data.cuda()
                rnn.cuda()

            if train:
                rnn.train()
            else:
                rnn.eval()

            prev_output = None
            for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
                rnn.dropout = p
                output1, hy1 = rnn(input)
                output2, hy2 = rnn(input)

                if p == 0 or p == 1 or not train:
                    assert_equal(output1, output2)
                    assert_equal(hy1, hy2)
                else:
                    assert_not_equal(output1, output2)
                    assert_not_equal(hy1, hy2)

                if prev_output is not None:
                    if not train:
                        assert_equal(output1.data, prev_output)
                        assert_equal(output2.data, prev_output)
                    else:
                        assert_not_equal(output1.data, prev_output)
                        assert_not_equal(output2.data, prev_output)
                prev_output = output1.data


def test_rnn_weight_norm(impl):
    def check_weight_norm(l, name, num_params):
        # This Module has 4 or 5 parameters called:
        # 'weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0', weight_hr_l0

        # Applying weight norm on one of them causes it to become a tensor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
            l = torch.nn.utils.weight_norm(l, name=name)
        assert sum(isinstance(p, torch.nn.Parameter) for p in l._flat_weights) == num_params - 1

        # Removing the weight norm reparametrization restores the Parameter
        l = torch.nn.utils.remove_weight_norm(l, name=name)
        assert sum(isinstance(p, torch.nn.Parameter) for p in l._flat_weights) == num_params

        # Make sure that, upon removal of the reparametrization, the
        # `._parameters` and `.named_parameters` contain the right params.
        # Specifically, the original weight ('weight_ih_l0') should be placed
        # back in the parameters, while the reparametrization components
        # ('weight_ih_l0_v' and 'weight_ih_l0_g') should be removed.
        assert name in l._parameters
        assert l._parameters[name] is not None
        assert name + '_v' not in l._parameters
        assert name + '_g' not in l._parameters
        assert name in dict(l.named_parameters())
        assert dict(l.named_parameters())[name] is not None
        assert name + '_v' not in dict(l.named_parameters())
        assert name + '_g' not in dict(l.named_parameters())

    check_weight_norm(impl.LSTM(32, 32), 'weight_ih_l0', 4)


# ---------------------------------------------------------------------------------------
# TestNNDeviceType (CPU; test_rnn_fused is CUDA-only)
# ---------------------------------------------------------------------------------------


def _variable_sequence(impl, device, dtype, proj_size_values):
    """test_variable_sequence; with seqfuse the packed outputs and the gradients are also
    compared with torch.nn's LSTM holding the same weights."""
    def pad(var, length):
        if var.size(0) == length:
            return var
        return torch.cat([var, var.new_zeros(length - var.size(0), *var.size()[1:])])

    def maybe_index_tuple(maybe_tuple_of_tensors, index):
        if maybe_tuple_of_tensors is None:
            return None
        return tuple(maybe_tuple_of_tensors[j][:, index:index + 1, :].contiguous()
                     for j in range(2))

    def check_lengths(lengths, enforce_sorted, use_default_hiddens, proj_size):
        input_size = 3
        hidden_size = 4
        num_layers = 2
        bidirectional = True

        max_length = max(lengths)
        x_leaf = torch.randn(max_length, len(lengths), input_size, device=device,
                             dtype=dtype, requires_grad=True)
        num_directions = 2 if bidirectional else 1
        lstm = impl.LSTM(input_size, hidden_size, bidirectional=bidirectional,
                         num_layers=num_layers, proj_size=proj_size).to(device, dtype)
        lstm2 = deepcopy(lstm).to(device, dtype)
        x = x_leaf

        hidden0 = None
        if not use_default_hiddens:
            real_hidden_size = hidden_size if proj_size == 0 else proj_size
            hidden0 = (torch.randn(num_directions * num_layers, len(lengths), real_hidden_size,
                                   device=device, dtype=dtype),
                       torch.randn(num_directions * num_layers, len(lengths), hidden_size,
                                   device=device, dtype=dtype))

        # Compute sequences separately
        seq_outs = []
        seq_hiddens = []
        for i, l in enumerate(lengths):
            hidden_i = maybe_index_tuple(hidden0, i)
            out, hid = lstm2(x[:l, i:i + 1], hidden_i)
            out_pad = pad(out, max_length)
            seq_outs.append(out_pad)
            seq_hiddens.append(hid)
        seq_out = torch.cat(seq_outs, 1)
        seq_hidden = tuple(torch.cat(hids, 1) for hids in zip(*seq_hiddens))

        # Use packed format
        packed = rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        packed_out, packed_hidden = lstm(packed, hidden0)
        unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)

        # Check forward
        prec = DTYPE2PREC[dtype]
        assert_equal(packed_hidden, seq_hidden, atol=prec, rtol=0)
        assert_equal(unpacked, seq_out, atol=prec, rtol=0)
        assert_equal(unpacked_len, lengths, atol=prec, rtol=0)

        # Check backward
        seq_out.sum().backward()
        grad_x = x_leaf.grad.data.clone()
        x_leaf.grad.data.zero_()
        unpacked.sum().backward()

        assert_equal(x_leaf.grad, grad_x, atol=DTYPE2PREC[dtype], rtol=0)
        for p1, p2 in zip(lstm.parameters(), lstm2.parameters()):
            prec = DTYPE2PREC[dtype]
            if dtype == torch.float16:
                prec = 4e-2
            elif dtype == torch.float32:
                prec = 2e-4
            assert_equal(p1.grad, p2.grad, atol=prec, rtol=0)

        if is_seqfuse(impl):  # and the same as torch.nn's
            ref = torch.nn.LSTM(input_size, hidden_size, bidirectional=bidirectional,
                                num_layers=num_layers, proj_size=proj_size).to(device, dtype)
            ref.load_state_dict(lstm.state_dict())
            x_new = x_leaf.detach().clone().requires_grad_(True)
            x_ref = x_leaf.detach().clone().requires_grad_(True)
            lstm.zero_grad()
            new_out, new_hidden = lstm(rnn_utils.pack_padded_sequence(
                x_new, lengths, enforce_sorted=enforce_sorted), hidden0)
            ref_out, ref_hidden = ref(rnn_utils.pack_padded_sequence(
                x_ref, lengths, enforce_sorted=enforce_sorted), hidden0)
            assert torch.equal(new_out.batch_sizes, ref_out.batch_sizes)
            assert_equal(new_out.data, ref_out.data, atol=prec, rtol=0)
            assert_equal(new_hidden, ref_hidden, atol=prec, rtol=0)
            rnn_utils.pad_packed_sequence(new_out)[0].sum().backward()
            rnn_utils.pad_packed_sequence(ref_out)[0].sum().backward()
            assert_equal(x_new.grad, x_ref.grad, atol=prec, rtol=0)
            for (name, p1), p2 in zip(lstm.named_parameters(), ref.parameters()):
                assert_equal(p1.grad, p2.grad, atol=prec, rtol=0, msg=name)

    tests = [
        # enforce_sorted, lengths
        [True, [5]],
        [False, [5]],
        [True, [10, 10, 6, 2, 2, 1, 1]],
        [False, [10, 10, 6, 2, 2, 1, 1]],
        [False, [2, 1, 3, 2, 10, 5, 3]],
    ]

    for enforce_sorted, seq_lens, in tests:
        for use_default_hiddens in (True, False):
            for proj_size in proj_size_values:
                check_lengths(seq_lens, enforce_sorted, use_default_hiddens, proj_size)


def test_variable_sequence(impl):
    # @dtypes(torch.float) on the CPU; the proj_size=2 half is in the _proj file
    _variable_sequence(impl, "cpu", torch.float, [0])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.half, torch.float, torch.double], ids=str)
def test_variable_sequence_cuda(impl, dtype):
    _variable_sequence(impl, "cuda", dtype, [0])


def test_rnn_retain_variables(impl):
    # @dtypes(torch.double)
    dtype, device = torch.double, "cpu"
    rnns = [impl.LSTM(10, 20, num_layers=2).to(device, dtype),
            impl.GRU(10, 20, num_layers=2).to(device, dtype),
            impl.RNN(10, 20, num_layers=2).to(device, dtype)]
    for rnn in rnns:
        input = torch.randn(5, 6, 10, device=device, dtype=dtype, requires_grad=True)
        output = rnn(input)
        output[0].sum().backward(retain_graph=True)
        grads = [input.grad.data.clone()] + [p.grad.data.clone() for p in rnn.parameters()]
        for _ in range(4):
            rnn.zero_grad()
            input.grad.data.zero_()
            output[0].sum().backward(retain_graph=True)
            grads2 = [input.grad.data] + [p.grad.data for p in rnn.parameters()]
            assert_equal(grads, grads2)
        if is_seqfuse(impl):
            ref = torch_twin(rnn, 10, 20, num_layers=2)
            x = input.detach().clone().requires_grad_(True)
            ref(x)[0].sum().backward()
            assert_equal(grads, [x.grad] + [p.grad for p in ref.parameters()], atol=1e-10, rtol=1e-8)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float, torch.double], ids=str)
def test_rnn_fused(impl, dtype):
    device = "cuda"

    def copy_rnn(rnn1, rnn2):
        for x_layer, y_layer in zip(rnn1.all_weights, rnn2.all_weights):
            for x, y in zip(x_layer, y_layer):
                x.data.copy_(y.data)

    def check_rnn_grads(rnn1, rnn2):
        for x_layer, y_layer in zip(rnn1.all_weights, rnn2.all_weights):
            for x, y in zip(x_layer, y_layer):
                assert_equal(x.grad, y.grad.cpu(), atol=5e-5, rtol=0)

    input_size = 10
    hidden_size = 6
    num_layers = 2
    seq_length = 7
    batch = 6
    input_val = torch.randn(seq_length, batch, input_size, dtype=dtype)
    grad_output = torch.randn(seq_length, batch, hidden_size, dtype=dtype)
    hx_val = torch.randn(num_layers, batch, hidden_size, dtype=dtype)
    grad_hy = torch.randn(num_layers, batch, hidden_size, dtype=dtype)
    tol = dict(atol=5e-3, rtol=5e-3) if dtype == torch.float else {}  # @tf32_on_and_off(0.005)
    with torch.backends.cudnn.flags(enabled=False, allow_tf32=None):
        for module in (impl.GRU, impl.LSTM):
            for bias in (True, False):
                rnn = module(input_size, hidden_size, num_layers, bias=bias).to(dtype)
                rnn_device = module(input_size, hidden_size, num_layers, bias=bias).to(device, dtype)
                copy_rnn(rnn, rnn_device)

                is_lstm = module.__name__ == "LSTM"
                if is_lstm:
                    hx = (hx_val.clone().requires_grad_(True),
                          hx_val.clone().add(1).requires_grad_(True))
                    hx_device = (hx_val.clone().to(device).requires_grad_(True),
                                 hx_val.clone().to(device).add(1).requires_grad_(True))
                else:
                    hx = hx_val.clone().requires_grad_(True)
                    hx_device = hx_val.clone().to(device).requires_grad_(True)

                inp = input_val.clone().requires_grad_(True)
                inp_cu = input_val.clone().to(device).requires_grad_(True)
                output1, hy1 = rnn(inp, hx)
                output2, hy2 = rnn_device(inp_cu, hx_device)
                if is_lstm:
                    torch.autograd.backward(
                        [output1, hy1[0], hy1[1]], [grad_output, grad_hy, grad_hy + 1]
                    )
                    torch.autograd.backward(
                        [output2, hy2[0], hy2[1]],
                        [grad_output.to(device), grad_hy.to(device), (grad_hy + 1).to(device)]
                    )
                else:
                    torch.autograd.backward([output1, hy1], [grad_output, grad_hy])
                    torch.autograd.backward([output2, hy2], [grad_output.to(device), grad_hy.to(device)])

                assert_equal(output1, output2.cpu(), **tol)
                assert_equal(_flat(hy1), [t.cpu() for t in _flat(hy2)], **tol)

                check_rnn_grads(rnn, rnn_device)
                assert_equal(inp.grad, inp_cu.grad.cpu(), **tol)
                if is_lstm:
                    assert_equal(hx[0].grad, hx_device[0].grad.cpu(), **tol)
                    assert_equal(hx[1].grad, hx_device[1].grad.cpu(), **tol)
                else:
                    assert_equal(hx.grad, hx_device.grad.cpu(), **tol)


# -- test_autograd.py (TestAutogradDeviceType) ------------------------------------------------

def _test_rnn_mod(mod, inp):
    def flatten_out(mod, inp):
        out = mod(inp)
        return tuple([t if isinstance(t, torch.Tensor) else tt for t in out for tt in t])
    gradcheckfunc = partial(flatten_out, mod)
    with torch.backends.cudnn.flags(enabled=False):
        assert gradcheck(gradcheckfunc, inp, check_batched_grad=False)
        assert gradgradcheck(gradcheckfunc, inp, check_batched_grad=False)
    # (the cuDNN double-backward error check that follows on CUDA is not ported)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_LSTM_grad_and_gradgrad(impl, device):
    hsize = 4
    inp = torch.rand(1, 3, hsize, device=device, dtype=torch.float64, requires_grad=True)
    for bias in [True, False]:
        mod = impl.LSTM(hsize, hsize, bias=bias).to(device).to(torch.float64)
        _test_rnn_mod(mod, inp)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_GRU_grad_and_gradgrad(impl, device):
    hsize = 4
    inp = torch.rand(1, 3, hsize, device=device, dtype=torch.float64, requires_grad=True)
    for bias in [True, False]:
        mod = impl.GRU(hsize, hsize, bias=bias).to(device).to(torch.float64)
        _test_rnn_mod(mod, inp)


def _rnn_backward_to_input_but_not_parameters(impl, device):
    # this checks whether it is possible to not require
    # weight parameters, but require inputs, see #7722
    l = impl.LSTM(2, 3).to(device)
    for p in l.parameters():
        p.requires_grad = False
    s = torch.randn(1, 1, 2, requires_grad=True, device=device)
    out, _ = l(s)
    out.sum().backward()
    assert not (s.grad is None or s.grad.abs().sum().item() == 0)
    if is_seqfuse(impl):
        s_ref = s.detach().clone().requires_grad_(True)
        torch_twin(l, 2, 3)(s_ref)[0].sum().backward()
        assert_equal(s.grad, s_ref.grad, atol=1e-6, rtol=1e-5)


def test_rnn_backward_to_input_but_not_parameters(impl):
    _rnn_backward_to_input_but_not_parameters(impl, "cpu")


@needs_cuda
def test_rnn_backward_to_input_but_not_parameters_cuda(impl):
    _rnn_backward_to_input_but_not_parameters(impl, "cuda")


# -- test/nn/test_packed_sequence.py, through the modules -------------------------------------

def _run_packed_both(impl, module_name, packed, input_size, grad_source):
    """`packed` through impl's module and torch.nn's holding the same weights (2 layers,
    bidirectional, odd hidden size): the same PackedSequence out, the same final states
    and the same gradients of `grad_source` (the leaf the packing came from) and weights."""
    torch.manual_seed(0)
    m = getattr(impl, module_name)(input_size, 7, num_layers=2, bidirectional=True)
    ref = getattr(torch.nn, module_name)(input_size, 7, num_layers=2, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    out, h = m(packed)
    assert isinstance(out, rnn_utils.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    for a, b in ((out.sorted_indices, packed.sorted_indices), (out.unsorted_indices, packed.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    g = torch.autograd.grad(out.data.square().sum() + sum(t.sum() for t in _flat(h)), [grad_source],
                            retain_graph=True)[0]
    out_r, h_r = ref(packed)
    g_r = torch.autograd.grad(out_r.data.square().sum() + sum(t.sum() for t in _flat(h_r)), [grad_source])[0]
    torch.testing.assert_close(out.data, out_r.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(_flat(h), _flat(h_r), atol=1e-5, rtol=0)
    torch.testing.assert_close(g, g_r, atol=1e-5, rtol=1e-4)
    padded, lengths = rnn_utils.pad_packed_sequence(out)
    padded_r, lengths_r = rnn_utils.pad_packed_sequence(out_r)
    assert torch.equal(lengths, lengths_r)
    torch.testing.assert_close(padded, padded_r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("module_name", MODULES)
def test_pack_padded_sequence(impl, module_name):
    """test_pack_padded_sequence's cases: the packing checks as there, then the packed
    sequence (its values scaled by 1e-3 so that the gates do not saturate) through the
    modules, batch_first or not, sorted and shuffled."""
    random.seed(0)

    def generate_test_case(sorted_lengths, should_shuffle):
        def pad(tensor, length):
            return torch.cat([tensor, tensor.new(length - tensor.size(0), *tensor.size()[1:]).zero_()])

        max_length = sorted_lengths[0]
        batch_sizes = [sum(map(bool, filter(lambda x: x >= i, sorted_lengths)))
                       for i in range(1, max_length + 1)]
        padded = torch.cat([pad(i * 100 + torch.arange(1., 5 * l + 1).view(l, 1, 5), max_length)
                            for i, l in enumerate(sorted_lengths, 1)], 1)
        expected_data = [[torch.arange(1., 6) + (i + 1) * 100 + 5 * n for i in range(batch_size)]
                         for n, batch_size in enumerate(batch_sizes)]
        expected_data = list(itertools.chain.from_iterable(expected_data))
        expected_data = torch.stack(expected_data, dim=0)

        if should_shuffle:
            # Shuffle the padded sequence to create an unsorted sequence
            permutation = list(range(len(sorted_lengths)))
            random.shuffle(permutation)

            unsorted_indices = torch.tensor(permutation)
            padded = padded.index_select(1, unsorted_indices)
            lengths = torch.tensor(sorted_lengths).index_select(0, unsorted_indices)
        else:
            unsorted_indices = None
            lengths = sorted_lengths

        return padded.requires_grad_(), lengths, expected_data, batch_sizes, unsorted_indices

    test_cases = [
        # sorted_lengths, should_shuffle
        [[10, 8, 4, 2, 2, 2, 1], False],
        [[11, 10, 8, 6, 4, 3, 1], False],
        [[11, 10, 8, 6, 4, 3, 1], True],
    ]

    for test_case, batch_first in itertools.product(test_cases, (True, False)):
        sorted_lengths, should_shuffle = test_case
        padded, lengths, expected_data, batch_sizes, unsorted_indices = generate_test_case(
            sorted_lengths, should_shuffle)

        src = padded
        if batch_first:
            src = src.transpose(0, 1)

        # check output
        packed = rnn_utils.pack_padded_sequence(src, lengths, batch_first=batch_first,
                                                enforce_sorted=not should_shuffle)
        assert_equal(packed.data.data, expected_data)
        assert_equal(packed.batch_sizes, batch_sizes)
        assert_equal(packed.unsorted_indices, unsorted_indices)

        # through the modules
        scaled = src.detach().mul(1e-3).requires_grad_(True)
        packed_scaled = rnn_utils.pack_padded_sequence(scaled, lengths, batch_first=batch_first,
                                                       enforce_sorted=not should_shuffle)
        _run_packed_both(impl, module_name, packed_scaled, 5, scaled)


@pytest.mark.parametrize("module_name", MODULES)
def test_pack_sequence(impl, module_name):
    """test_pack_sequence's "more dimensions" sequences (lengths i*i, one of 1 step),
    sorted with enforce_sorted True and False and shuffled, packed with pack_sequence,
    through the modules."""
    random.seed(0)
    maxlen = 5
    sequences = []
    for i in range(maxlen, 0, -1):
        seq_len = i * i
        sequences.append(torch.rand(seq_len, 5))
    unsorted_sequences = [s.clone() for s in sequences]
    random.shuffle(unsorted_sequences)

    for seqs, enforce_sorted in ((sequences, True), (sequences, False), (unsorted_sequences, False)):
        leaves = [s.clone().requires_grad_(True) for s in seqs]
        packed = rnn_utils.pack_sequence(leaves, enforce_sorted=enforce_sorted)
        # compatibility with pad_sequence + pack_padded_sequence, as the original checks
        padded = rnn_utils.pad_sequence(leaves)
        assert_equal(rnn_utils.pad_packed_sequence(packed)[0], padded)
        # gradients w.r.t. the packed data (a non-leaf built from the leaves)
        _run_packed_both(impl, module_name, packed, 5, packed.data)
