"""PyTorch's LSTM projection (proj_size) tests, ported to run against torch.nn and
seqfuse.nn (issue 23); the rest of the port is in test_torch_rnn_ported.py.

seqfuse.nn.LSTM's proj_size is being built: each test's seqfuse case skips ("proj_size
not built yet") while seqfuse.nn.LSTM(2, 3, proj_size=1) raises NotImplementedError, and
runs by itself once it does not. The torch.nn cases check the port now. The semantics
expected of seqfuse are torch.nn's: weight_hr_l{k}{suffix} [P, H], weight_hh [4H, P],
h states [L*D, B, P] (c states [L*D, B, H]), outputs [T, B, D*P].

| PyTorch test (source) | here |
| --- | --- |
| test_projections_lstm_args_check (test_nn.py) | same name |
| test_projections_lstm_check_device (test_nn.py, multi-GPU) | same name (skips below 2 GPUs) |
| test_projections_lstm_initial_hidden_state (test_nn.py) | same name |
| test_projections_errors_on_gru_and_rnn (test_nn.py) | same name (GRU and RNN: never skipped) |
| _test_RNN_cpu_vs_cudnn, its "LSTM with projections" loop (test_nn.py) | test_RNN_cpu_vs_cudnn_proj_* (CUDA), test_RNN_cpu_vs_torch_cpu_proj_* (seqfuse on CPU vs torch.nn on CPU) |
| test_RNN_cudnn_weight_norm, its weight_hr_l0 check (test_nn.py) | test_RNN_cudnn_weight_norm_proj (CUDA), test_RNN_weight_norm_proj_cpu |
| test_rnn_weight_norm, its proj_size=16 check (test_nn.py) | test_rnn_weight_norm_proj |
| test_variable_sequence, proj_size=2 (test_nn.py) | test_variable_sequence_proj (and _cuda) |
| module_db's nn.LSTM samples with proj_size=2 (common_modules.py) | test_module_db_proj |
| (the shapes above, against torch.nn's) | test_projection_parameters_and_states_as_torch |
"""
import pytest
import torch
from test_torch_module_db import INFOS, module_inputs, run_and_compare, sample_id
from test_torch_rnn_ported import (_check_weight_norm, _compare_cpu_gpu, _forward_backward,
                                   _make_noncontig, _variable_sequence, assert_equal, is_seqfuse,
                                   needs_cuda, needs_multigpu, raises, torch_twin)
from torch.nn.utils import rnn as rnn_utils

import seqfuse.nn


def _proj_size_missing() -> bool:
    try:
        seqfuse.nn.LSTM(2, 3, proj_size=1)
    except NotImplementedError:
        return True
    return False


PROJ_MISSING = _proj_size_missing()
SEQFUSE = pytest.param(seqfuse.nn, id="seqfuse",
                       marks=pytest.mark.skipif(PROJ_MISSING, reason="proj_size not built yet"))
IMPLS = [pytest.param(torch.nn, id="torch"), SEQFUSE]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def test_projections_lstm_args_check(impl):
    input_size = 3
    hidden_size = 5
    proj_size = 2
    num_layers = 2
    batch_size = 4
    seq_len = 6
    num_directions = 1
    bad_size = 7  # prime number so that no size can divide it.

    def test(input_shape, hidden_h_shape, hidden_c_shape):
        for input, hidden in get_inputs(input_shape, hidden_h_shape, hidden_c_shape):
            model = impl.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size)
            with pytest.raises(RuntimeError):
                model(input, hidden)

    correct_input_shape = (seq_len, batch_size, input_size)
    correct_hidden_h_shape = (num_layers * num_directions, batch_size, proj_size)
    correct_hidden_c_shape = (num_layers * num_directions, batch_size, hidden_size)

    def update_shape(shape, dim, new_dim_size):
        new_shape = list(shape)
        new_shape[dim] = new_dim_size
        return tuple(new_shape)

    def get_inputs(input_shape, hidden_h_shape, hidden_c_shape):
        '''returns list( tuple(input, hidden) )
        where input, hidden are inputs to a model'''
        input = torch.randn(input_shape)
        hidden_h = torch.randn(hidden_h_shape)
        hidden_c = torch.randn(hidden_c_shape)
        return [(input, (hidden_h, hidden_c))]

    # Incorrect input batch size
    input_shape = update_shape(correct_input_shape, 1, bad_size)
    test(input_shape, correct_hidden_h_shape, correct_hidden_c_shape)

    # Incorrect hidden batch size
    input_shape = correct_input_shape
    hidden_h_shape = update_shape(correct_hidden_h_shape, 1, bad_size)
    hidden_c_shape = update_shape(correct_hidden_c_shape, 1, bad_size)
    test(input_shape, hidden_h_shape, hidden_c_shape)

    # Incorrect input size
    input_shape = update_shape(correct_input_shape, 2, bad_size)
    test(input_shape, correct_hidden_h_shape, correct_hidden_c_shape)

    # Incorrect hidden size
    input_shape = correct_input_shape
    hidden_h_shape = update_shape(correct_hidden_h_shape, 2, bad_size)
    hidden_c_shape = update_shape(correct_hidden_c_shape, 2, bad_size)
    test(input_shape, hidden_h_shape, hidden_c_shape)

    # Incorrect hidden[0]
    input_shape = correct_input_shape
    hidden_h_shape = update_shape(correct_hidden_h_shape, 0, bad_size)
    hidden_c_shape = update_shape(correct_hidden_c_shape, 0, bad_size)
    test(input_shape, hidden_h_shape, hidden_c_shape)

    # Incorrect proj size = hidden size
    input_shape = correct_input_shape
    hidden_h_shape = update_shape(correct_hidden_h_shape, 0, hidden_size)
    hidden_c_shape = correct_hidden_c_shape
    test(input_shape, hidden_h_shape, hidden_c_shape)

    # Incorrect proj size != hidden size
    input_shape = correct_input_shape
    hidden_h_shape = update_shape(correct_hidden_h_shape, 0, bad_size)
    hidden_c_shape = correct_hidden_c_shape
    test(input_shape, hidden_h_shape, hidden_c_shape)

    # Incorrect cell size != hidden size
    input_shape = correct_input_shape
    hidden_h_shape = correct_hidden_h_shape
    hidden_c_shape = update_shape(correct_hidden_c_shape, 0, bad_size)
    test(input_shape, hidden_h_shape, hidden_c_shape)


@needs_multigpu
def test_projections_lstm_check_device(impl):
    input_size = 3
    hidden_size = 5
    proj_size = 2
    num_layers = 2
    batch_size = 4
    seq_len = 6
    num_directions = 1

    correct_input_shape = (seq_len, batch_size, input_size)
    correct_hidden_h_shape = (num_layers * num_directions, batch_size, proj_size)
    correct_hidden_c_shape = (num_layers * num_directions, batch_size, hidden_size)

    model = impl.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size)
    input = torch.randn(correct_input_shape)
    hidden_h = torch.randn(correct_hidden_h_shape)
    hidden_c = torch.randn(correct_hidden_c_shape)

    # input and weights are not at the same device
    raises(impl, RuntimeError, "Input and parameter tensors are not at the same device",
           lambda: model(input.to('cuda:0')))

    # input and hiddens are not at the same device
    raises(impl, RuntimeError, r"Input and hidden tensors are not at the same device",
           lambda: model(input, (hidden_h.to('cuda:0'), hidden_c.to('cuda:0'))))

    # hidden tensors are not at the same CUDA device
    raises(impl, RuntimeError, "Input and hidden tensors are not at the same device",
           lambda: model(input.to('cuda:0'), (hidden_h.to('cuda:0'), hidden_c.to('cuda:1'))))


def test_projections_lstm_initial_hidden_state(impl):
    for bidir in [False, True]:
        rnn = impl.LSTM(30, 20, 2, bidirectional=bidir, proj_size=10)
        num_dirs = 2 if bidir else 1
        input = torch.randn(10, 32, 30)
        hidden_h = torch.zeros(2 * num_dirs, 32, 10)
        hidden_c = torch.zeros(2 * num_dirs, 32, 20)
        hidden = (hidden_h, hidden_c)
        output1, hidden1 = rnn(input, hidden)
        output2, hidden2 = rnn(input)
        assert_equal(output1, output2)
        assert_equal(hidden1, hidden2)
        if is_seqfuse(impl):
            output3, hidden3 = torch_twin(rnn, 30, 20, 2, bidirectional=bidir, proj_size=10)(input)
            assert_equal(output1, output3, atol=1e-5, rtol=0)
            assert_equal(hidden1, hidden3, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [pytest.param(torch.nn, id="torch"), pytest.param(seqfuse.nn, id="seqfuse")])
def test_projections_errors_on_gru_and_rnn(impl):
    """(GRU and RNN only: runs on seqfuse whether or not the LSTM's proj_size is built.)"""
    error_msg = "proj_size argument is only supported for LSTM, not RNN or GRU"
    for mode in ['RNN', 'GRU']:
        with pytest.raises(ValueError, match=error_msg):
            getattr(impl, mode)(30, 20, 2, proj_size=10)


def test_projection_parameters_and_states_as_torch(impl):
    """The shapes and names a projected LSTM has in torch.nn: weight_hr_l{k}{suffix} [P, H],
    weight_hh [4H, P], the next layer's weight_ih [4H, D*P], h [L*D, B, P], c [L*D, B, H],
    output [T, B, D*P]; the same state_dict keys and _flat_weights_names as torch.nn's."""
    I, H, P, L, T, B = 5, 7, 3, 2, 4, 2
    for bidirectional in (False, True):
        D = 2 if bidirectional else 1
        m = impl.LSTM(I, H, L, bidirectional=bidirectional, proj_size=P)
        ref = torch.nn.LSTM(I, H, L, bidirectional=bidirectional, proj_size=P)
        assert m.proj_size == P
        assert list(m.state_dict()) == list(ref.state_dict())
        assert m._flat_weights_names == ref._flat_weights_names
        for k in range(L):
            for suffix in ("", "_reverse")[:D]:
                assert getattr(m, f"weight_hr_l{k}{suffix}").shape == (P, H)
                assert getattr(m, f"weight_hh_l{k}{suffix}").shape == (4 * H, P)
                assert getattr(m, f"weight_ih_l{k}{suffix}").shape == (4 * H, I if k == 0 else D * P)
        out, (h, c) = m(torch.randn(T, B, I))
        assert out.shape == (T, B, D * P)
        assert h.shape == (L * D, B, P) and c.shape == (L * D, B, H)


# -- _test_RNN_cpu_vs_cudnn: "checking LSTM with projections" ------------------------------------

def _rnn_cpu_vs_proj(ref_impl, impl, device, dropout, dtype=torch.double):
    input_size = 10
    hidden_size = 6
    proj_size = 3
    num_layers = 2
    seq_length = 7
    batch = 6
    for bias, bidirectional, batch_first, contig, variable_len, lens_as_tensor \
            in __import__("itertools").product((True, False), repeat=6):
        num_directions = 2 if bidirectional else 1
        if batch_first:
            input_val = torch.randn(batch, seq_length, input_size, dtype=dtype)
            grad_output = torch.randn(batch, seq_length, proj_size * num_directions, dtype=dtype)
        else:
            input_val = torch.randn(seq_length, batch, input_size, dtype=dtype)
            grad_output = torch.randn(seq_length, batch, proj_size * num_directions, dtype=dtype)

        hx_val = torch.randn(num_layers * num_directions, batch, proj_size, dtype=dtype)
        cx_val = torch.randn(num_layers * num_directions, batch, hidden_size, dtype=dtype)
        grad_hy = torch.randn(num_layers * num_directions, batch, proj_size, dtype=dtype)
        grad_cy = torch.randn(num_layers * num_directions, batch, hidden_size, dtype=dtype)

        if not contig:
            grad_output = _make_noncontig(grad_output)
            grad_hy = _make_noncontig(grad_hy)
            grad_cy = _make_noncontig(grad_cy)
            # (the original assigns this to an unused name; here the input is non-contiguous)
            input_val = _make_noncontig(input_val)
            hx_val = _make_noncontig(hx_val)
            cx_val = _make_noncontig(cx_val)

        if variable_len:
            lengths = [7, 5, 5, 2, 1, 1]
            if lens_as_tensor:
                lengths = torch.tensor(lengths, dtype=torch.long)
            input_val = rnn_utils.pack_padded_sequence(input_val, lengths, batch_first=batch_first)
            grad_output = rnn_utils.pack_padded_sequence(grad_output, lengths, batch_first=batch_first).data

        rnn = ref_impl.LSTM(input_size, hidden_size, num_layers, bias=bias, dropout=dropout,
                            bidirectional=bidirectional, batch_first=batch_first,
                            proj_size=proj_size).to(dtype)

        outputs_cpu = _forward_backward(
            "cpu", rnn, input_val, grad_output, rnn.all_weights,
            hx_val, grad_hy, cx_val, grad_cy)

        rnn_gpu = impl.LSTM(input_size, hidden_size, num_layers, bias=bias, dropout=dropout,
                            bidirectional=bidirectional, batch_first=batch_first,
                            proj_size=proj_size).to(dtype)

        outputs_gpu = _forward_backward(
            device, rnn_gpu, input_val, grad_output, rnn.all_weights,
            hx_val, grad_hy, cx_val, grad_cy)
        _compare_cpu_gpu(outputs_cpu, outputs_gpu)


@needs_cuda
def test_RNN_cpu_vs_cudnn_proj_no_dropout(impl):
    _rnn_cpu_vs_proj(impl, impl, "cuda", 0)


@needs_cuda
def test_RNN_cpu_vs_cudnn_proj_with_dropout(impl):
    _rnn_cpu_vs_proj(impl, impl, "cuda", 1)


@pytest.mark.parametrize("impl", [SEQFUSE])
def test_RNN_cpu_vs_torch_cpu_proj_no_dropout(impl):
    _rnn_cpu_vs_proj(torch.nn, impl, "cpu", 0)


@pytest.mark.parametrize("impl", [SEQFUSE])
def test_RNN_cpu_vs_torch_cpu_proj_with_dropout(impl):
    _rnn_cpu_vs_proj(torch.nn, impl, "cpu", 1)


# -- weight norm ------------------------------------------------------------------------------

@needs_cuda
def test_RNN_cudnn_weight_norm_proj(impl):
    _check_weight_norm(impl, "cuda", impl.LSTM(10, 6, 2, proj_size=3), 'weight_hr_l0')


def test_RNN_weight_norm_proj_cpu(impl):
    _check_weight_norm(impl, "cpu", impl.LSTM(10, 6, 2, proj_size=3), 'weight_hr_l0')


def test_rnn_weight_norm_proj(impl):
    import warnings

    l = impl.LSTM(32, 32, proj_size=16)
    name, num_params = 'weight_hr_l0', 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        l = torch.nn.utils.weight_norm(l, name=name)
    assert sum(isinstance(p, torch.nn.Parameter) for p in l._flat_weights) == num_params - 1
    l = torch.nn.utils.remove_weight_norm(l, name=name)
    assert sum(isinstance(p, torch.nn.Parameter) for p in l._flat_weights) == num_params
    assert name in l._parameters
    assert l._parameters[name] is not None
    assert name + '_v' not in l._parameters
    assert name + '_g' not in l._parameters
    assert name in dict(l.named_parameters())
    assert dict(l.named_parameters())[name] is not None
    assert name + '_v' not in dict(l.named_parameters())
    assert name + '_g' not in dict(l.named_parameters())


# -- test_variable_sequence, proj_size=2 --------------------------------------------------------

def test_variable_sequence_proj(impl):
    _variable_sequence(impl, "cpu", torch.float, [2])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.half, torch.float, torch.double], ids=str)
def test_variable_sequence_proj_cuda(impl, dtype):
    _variable_sequence(impl, "cuda", dtype, [2])


# -- module_db: the LSTM samples with proj_size > 0 ---------------------------------------------

def _proj_samples():
    return [pytest.param(sample_id(s), id=sample_id(s)) for s in module_inputs("LSTM", torch.float32, True)
            if s.constructor_input.kwargs.get("proj_size", 0) > 0]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sid", _proj_samples())
def test_module_db_proj(impl, sid, dtype, training):
    """module_db's projected LSTM samples: impl's module (given torch.nn's state_dict) against
    torch.nn's, outputs and gradients, and the unbatched reference."""
    assert "LSTM" in INFOS
    sample = next(s for s in module_inputs("LSTM", dtype, training) if sample_id(s) == sid)
    run_and_compare("LSTM", sample, dtype, training, ours_ns=impl)
