"""seqfuse.nn.LSTM, GRU and RNN: drop-ins for torch.nn.LSTM / GRU / RNN on the fused
layer ops. _RecurrentBase holds everything they share (parameters, input forms,
checks, layers, dropout); each subclass says how many gate blocks its weights have, what
its state is, and which op runs a layer."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import functional, ops
from ..backend import backend_for, check_backend, resolve
from ..ops.checks import has_values, is_trace_tensor

# Set by serving_trace while torch.export traces. A plain global, read only under
# torch.compiler.is_exporting() (itself a process-wide flag): dynamo cannot trace a
# ContextVar or a threading.local.
_SERVING_TRACE = False


def _serving() -> bool:
    return _SERVING_TRACE and torch.compiler.is_exporting()


@contextlib.contextmanager
def serving_trace(model: nn.Module, example_inputs: tuple):
    """For torch.export of an inference artifact (seqfuse.export's AOTInductor package):
    runs `model(*example_inputs)` once under torch.no_grad(), which fills every seqfuse
    layer's weight cache (stacked weights, bias sums, the kernels' packed panels) and
    forward_tokens' folded embedding table from the real parameters, then, while the
    context is open, the layers read those entries instead of recomputing them. Traced
    inside it, the graph takes them as constant tensors: the packing and the folding are
    done once here, not on every call of the artifact. Only for an inference graph of a
    model in eval mode, traced at once (the entries are those of the parameters now); the
    panels carry a layout header that the kernels check, so an artifact read by another
    build's kernels fails with an error instead of reading them wrongly."""
    with torch.no_grad():
        model(*example_inputs)
    global _SERVING_TRACE
    before, _SERVING_TRACE = _SERVING_TRACE, True
    try:
        yield
    finally:
        _SERVING_TRACE = before


class RecurrentInputError(ValueError, RuntimeError):
    """A recurrent module's bad input (shape, hx, lengths, values): a ValueError, as
    seqfuse raised before, and a RuntimeError, as torch.nn's recurrent layers raise, so
    code written for either catches it."""


class RecurrentTypeError(TypeError, ValueError, RuntimeError):
    """A bad input's type or dtype: TypeError (seqfuse's), ValueError (torch.nn's dtype
    mismatch) and RuntimeError (torch.nn's other input errors) at once."""


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout between layers, as F.dropout(x, p, training=True) computes it, with
    the keep mask drawn by uniform_ and a compare: on CPU torch's bernoulli_ draws each
    element on its own (~3x slower here at [T, B, 2H] = [33, 64, 256], bench/test_bench_zoo_train.py),
    and this was a tenth of a 2-layer BiGRU classifier's training step."""
    if p >= 1:
        return x * 0.0
    keep = torch.empty_like(x).uniform_() >= p
    return x * keep * (1.0 / (1.0 - p))


class _RecurrentBase(nn.Module):
    _gates = 0  # gate blocks in each weight matrix
    _state_names: tuple[str, ...] = ()  # the parts of hx
    # The op takes one bias, b_ih + b_hh (LSTM, RNN), or both apart (GRU: b_hh sits inside
    # the reset gate's product).
    _combined_bias = True
    # torch.nn.LSTM's projection size (0: none), also on modules pickled before it existed.
    proj_size = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str = "auto", proj_size: int = 0):
        super().__init__()
        # torch.nn.RNNBase's type checks, with its words (TypeError; also a ValueError, as
        # seqfuse raised before).
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise RecurrentTypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RecurrentTypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            # torch.nn's words, with the value
            raise ValueError("proj_size should be a positive integer or zero to disable "
                             f"projections, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                             f"and hidden_size={hidden_size}")
        if dropout > 0 and num_layers == 1:  # torch.nn's warning, word for word
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = check_backend(backend)
        self._weight_cache: dict[int, tuple[tuple, tuple]] = {}
        factory = {"device": device, "dtype": dtype}
        G, out = self._gates * hidden_size, self._output_size()
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out * self.num_directions
            for suffix in self._suffixes():  # torch.nn's registration order (state_dict keys)
                setattr(self, f"weight_ih_l{layer}{suffix}", nn.Parameter(torch.empty(G, layer_in, **factory)))
                setattr(self, f"weight_hh_l{layer}{suffix}", nn.Parameter(torch.empty(G, out, **factory)))
                if bias:
                    setattr(self, f"bias_ih_l{layer}{suffix}", nn.Parameter(torch.empty(G, **factory)))
                    setattr(self, f"bias_hh_l{layer}{suffix}", nn.Parameter(torch.empty(G, **factory)))
                if proj_size:
                    setattr(self, f"weight_hr_l{layer}{suffix}",
                            nn.Parameter(torch.empty(proj_size, hidden_size, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self):
        return ("", "_reverse")[: self.num_directions]

    def _output_size(self) -> int:
        """Each direction's width of the output and of h: proj_size, or hidden_size."""
        return self.proj_size or self.hidden_size

    def _state_sizes(self) -> tuple[int, ...]:
        """The width of each part of hx (_state_names): h has the output's, c hidden_size."""
        return (self._output_size(),) + (self.hidden_size,) * (len(self._state_names) - 1)

    def _weight_kinds(self) -> list[str]:
        """One layer and direction's parameters, in torch.nn's order."""
        return (["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
                + (["weight_hr"] if self.proj_size else []))

    def reset_parameters(self) -> None:
        # torch.nn's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # -- torch.nn.RNNBase's parameter views, for code written against it ----------------

    def flatten_parameters(self) -> None:
        """torch.nn.RNNBase's: packs the weights into cuDNN's flat buffer. seqfuse's kernels
        read the parameters where they are (stacked per call, or from the weight cache), so
        there is nothing to do: models that call it in forward run unchanged."""

    @property
    def _flat_weights_names(self) -> list[str]:
        """Parameter names in torch.nn's order: per layer, per direction, w_ih, w_hh, b_ih,
        b_hh (with bias), w_hr (with proj_size)."""
        kinds = self._weight_kinds()
        return [f"{k}_l{layer}{s}" for layer in range(self.num_layers) for s in self._suffixes()
                for k in kinds]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """torch.nn.RNNBase.all_weights: one list per layer and direction."""
        per = len(self._weight_kinds())
        flat = self._flat_weights
        return [flat[i:i + per] for i in range(0, len(flat), per)]

    def _stacked(self, name: str, layer: int) -> Tensor:
        """One parameter of one layer stacked over directions: [D, ...]."""
        ts = [getattr(self, f"{name}_l{layer}{s}") for s in self._suffixes()]
        return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)

    def _layer_param_names(self, layer: int) -> list[str]:
        return [f"{n}_l{layer}{s}" for n in self._weight_kinds() for s in self._suffixes()]

    def _layer_params(self, layer: int) -> list[Tensor]:
        names = self.__dict__.get("_param_names")
        if names is None or len(names) != self.num_layers:  # built once (not pickled: derived)
            names = self.__dict__["_param_names"] = [self._layer_param_names(i)
                                                    for i in range(self.num_layers)]
        # _parameters first (Module.__getattr__ costs a microsecond a name); getattr for a
        # name it lacks (a parametrization computes it: a new tensor, never cached).
        own = self._parameters
        return [own[n] if n in own else getattr(self, n) for n in names[layer]]

    def _op_weights(self, layer: int) -> tuple:
        """The op's weights for one layer: (weight_ih [D, G, I], weight_hh [D, G, H], then
        bias [D, G] (b_ih + b_hh) or b_ih, b_hh apart (GRU), None without biases).

        In eval mode, when no gradient can flow to the parameters: from a cache, because
        stacking two directions copies every weight (32 us a call for a 128-unit BiLSTM
        over 64 features, half the kernel's time on a 16-token sentence), and even one
        direction's views and bias sum cost 10.8 us a call against 4.7 us for checking
        the cache (Intel Xeon 167, LSTM 128 x 128). An entry is valid
        while each parameter is the same tensor, at the same version (every in-place
        change bumps it: optimizer steps, load_state_dict, nn.init, copy_ under no_grad)
        and on the same storage (`.to()`, `.data = t`): one entry per layer, replaced when
        stale. train() and eval() empty it, so weight surgery between mode switches is
        always seen. A write through `.data` in eval mode between two calls bypasses the
        version counter: call clear_weight_cache() after one. Traces (torch.compile,
        torch.export, jit.trace) always stack: the graph must read the parameters."""
        if _serving():  # the entry of serving_trace's call, whatever the trace's tensors
            entry = self.__dict__.get("_weight_cache", {}).get(layer)
            return entry[2] if entry is not None else self._stack_weights(layer)
        params = self._layer_params(layer)
        if (self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.jit.is_tracing() or is_trace_tensor(params[0])):  # a trace lifts all alike
            return self._stack_weights(layer)
        # With `is` below: the same tensors; and the CPU kernels' capability (the packing's layout).
        key = (ops.cpu_kernels_generation, *((p._version, p.data_ptr()) for p in params))
        cache = self.__dict__.setdefault("_weight_cache", {})  # also for unpickled modules
        entry = cache.get(layer)
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[1], params)):
            return entry[2]
        # Ordinary tensors even when called under inference_mode: the cache outlives it.
        with torch.inference_mode(False), torch.no_grad():
            weights = self._stack_weights(layer)
            packed = self._pack(weights[0], weights[1])
        # One assignment: a thread reading the cache meanwhile sees the old entry or the new.
        cache[layer] = (key, tuple(params), weights, packed)
        return weights

    def _pack(self, w_ih: Tensor, w_hh: Tensor) -> Tensor | None:
        """The stacked weights in the native CPU kernel's tile panels (its packed_weights
        argument: 20-28 us of packing saved a call at batch 1), or None where that kernel
        will not run them (another backend or device, another dtype, a trace)."""
        if (self.proj_size or w_hh.device.type != "cpu" or w_hh.dtype not in (torch.float32, torch.float64)
                or w_ih.dtype != w_hh.dtype or is_trace_tensor(w_hh)
                or resolve(self.backend, self._layer_op, "cpu") != "native"
                or not ops.has_native_kernel("pack_recurrent_weights", "cpu")):
            return None
        return ops.pack_recurrent_weights(w_ih, w_hh)

    def _packed_weights(self, layer: int, weights: tuple, x: Tensor, states: list[Tensor]):
        """The packed panels of the cache entry that `weights` (from _op_weights) came
        from, when this call can use them: inference on the same CPU dtype, not under
        autocast (which would cast them). Else None: the kernel packs as usual."""
        entry = self.__dict__.get("_weight_cache", {}).get(layer)
        if entry is None or entry[2] is not weights or entry[3] is None:
            return None
        if (x.dtype != entry[3].dtype or x.device.type != "cpu" or _autocast_enabled("cpu")
                or ops.needs_backward(x, *states)):
            return None
        return entry[3]

    def _stack_weights(self, layer: int) -> tuple:
        if torch.jit.is_tracing():
            # Derived weights require grad as their parameters do, whatever the grad mode:
            # the op then records the same keep_activations in torch.jit.trace's check
            # (which re-traces under no_grad) as in the trace (ops.needs_backward).
            with torch.enable_grad():
                return self._stack_weights_now(layer)
        return self._stack_weights_now(layer)

    def _stack_weights_now(self, layer: int) -> tuple:
        w = (self._stacked("weight_ih", layer), self._stacked("weight_hh", layer))
        proj = (self._stacked("weight_hr", layer),) if self.proj_size else ()
        if not self.bias:
            return w + ((None,) if self._combined_bias else (None, None)) + proj
        b_ih, b_hh = self._stacked("bias_ih", layer), self._stacked("bias_hh", layer)
        return w + ((b_ih + b_hh,) if self._combined_bias else (b_ih, b_hh)) + proj

    def train(self, mode: bool = True):
        self.clear_weight_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_weight_cache()
        return super()._apply(fn, *args, **kwargs)

    def clear_weight_cache(self) -> None:
        """Drops the stacked inference weights and the folded embedding table of
        forward_tokens (they are rebuilt on the next call). Needed
        only after writing parameters through `.data`, which their version does not see."""
        self.__dict__.setdefault("_weight_cache", {}).clear()
        self.__dict__.pop("_fold_cache", None)

    def weight_cache_bytes(self) -> int:
        """Memory held by the inference weight cache: the stacked copies (a one-direction
        layer's entries are views of its parameters and count nothing) and the folded
        embedding table of forward_tokens with its stacked weights."""
        entries = [(e[1], e[2] + e[3:]) for e in self.__dict__.get("_weight_cache", {}).values()]
        if self.__dict__.get("_fold_cache") is not None:
            entries.append(self.__dict__["_fold_cache"][1:])
        total = 0
        for params, tensors in entries:
            owned = {p.untyped_storage().data_ptr() for p in params}
            for t in tensors:
                if t is not None and t.untyped_storage().data_ptr() not in owned:
                    total += t.numel() * t.element_size()
        return total

    def __getstate__(self):
        # The cache is derived state: not pickled or deep-copied (a copy's parameters are
        # other tensors, so its entries would be stale anyway).
        state = dict(super().__getstate__())
        state["_weight_cache"] = {}
        state.pop("_param_names", None)
        state.pop("_fold_cache", None)
        return state

    def _run_layer(self, layer: int, x: Tensor, states: list[Tensor], lengths: Tensor | None):
        """One layer, both directions: returns (output, [final state parts])."""
        raise NotImplementedError

    def _backend_for(self, x: Tensor) -> str:
        return backend_for(self.backend, x)

    def forward(self, input, hx=None, *, lengths: Tensor | None = None):
        packed = isinstance(input, PackedSequence)
        symbolic = None
        if packed:
            if lengths is not None:
                raise RecurrentInputError("lengths must not be given with a PackedSequence input")
            from .packing import symbolic_lengths  # here: only packed inputs pay for it

            symbolic = symbolic_lengths(input)
            if symbolic is not None:
                # An export trace's packing (seqfuse.nn.packing): data is the padded input
                # [T, B, I] in packed (sorted) order; run it in the caller's order, as below.
                unsort = input.unsorted_indices
                x = input.data if unsort is None else input.data.index_select(1, unsort)
                lengths = symbolic if unsort is None else symbolic.index_select(0, unsort.to(symbolic.device))
            else:
                self._check_packed(input)
                x, lengths = pad_packed_sequence(input)  # [T, B, I] in the caller's batch order
            unbatched = False
        else:
            if not isinstance(input, Tensor):
                raise RecurrentTypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise RecurrentInputError(f"input must be 3-D ([T, B, I], or [B, T, I] with batch_first) "
                                 f"or 2-D unbatched [T, I], got {input.dim()}-D with shape {tuple(input.shape)}")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        self._check_input(x)
        output, finals, lengths = self._layers(x, None, hx, lengths, unbatched)
        if packed:
            finals = tuple(finals) if len(finals) > 1 else finals[0]  # the caller's order, as torch.nn's
            if symbolic is not None:  # the same symbolic packing, in the input's (sorted) order
                order = input.sorted_indices
                data = output if order is None else output.index_select(1, order)
                return PackedSequence(data, input.batch_sizes, order, input.unsorted_indices), finals
            # Repack in the input's own order, so batch_sizes and sorted_indices match it.
            sorted_indices = input.sorted_indices
            sorted_out = output.index_select(1, sorted_indices) if sorted_indices is not None else output
            data = pack_padded_sequence(sorted_out, lengths.index_select(0, sorted_indices)
                                        if sorted_indices is not None else lengths).data
            output = PackedSequence(data, input.batch_sizes, sorted_indices, input.unsorted_indices)
            return output, finals
        return self._output_form(output, finals, unbatched)

    def _output_form(self, output: Tensor, finals: list[Tensor], unbatched: bool):
        """The time-major results in the caller's form (unbatched, batch_first)."""
        if unbatched:
            output = output.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (tuple(finals) if len(finals) > 1 else finals[0])

    def _layers(self, x: Tensor | None, projected: tuple | None, hx, lengths, unbatched: bool):
        """Every layer over time-major x [T, B, I], or with the first layer's input
        projection given (forward_tokens: (projected [T, B, D, G], its weight_hh, bias_hh,
        packed weight_hh)).
        Returns (output [T, B, D*H], [final state parts], checked lengths)."""
        ref = x if x is not None else projected[0]
        T, B = ref.shape[0], ref.shape[1]
        if lengths is not None:
            lengths = self._check_lengths(lengths, T, B, ref.device)

        D, L, out = self.num_directions, self.num_layers, self._output_size()
        if hx is None:
            states = [ref.new_zeros(L * D, B, n) for n in self._state_sizes()]
        else:
            states = self._check_hx(hx, B, unbatched, ref)
        if B == 0:  # an empty batch: empty results, as torch.nn gives (the kernels need rows)
            # Views of the input and states plus an empty sum over every parameter: the
            # results are in the graph of all of them, as torch.nn's are, so a backward
            # runs and leaves zero gradients (not None) on the parameters.
            zero = sum(p.reshape(-1)[:0].sum() for p in self.parameters())
            return (ref[..., :1].expand(T, 0, D * out) + zero, [s + zero for s in states], lengths)

        layer_input = x
        finals = [[] for _ in self._state_names]
        for layer in range(L):
            layer_states = [s[layer * D:(layer + 1) * D] for s in states]
            if layer == 0 and projected is not None:
                out, layer_finals = self._run_projected(*projected, layer_states, lengths)
            else:
                out, layer_finals = self._run_layer(layer, layer_input, layer_states, lengths)
            for acc, f in zip(finals, layer_finals):
                acc.append(f)
            if self.dropout and self.training and layer < L - 1:
                out = _dropout(out, self.dropout)
            layer_input = out
        finals = [torch.cat(f) if L > 1 else f[0] for f in finals]
        return layer_input, finals, lengths

    # -- embedding folding ----------------------------------------------------------

    # Memory the folded table [vocab, D, G] of forward_tokens may take; larger tables are
    # not built (the layer then multiplies as usual). Set on an instance to change it.
    fold_budget_bytes = 128 * 2**20

    def forward_tokens(self, embedding: nn.Embedding, input_ids: Tensor, hx=None, *,
                       lengths: Tensor | None = None):
        """What self(embedding(input_ids), hx, lengths=lengths) returns, for a layer whose
        input is an embedding lookup. input_ids: [B, T] with batch_first (else [T, B]), or
        [T] unbatched, integer ids in [0, embedding.num_embeddings).

        In inference (eval mode, no gradient needed, the native CPU kernels, float32 or
        float64, no max_norm, not traced) the first layer's input projection
        E W_ih^T + b is folded into a table [vocab, D, G] built once per weight version
        (at most fold_budget_bytes; weight_cache_bytes() counts it), and each step reads
        its token's row instead of multiplying: the same results up to float rounding (the
        table's GEMM sums in another order than the step tiles). Otherwise, and for
        layers without a projected kernel, it is exactly self(embedding(input_ids), ...)."""
        if not isinstance(embedding, nn.Embedding):
            raise RecurrentTypeError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        folded = self._folded_table(embedding, input_ids)
        if folded is None:
            return self(embedding(input_ids), hx, lengths=lengths)
        table, w_hh, b_hh, packed = folded
        self._check_token_ids(input_ids, embedding.num_embeddings, has_values(input_ids))
        unbatched = input_ids.dim() == 1
        ids = (input_ids.unsqueeze(1) if unbatched
               else (input_ids.t() if self.batch_first else input_ids))  # [T, B]
        T, B = ids.shape
        projected = table.index_select(0, ids.reshape(-1)).view(T, B, *table.shape[1:])
        output, finals, _ = self._layers(None, (projected, w_hh, b_hh, packed), hx, lengths, unbatched)
        return self._output_form(output, finals, unbatched)

    _projected_op = None  # the op of forward_tokens' folded path (ops.<kind>_layer_projected)

    def _folded_table(self, embedding: nn.Embedding, input_ids) -> tuple | None:
        """(table [vocab, D, G], the first layer's stacked weight_hh, its bias_hh or None,
        weight_hh packed for the kernel)
        when forward_tokens may fold, else None. One cache entry, valid while the
        embedding's weight and every first-layer parameter is the same tensor at the same
        version and storage (as _op_weights' entries); cleared with them. Under
        serving_trace: the entry of its call."""
        if (self._projected_op is None or self.proj_size or self.training
                or embedding.max_norm is not None):
            return None
        if _serving():  # serving_trace's entry (None: that call did not fold)
            entry = self.__dict__.get("_fold_cache")
            return entry[2] if entry is not None else None
        weight = embedding.weight
        params = [weight] + self._layer_params(0)
        if ((torch.is_grad_enabled() and any(p.requires_grad for p in params))
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                or torch.jit.is_tracing() or _autocast_enabled("cpu")
                or not isinstance(input_ids, Tensor) or input_ids.device.type != "cpu"
                or not self._resolves_native()):
            return None
        D, G = self.num_directions, self._gates * self.hidden_size
        if embedding.num_embeddings * D * G * weight.element_size() > self.fold_budget_bytes:
            return None
        # A hit: the same tensors at the same versions and storage as when it was built,
        # so what was checked below (CPU, dtypes, no trace tensor) still holds.
        key = tuple((p._version, p.data_ptr()) for p in params)
        entry = self.__dict__.get("_fold_cache")
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[1], params)):
            return entry[2]
        if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.float64)
                or any(p.dtype != weight.dtype or p.device != weight.device for p in params)
                or is_trace_tensor(weight) or is_trace_tensor(input_ids)):
            return None
        with torch.inference_mode(False), torch.no_grad():
            w = self._stack_weights(0)  # (w_ih, w_hh, bias) or (w_ih, w_hh, b_ih, b_hh)
            bias = w[2]  # the LSTM's b_ih + b_hh, the GRU's b_ih: what the table includes
            table = weight @ w[0].reshape(D * G, -1).t()  # [vocab, D*G]
            if bias is not None:
                table += bias.reshape(D * G)
            # The kernel's panels of W_hh alone (the projected ops take no input).
            packed = ops.pack_recurrent_weights(w[1].new_empty(D, G, 0), w[1])
            folded = (table.view(-1, D, G), w[1], w[3] if len(w) == 4 else None, packed)
        self.__dict__["_fold_cache"] = (key, tuple(params), folded)  # one assignment: thread-safe
        return folded

    def _resolves_native(self) -> bool:
        return (resolve(self.backend, self._projected_op.removesuffix("_projected"), "cpu") == "native"
                and ops.has_native_kernel(self._projected_op, "cpu"))

    @staticmethod
    def _check_token_ids(input_ids: Tensor, vocab: int, read_values: bool = True) -> None:
        if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
            raise RecurrentInputError(f"input_ids must be [B, T] ([T, B] without batch_first) or [T] "
                             f"unbatched, with at least one token, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise RecurrentTypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if not read_values:  # a trace: the graph's Gather (index_select) checks at run time
            return
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab:
            raise RecurrentInputError(f"input_ids must be token ids in [0, num_embeddings={vocab}), got "
                             f"min {lo} and max {hi}")

    def _run_projected(self, projected: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                       packed: Tensor, states: list[Tensor], lengths: Tensor | None):
        """The first layer from its input projection (forward_tokens)."""
        raise NotImplementedError

    # -- argument checks: messages name the argument, expected and actual values --------

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise RecurrentInputError(f"input has {x.shape[-1]} features in its last dimension, expected "
                             f"input_size={self.input_size} (input shape {tuple(x.shape)})")
        w = self.weight_ih_l0
        kind = type(self).__name__
        if x.device != w.device:
            raise RecurrentInputError(f"input is on {x.device} but the {kind}'s parameters are on {w.device}")
        # Under autocast the op casts input and weights itself (ops.py registers it).
        if x.dtype != w.dtype and not _autocast_enabled(x.device.type):
            raise RecurrentTypeError(f"input dtype {x.dtype} does not match the {kind}'s parameters ({w.dtype})")
        if x.shape[0] == 0:
            raise RecurrentInputError(f"input has no time steps (shape {tuple(x.shape)})")

    @staticmethod
    def _check_packed(input: PackedSequence) -> None:
        bs, data = input.batch_sizes, input.data
        if is_trace_tensor(bs):  # torch.export: a PackedSequence's sizes are data (pytorch#62240)
            raise RecurrentInputError(
                "input: a PackedSequence does not export (its sizes are data: torch.export cannot trace "
                "them). Export with seqfuse.export.export_model, which traces pack_padded_sequence as "
                "a padded input plus lengths (seqfuse.nn.packing.symbolic_packing), or call the layer "
                "with the padded input and lengths=")
        if bs.dim() != 1 or bs.numel() == 0 or bs.dtype != torch.int64:
            raise RecurrentInputError(f"input: PackedSequence batch_sizes must be a non-empty 1-D int64 "
                             f"tensor, got shape {tuple(bs.shape)} and dtype {bs.dtype}")
        if data.dim() != 2:
            raise RecurrentInputError(f"input: PackedSequence data must be 2-D [sum(lengths), I], got "
                             f"shape {tuple(data.shape)}")
        if torch.compiler.is_compiling():
            return
        if int(bs.min()) < 1 or bool((bs[1:] > bs[:-1]).any()):
            raise RecurrentInputError(f"input: PackedSequence batch_sizes must not increase and must be >= 1, "
                             f"got {bs.tolist()}")
        if int(bs.sum()) != data.shape[0]:
            raise RecurrentInputError(f"input: PackedSequence batch_sizes sum to {int(bs.sum())} but its data "
                             f"has {data.shape[0]} rows")

    @staticmethod
    def _check_lengths(lengths, T: int, B: int, device: torch.device) -> Tensor:
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype != torch.int64:
            raise RecurrentTypeError(f"lengths must be an int64 tensor, got dtype {lengths.dtype}")
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise RecurrentInputError(f"lengths must have shape [B={B}], got {tuple(lengths.shape)}")
        if lengths.device.type == "meta":
            # A meta tensor has no values: fine beside a meta input (shapes only), not else.
            if device.type != "meta":
                raise RecurrentInputError(f"lengths is a meta tensor (it has no values) but input is on {device}")
            return lengths
        lengths = lengths.cpu()
        if not torch.compiler.is_compiling() and B > 0:
            lo, hi = (int(v) for v in torch.aminmax(lengths))
            if lo < 1:
                raise RecurrentInputError(f"lengths must be >= 1, got min(lengths)={lo}")
            if hi > T:
                raise RecurrentInputError(f"lengths must be <= T={T} (the input's time steps), got max(lengths)={hi}")
        return lengths

    def _check_hx(self, hx, B: int, unbatched: bool, x: Tensor) -> list[Tensor]:
        names = self._state_names
        if len(names) == 1:
            hx = (hx,)
        elif not (isinstance(hx, (tuple, list)) and len(hx) == len(names)):
            raise RecurrentTypeError(f"hx must be a tuple ({', '.join(names)})")
        out = []
        for name, t, size in zip(names, hx, self._state_sizes()):
            shape = (self.num_layers * self.num_directions, B, size)
            if not isinstance(t, Tensor):
                raise RecurrentTypeError(f"hx: {name} must be a Tensor, got {type(t).__name__}")
            expected_dim = 2 if unbatched else 3
            if t.dim() != expected_dim:
                raise RecurrentInputError(f"hx: {name} must be {expected_dim}-D, got shape {tuple(t.shape)}")
            if unbatched:
                t = t.unsqueeze(1)
            if tuple(t.shape) != shape:
                raise RecurrentInputError(f"hx: {name} must have shape {shape}, got {tuple(t.shape)}")
            if t.device != x.device:
                raise RecurrentInputError(f"hx: {name} is on {t.device} but input is on {x.device}")
            if t.dtype != x.dtype and not _autocast_enabled(x.device.type):
                raise RecurrentTypeError(f"hx: {name} dtype {t.dtype} does not match input dtype {x.dtype}")
            out.append(t)
        return out


def _refuse_proj_size(kwargs: dict) -> None:
    if "proj_size" in kwargs:  # torch.nn's error for GRU and RNN, whatever the value
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class LSTM(_RecurrentBase):
    """Multi-layer LSTM with the constructor, parameter names, state_dict keys and
    outputs of torch.nn.LSTM, running each layer (both directions) as one fused op.

    forward(input, hx=None, *, lengths=None):
      input: [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence
      hx:    (h_0, c_0), each [num_layers * D, B, H] ([num_layers * D, H] unbatched)
      lengths: [B] int64 valid lengths of a padded input: the result is what a packed
             input would give (zeros past each length, final states at each length)
             without packing.
    Returns (output, (h_n, c_n)) like torch.nn.LSTM; a PackedSequence in, one out.

    backend: "auto" | "native" | "reference" (see seqfuse.backend).
    """

    _gates = 4
    _state_names = ("h_0", "c_0")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend, proj_size=proj_size)

    _layer_op = "lstm_layer"

    def _run_layer(self, layer, x, states, lengths):
        w = self._op_weights(layer)
        if self.proj_size:  # w: (weight_ih, weight_hh, bias, weight_hr)
            out, h, c = functional.lstm_proj_layer(x, *w, states[0], states[1], lengths,
                                                   backend=self._backend_for(x))
        else:
            out, h, c = functional.lstm_layer(x, *w, states[0], states[1], lengths, backend=self._backend_for(x),
                                              packed_weights=self._packed_weights(layer, w, x, states))
        return out, [h, c]

    _projected_op = "lstm_layer_projected"

    def _run_projected(self, projected, weight_hh, bias_hh, packed, states, lengths):
        out, h, c = ops.lstm_layer_projected(projected, weight_hh, states[0], states[1], lengths,
                                             packed)
        return out, [h, c]


class GRU(_RecurrentBase):
    """Multi-layer GRU with the constructor, parameter names, state_dict keys and outputs
    of torch.nn.GRU (PyTorch's formula: the reset gate multiplies the recurrent product
    plus its bias), running each layer (both directions) as one fused op.

    forward(input, hx=None, *, lengths=None): as seqfuse.nn.LSTM, with hx = h_0
    [num_layers * D, B, H]. Returns (output, h_n) like torch.nn.GRU.
    """

    _gates = 3
    _state_names = ("h_0",)
    _combined_bias = False

    def __init__(self, *args, **kwargs):
        _refuse_proj_size(kwargs)
        super().__init__(*args, **kwargs)

    _layer_op = "gru_layer"

    def _run_layer(self, layer, x, states, lengths):
        w = self._op_weights(layer)
        out, h = functional.gru_layer(x, *w, states[0], lengths, backend=self._backend_for(x),
                                      packed_weights=self._packed_weights(layer, w, x, states))
        return out, [h]

    _projected_op = "gru_layer_projected"

    def _run_projected(self, projected, weight_hh, bias_hh, packed, states, lengths):
        out, h = ops.gru_layer_projected(projected, weight_hh, bias_hh, states[0], lengths, packed)
        return out, [h]


class RNN(_RecurrentBase):
    """Multi-layer Elman RNN, h' = act(W_ih x + b_ih + W_hh h + b_hh) with act tanh or relu,
    with the constructor, parameter names, state_dict keys and outputs of torch.nn.RNN,
    running each layer (both directions) as one fused op.

    forward(input, hx=None, *, lengths=None): as seqfuse.nn.GRU. Returns (output, h_n).
    """

    _gates = 1
    _state_names = ("h_0",)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 backend: str = "auto", **kwargs):
        _refuse_proj_size(kwargs)
        if kwargs:
            raise TypeError(f"RNN.__init__() got an unexpected keyword argument {next(iter(kwargs))!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else "")

    _layer_op = "rnn_layer"

    def _run_layer(self, layer, x, states, lengths):
        w = self._op_weights(layer)
        out, h = functional.rnn_layer(x, *w, states[0], lengths, self.nonlinearity,
                                      backend=self._backend_for(x),
                                      packed_weights=self._packed_weights(layer, w, x, states))
        return out, [h]
