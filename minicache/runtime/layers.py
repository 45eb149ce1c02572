"""The per-layer objects transformers' `Cache` holds: merged members and quantized unmerged layers.

:class:`MergedLayer` is one member of a merged group: a thin view that forwards to the group's shared
:class:`~minicache.runtime.store.GroupStore`. :class:`QuantizedLayer` is an unmerged full-attention
layer stored packed by the profile's quantizer plus an exact window. Layers that neither covers use
transformers' own dynamic layers, so they behave exactly like `DynamicCache`. Every layer reports
its memory as parts (:meth:`memory_parts`) and what a `DynamicCache` would hold (:meth:`full_bytes`);
:meth:`MiniCache.memory_report` is their sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from transformers.cache_utils import CacheLayerMixin

from minicache.profile import Quantization
from minicache.quant import QuantizedTensor, append
from minicache.quant.packed import quantize
from minicache.quant.rotated import rotation_matrix
from minicache.runtime.rope import RopeAngles
from minicache.runtime.store import GroupStore, tensor_bytes
from minicache.runtime.views import MergedKVView
from minicache.sidecar import held_copy

__all__ = ["MergedLayer", "OwnedLayer", "QuantizedLayer", "packing_input", "plain_layer_bytes", "sink_stand_ins",
           "stored_window"]


class OwnedLayer(CacheLayerMixin):
    """A layer whose keys and values another object holds (``owner``: a group's store, a padded batch's
    rows), so that :class:`MiniCache` applies batch operations and crops once, to the owner."""

    is_compileable = False
    is_croppable = False  # see `MiniCache.crop`
    is_sliding = False
    owner = "its owner"  # what holds the data, for the error below

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _batch_op_error(self, *args, **kwargs):
        raise RuntimeError(f"batch operations on {self!r} must go through MiniCache, which owns {self.owner}")

    reorder_cache = batch_select_indices = batch_repeat_interleave = crop = offload = prefetch = _batch_op_error


class MergedLayer(OwnedLayer):
    """One member layer of a merged group: a view onto the shared :class:`GroupStore`.

    Batch operations are applied by :class:`MiniCache` once per store, not per member layer.
    """

    owner = "the store"

    def __init__(self, store: GroupStore, member: int):
        super().__init__()
        self.store = store
        self.member = member

    def __repr__(self) -> str:
        return f"MergedLayer(layers={list(self.store.layers)}, member={self.member})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.update(self.member, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.store.seen(self.member)

    def reset(self) -> None:
        self.is_initialized = False
        if self.member == 0:
            self.store.reset()


class QuantizedLayer(CacheLayerMixin):
    """An unmerged full-attention layer stored packed (KIVI by default): a packed prefix plus a recent window.

    ``keys``/``values`` are the residual window of ``r`` tokens as stored: ``[B, H, r, D]`` in the model
    dtype (exact, as in transformers' dynamic layers), or with ``spec.window_bits`` a
    :class:`QuantizedTensor` of that width per token and head; ``qkeys``/``qvalues`` are the packed
    prefix of ``Q`` tokens. A coded window stores each token once, as it arrives (the step that brings
    it attends it exact), and the prefix packs it from that storage, so what is packed does not depend
    on how the tokens were fed.
    Whenever the window holds at least ``residual_length`` tokens plus a whole chunk (a key group of
    ``group_size`` tokens for KIVI), its oldest whole chunks are packed (after this step's attention,
    which therefore sees exact new tokens) and never re-packed. :meth:`update` returns the
    dequantized prefix followed by the window, ``[B, H, Q + r, D]`` (or, with ``views``, views that
    the fused attention paths read packed).

    With ``spec.sink_tokens = S > 0`` the first ``S`` tokens stay exact in ``sink_keys``/``sink_values``
    ``[B, H, S, D]``: packing stands a copy of token ``S`` in for them (so their outlier keys do not
    stretch the first group's ranges), and every read writes the exact ones back over those rows.

    Parameters
    ----------
    spec : Quantization
        Scheme, group size and residual window.
    bits : int, optional
        Code width of this layer's keys (default: ``spec.bits`` when it is one number).
    value_bits : int, optional
        Code width of its values (default: ``bits`` when given, else ``spec``'s value width).
    rope : RopeAngles, optional
        The model's RoPE; required when ``spec.pre_rope_keys`` (keys are packed with it removed at
        their cache indices, and it is put back on every read).
    key_weights : torch.Tensor, optional
        ``[H, D]`` query energies of this layer's channels; required when ``spec.key_rounding`` is
        ``"queries"`` (keys are rounded by them, :func:`minicache.quant.packed.quantize`).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # only the exact window can be cropped; see `crop`

    def __init__(self, spec: Quantization, bits: int | None = None, value_bits: int | None = None,
                 rope: RopeAngles | None = None, key_weights: torch.Tensor | None = None):
        super().__init__()
        if spec.pre_rope_keys and rope is None:
            raise ValueError("pre-RoPE keys (quantization.pre_rope_keys) need the model's RoPE: build the cache "
                             "from the model or its config")
        if (spec.key_rounding == "queries") != (key_weights is not None):
            raise ValueError("keys rounded for the queries (quantization.key_rounding: queries) need the profile's "
                             f"key weights, and only they take them; key_rounding is {spec.key_rounding!r}")
        self.key_weights = key_weights
        self.rope = rope if spec.pre_rope_keys else None
        self.spec = spec
        self.bits = spec.bits_of(0) if bits is None else bits
        self.value_bits = (spec.bits_of(0, "values") if bits is None else bits) if value_bits is None else value_bits
        self.quantizer = spec.quantizer
        q, g = self.quantizer, spec.group_size
        self.chunk = math.lcm(q.chunk_tokens("keys", g), q.chunk_tokens("values", g), g)
        self.qkeys: QuantizedTensor | None = None
        self.qvalues: QuantizedTensor | None = None
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        # Set once when the owning cache is bound to a model's attention plan: every step then returns
        # views the fused attention paths read without dequantizing the whole prefix.
        self.views = False

    def __repr__(self) -> str:
        bits = f"{self.bits}" if self.value_bits == self.bits else f"{self.bits}/{self.value_bits}"
        extra = (f", {self.spec.sink_tokens} sinks" if self.spec.sink_tokens else "") + (
            ", keys pre-RoPE" if self.rope is not None else "")
        return f"QuantizedLayer({bits}-bit {self.spec.scheme}, group {self.spec.group_size}{extra})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = (self._stored(x[..., :0, :]) for x in (key_states, value_states))
        self.is_initialized = True

    def _stored(self, x: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """New window tokens ``[B, H, n, D]`` as the window stores them."""
        return stored_window(x, self.spec.window_bits)

    def _exact_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored window's keys and values in the model dtype ``[B, H, r, D]``. A coded window's
        sinks are held exact from their arrival (:meth:`_keep_sinks`) and read exact until they are packed."""
        if self.spec.window_bits is None:
            return self.keys, self.values
        keys, values = restored_pair(self.keys, self.values, self.dtype)
        if self.quantized_length == 0 and self.sink_keys is not None:
            s = self.sink_keys.shape[-2]
            keys[..., :s, :], values[..., :s, :] = self.sink_keys, self.sink_values
        return keys, values

    def _keep_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A coded window keeps exact copies of the first ``sink_tokens`` tokens as they arrive (an exact
        window hands its own to the sinks when it packs them)."""
        seen, sinks = self.get_seq_length(), self.spec.sink_tokens
        take = min(sinks - seen, key_states.shape[-2])
        if take <= 0:
            return
        new = key_states[..., :take, :], value_states[..., :take, :]
        if self.sink_keys is None:
            self.sink_keys, self.sink_values = (x.clone() for x in new)
        else:
            self.sink_keys, self.sink_values = (torch.cat([old, x], -2)
                                                for old, x in zip((self.sink_keys, self.sink_values), new, strict=True))

    @property
    def window_length(self) -> int:
        """``r``: tokens in the recent window."""
        return _length(self.keys)

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.spec.window_bits is None:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            window = self.keys, self.values
        else:  # attend the new tokens exact; store them once
            window = tuple(torch.cat([old, new], dim=-2)
                           for old, new in zip(self._exact_window(), (key_states, value_states), strict=True))
            self._keep_sinks(key_states, value_states)
            new_keys, new_values = stored_pair(key_states, value_states, self.spec.window_bits)
            self.keys, self.values = self.keys.cat(new_keys), self.values.cat(new_values)
        if self.views:  # every step, packed prefix or not: one kind of object per configuration
            out = self._views(*window)
        elif self.qkeys is None:
            out = window
        else:  # the views' own restore (RoPE put back, exact sinks written over), whole
            out = tuple(view.materialize() for view in self._views(*window))
        count = (self.window_length - self.spec.residual_length) // self.chunk * self.chunk
        if count > 0:
            start, sinks = self.quantized_length, self.spec.sink_tokens
            if self.spec.window_bits is not None:  # pack what the window stored
                window = self._exact_window()
            keys, values = (x[..., :count, :] for x in window)
            if start == 0 and sinks and self.sink_keys is None:
                self.sink_keys, self.sink_values = (x[..., :sinks, :].clone() for x in (keys, values))
            keys = packing_input(keys, "keys", start, sinks, self.rope)
            values = packing_input(values, "values", start, sinks, self.rope)
            self.qkeys = append(self.qkeys, self.spec.pack(keys, "keys", self.bits, self._key_weights(keys)))
            self.qvalues = append(self.qvalues, self.spec.pack(values, "values", self.value_bits))
            # Clone so that the old window's storage is freed, not kept alive by a view.
            self.keys, self.values = (_window_slice(w, count, None) for w in (self.keys, self.values))
        return out

    def _key_weights(self, keys: torch.Tensor) -> torch.Tensor | None:
        """The key weights on ``keys``' device (shared by every cache of the profile, converted once)."""
        return None if self.key_weights is None else held_copy(self.key_weights, keys.device, torch.float32)

    def views_of(self) -> tuple[MergedKVView, MergedKVView]:
        """Snapshots of the packed prefix (with its exact sinks) and the window of keys and values."""
        return self._views(*self._exact_window())

    def _views(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[MergedKVView, MergedKVView]:
        """Views of the packed prefix followed by these windows ``[B, H, r, D]`` (model dtype)."""
        return (MergedKVView.of_quantized_layer(keys, self.qkeys, self.quantizer, self.sink_keys, self.rope),
                MergedKVView.of_quantized_layer(values, self.qvalues, self.quantizer, self.sink_values))

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.window_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held: the window and sinks, then packed codes, scales and zero points."""
        if not self.is_initialized:
            return
        for window in (self.keys, self.values):
            yield from _window_tensors(window)
        if self.sink_keys is not None:
            yield self.sink_keys
            yield self.sink_values
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                yield from q.tensors()

    def memory_parts(self) -> dict[str, int]:
        parts = {"residual": 0, "retained": 0, "packed": 0, "scales": 0}
        if self.is_initialized:
            parts["residual"] = tensor_bytes(*_window_tensors(self.keys), *_window_tensors(self.values))
            if self.sink_keys is not None:
                parts["retained"] = tensor_bytes(self.sink_keys, self.sink_values)
            for q in (self.qkeys, self.qvalues):
                if q is not None:
                    parts["packed"] += q.code_bytes
                    parts["scales"] += q.scale_bytes
        return parts

    def full_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        window = self.values
        b, h = _window_tensors(window)[0].shape[:2]
        d = window.shape[-1] if isinstance(window, torch.Tensor) else window.head_dim  # not the codes' bytes
        return 2 * b * h * self.get_seq_length() * d * self.dtype.itemsize

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self.sink_keys = self.sink_values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        window = self.window_length
        if count > window:
            raise ValueError(
                f"cannot crop {count} tokens from a quantized layer: only the residual window "
                f"({window} tokens) can be cropped; quantized tokens cannot be un-quantized"
            )
        self.keys, self.values = (_window_slice(w, 0, window - count) for w in (self.keys, self.values))
        if self.quantized_length == 0 and self.sink_keys is not None:  # a coded window's sinks, not yet packed
            self.sink_keys, self.sink_values = (x[..., : window - count, :].clone()
                                                for x in (self.sink_keys, self.sink_values))

    def _select(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(_window_tensors(self.keys)[0].device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        if self.qkeys is not None:
            self.qkeys = self.qkeys.index_select(0, index)
            self.qvalues = self.qvalues.index_select(0, index)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.index_select(0, index)
            self.sink_values = self.sink_values.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.long())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(_window_tensors(self.keys)[0].shape[0]).repeat_interleave(repeats))

    def offload(self) -> None:
        if self.is_initialized:
            self.keys, self.values = (_move(w, "cpu") for w in (self.keys, self.values))
            self.qkeys = None if self.qkeys is None else self.qkeys.to("cpu")
            self.qvalues = None if self.qvalues is None else self.qvalues.to("cpu")
            self._move_sinks("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and _window_tensors(self.keys)[0].device != self.device:
            self.keys, self.values = (_move(w, self.device) for w in (self.keys, self.values))
            self.qkeys = None if self.qkeys is None else self.qkeys.to(self.device)
            self.qvalues = None if self.qvalues is None else self.qvalues.to(self.device)
            self._move_sinks(self.device)

    def _move_sinks(self, device) -> None:
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.to(device, non_blocking=True)
            self.sink_values = self.sink_values.to(device, non_blocking=True)


def stored_window(x: torch.Tensor, bits: int | None) -> torch.Tensor | QuantizedTensor:
    """Window tokens ``[..., n, D]`` as a :class:`QuantizedLayer` with ``window_bits = bits`` stores them:
    themselves (None), or ``bits``-bit codes per token and head (one group of ``D`` channels). Below 8 bits
    the head vector is turned by the ``rotated`` scheme's rotation first: a key's few outlier channels would
    otherwise set its range, leaving the other channels a handful of levels."""
    if bits is None:
        return x
    return quantize(x, bits, x.shape[-1], "channels", rotation=window_rotation(bits, x.shape[-1], x.device))


def window_rotation(bits: int, head_dim: int, device) -> torch.Tensor | None:
    """The rotation a ``bits``-bit coded window turns its head vectors by: the ``rotated`` scheme's below 8 bits,
    none at 8 (the format before 6-bit windows)."""
    return None if bits >= 8 else rotation_matrix(head_dim, device)


def stored_pair(keys: torch.Tensor, values: torch.Tensor, bits: int | None) -> tuple:
    """:func:`stored_window` of a step's keys and values ``[..., n, D]``, coded in one call when their shapes
    match: per-token groups code each vector alone, so the codes are the same, for half the small operations
    a decode step's token costs (`benchmarks/window_probe.py`)."""
    if bits is None or keys.shape != values.shape:
        return stored_window(keys, bits), stored_window(values, bits)
    both = stored_window(torch.stack([keys, values]), bits)
    return both.pick(0), both.pick(1)


def restored_pair(keys: QuantizedTensor, values: QuantizedTensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A coded window's keys and values ``[..., r, D]`` in ``dtype``, restored in one call when their shapes match
    (the codes are stacked first: a copy of a few KiB, for half the small operations a decode step costs)."""
    if keys.data.shape != values.data.shape:
        return keys.dequantize(dtype), values.dequantize(dtype)
    both = QuantizedTensor.stack([keys, values]).dequantize(dtype)
    # Indexed, not unbind(): callers write exact sinks over these, and autograd refuses in-place writes to
    # the views of a function with several outputs (a plain model call, outside torch.no_grad).
    return both[0], both[1]


def _window_tensors(window: torch.Tensor | QuantizedTensor) -> tuple[torch.Tensor, ...]:
    """The tensors a stored window holds (exact: itself; 8-bit: codes, scales, zero points)."""
    return (window,) if isinstance(window, torch.Tensor) else tuple(window.tensors())


def _length(window: torch.Tensor | QuantizedTensor) -> int:
    return window.shape[-2] if isinstance(window, torch.Tensor) else window.length


def _window_slice(window: torch.Tensor | QuantizedTensor, start: int, end: int | None):
    """Tokens ``[start, end)`` of a stored window, in storage of their own."""
    if isinstance(window, torch.Tensor):
        return window[..., start:end, :].clone()
    return window.slice_tokens(start, window.length if end is None else end).clone()


def _move(window: torch.Tensor | QuantizedTensor, device) -> torch.Tensor | QuantizedTensor:
    return window.to(device, non_blocking=True) if isinstance(window, torch.Tensor) else window.to(device)


def packing_input(x: torch.Tensor, role: str, start: int, sink_tokens: int, rope: RopeAngles | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """What a :class:`QuantizedLayer` packs for its tokens ``[start, start + N)`` of ``role``.

    Keys with ``rope`` have it removed at those cache indices (cast to ``dtype``, default ``x``'s);
    in the first chunk (``start == 0``) token ``sink_tokens`` stands in for the exact sinks
    (:func:`sink_stand_ins`). The one place both the layer and ``--kv-bits auto``'s prediction
    (:func:`minicache.calibrate.bits.fisher_damage`) get it from.
    """
    if rope is not None and role == "keys":
        x = rope.remove(x, start).to(x.dtype if dtype is None else dtype)
    if start == 0 and sink_tokens:
        x = sink_stand_ins(x, sink_tokens)
    return x


def sink_stand_ins(x: torch.Tensor, sinks: int) -> torch.Tensor:
    """A copy of ``x`` ``[..., N, D]`` whose first ``sinks`` tokens are token ``sinks`` (what a
    :class:`QuantizedLayer` packs in their place: they are kept exact, and must not set any ranges)."""
    x = x.clone()
    x[..., :sinks, :] = x[..., sinks : sinks + 1, :]
    return x


def plain_layer_bytes(layer: CacheLayerMixin) -> int:
    """Bytes of the keys and values a transformers dynamic layer holds."""
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor) and t.numel())
