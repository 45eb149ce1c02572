"""KIVI-style quantized storage for the cache (issue 6; DESIGN.md §3 "Quantized storage").

Asymmetric integer quantization in groups, packed into bytes:

* **keys per channel**: every channel of ``group_size`` consecutive tokens shares a scale and a
  zero point (``axis="tokens"``), because keys have outlier *channels* (KIVI's observation);
* **values per token**: every ``group_size`` consecutive channels of one token share them
  (``axis="channels"``); this layout also serves sparse lists of vectors (retained tokens).

``x ≈ q · scale + zero`` with ``q`` in ``[0, 2^bits - 1]``, ``zero`` the group minimum and
``scale = (max - min) / (2^bits - 1)``. Scales and zero points are fp16 for half-precision models
(fp32 for fp32 ones) and ``q`` is computed from the *stored* (rounded) scale and zero point, so
the error of a value is at most half a step plus the rounding of the zero point. ``8 // bits``
codes share a byte, the first in the lowest bits.

Tokens are quantized a block at a time and never re-quantized: a :class:`QuantizedTensor` only
grows by concatenation, so the packed data of old tokens never changes (unlike transformers'
``QuantizedCache``, which re-quantizes the whole history on every flush).

:class:`QuantizedDynamicLayer` is the unmerged layer of a quantized `MiniCache`; merged groups
quantize their directions inside :class:`~minicache.runtime.cache.MergedPairStore`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from minicache.profile import QUANT_BITS, Quantization

AXES = ("tokens", "channels")


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scales and zero points for a cache of ``dtype``: fp16, or fp32 for fp32 models."""
    # fp16 rather than bf16: a zero point needs precision (its rounding adds to every value's
    # error); key/value ranges of real models sit far inside fp16's range.
    return torch.float32 if dtype.itemsize >= 4 else torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (uint8, each < ``2**bits``) into ``[..., D * bits // 8]`` uint8.

    Code ``j`` of a byte sits in bits ``[j * bits, (j + 1) * bits)``.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    per = 8 // bits
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"cannot pack {d} codes of {bits} bits into whole bytes")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], d // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    out = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per):  # bitwise_or of disjoint fields (no reduction op for it in torch)
        out |= grouped[..., j] << shifts[j]
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., P]`` uint8 → ``[..., P * 8 // bits]`` uint8 codes."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed group-wise asymmetric quantization of a ``[..., N, D]`` tensor.

    Attributes
    ----------
    data : torch.Tensor
        ``[..., N, D * bits // 8]`` uint8 packed codes.
    scale, zero : torch.Tensor
        ``[..., N // G, D]`` for ``axis="tokens"`` (per channel, groups of ``G`` tokens) or
        ``[..., N, D // G]`` for ``axis="channels"`` (per token, groups of ``G`` channels);
        fp16 or fp32 (:func:`scale_dtype`).
    bits : int
        2 or 4.
    group_size : int
        ``G``.
    axis : str
        ``"tokens"`` or ``"channels"``: along which axis a group runs.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str

    @property
    def length(self) -> int:
        """``N``: the tokens (or rows) held."""
        return self.data.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.data.shape[-1] * 8 // self.bits

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (self.data, self.scale, self.zero)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[..., N, D]`` approximation in ``dtype`` (computed in float32)."""
        codes = unpack(self.data, self.bits).float()
        *lead, n, d = codes.shape
        g = self.group_size
        if self.axis == "tokens":
            grouped = codes.reshape(*lead, n // g, g, d)
            out = grouped * self.scale.float().unsqueeze(-2) + self.zero.float().unsqueeze(-2)
        else:
            grouped = codes.reshape(*lead, n, d // g, g)
            out = grouped * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return out.reshape(*lead, n, d).to(dtype)

    def slice_tokens(self, start: int, end: int) -> QuantizedTensor:
        """Tokens ``[start, end)`` (views, no copy). Per-channel groups (``axis="tokens"``) cannot
        be split: ``start`` must be a multiple of ``group_size``, and ``end`` too unless it is the end."""
        n, g = self.length, self.group_size
        if not 0 <= start <= end <= n:
            raise ValueError(f"token range [{start}, {end}) is outside [0, {n})")
        if self.axis == "channels":
            return self._map(lambda t: t[..., start:end, :])
        if start % g or (end % g and end != n):
            raise ValueError(f"token range [{start}, {end}) splits a group of {g} tokens")
        rows = slice(start // g, -(-end // g))
        return QuantizedTensor(
            self.data[..., start:end, :], self.scale[..., rows, :], self.zero[..., rows, :], self.bits, g, self.axis
        )

    def _map(self, fn) -> QuantizedTensor:
        return QuantizedTensor(fn(self.data), fn(self.scale), fn(self.zero), self.bits, self.group_size, self.axis)

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select along a leading dimension (batch, or the rows of a sparse list)."""
        index = index.to(self.data.device)
        return self._map(lambda t: t.index_select(dim, index))

    def to(self, device) -> QuantizedTensor:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def cat(self, other: QuantizedTensor, dim: int = -2) -> QuantizedTensor:
        """Concatenate along tokens (``dim=-2``) or a leading dimension; both keep their own codes."""
        if (other.bits, other.group_size, other.axis) != (self.bits, self.group_size, self.axis):
            raise ValueError("cannot concatenate tensors quantized differently")
        return QuantizedTensor(
            torch.cat([self.data, other.data], dim),
            torch.cat([self.scale, other.scale], dim),
            torch.cat([self.zero, other.zero], dim),
            self.bits,
            self.group_size,
            self.axis,
        )


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: str) -> QuantizedTensor:
    """Quantize ``x`` ``[..., N, D]`` group-wise (see :class:`QuantizedTensor` for the layout).

    ``axis="tokens"`` needs ``N % group_size == 0``; ``axis="channels"`` needs
    ``D % group_size == 0``.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    *lead, n, d = x.shape
    g = group_size
    x32 = x.float()
    if axis == "tokens":
        if n % g:
            raise ValueError(f"per-channel groups of {g} tokens need a multiple of {g} tokens, got {n}")
        grouped = x32.reshape(*lead, n // g, g, d)
        reduce_dim = -2
    else:
        if d % g:
            raise ValueError(f"per-token groups of {g} channels need head_dim divisible by {g}, got {d}")
        grouped = x32.reshape(*lead, n, d // g, g)
        reduce_dim = -1
    levels = (1 << bits) - 1
    sdtype = scale_dtype(x.dtype)
    limit = torch.finfo(sdtype).max
    lo = grouped.amin(reduce_dim).clamp(-limit, limit)
    hi = grouped.amax(reduce_dim).clamp(-limit, limit)
    zero = lo.to(sdtype)
    scale = ((hi - zero.float()) / levels).clamp(0, limit).to(sdtype)
    # Codes from the stored (rounded) scale and zero point: what dequantization will use.
    s, z = scale.float().unsqueeze(reduce_dim), zero.float().unsqueeze(reduce_dim)
    codes = torch.where(s > 0, (grouped - z) / torch.where(s > 0, s, 1.0), 0.0)
    codes = codes.round_().clamp_(0, levels).to(torch.uint8).reshape(*lead, n, d)
    return QuantizedTensor(pack(codes, bits), scale, zero, bits, g, axis)


def quantize_keys(x: torch.Tensor, spec: Quantization) -> QuantizedTensor:
    """Keys ``[B, H, N, D]`` per channel, groups of ``spec.group_size`` tokens."""
    return quantize(x, spec.bits, spec.group_size, "tokens")


def quantize_values(x: torch.Tensor, spec: Quantization) -> QuantizedTensor:
    """Values (or any vectors) ``[..., N, D]`` per token, groups of ``min(group_size, D)`` channels."""
    return quantize(x, spec.bits, spec.value_group(x.shape[-1]), "channels")


def append(old: QuantizedTensor | None, new: QuantizedTensor, dim: int = -2) -> QuantizedTensor:
    return new if old is None else old.cat(new, dim)


class QuantizedDynamicLayer(CacheLayerMixin):
    """An unmerged full-attention layer stored KIVI-style: a packed prefix plus an exact window.

    ``keys``/``values`` are the exact residual window ``[B, H, r, D]`` (model dtype, as in
    transformers' dynamic layers); ``qkeys``/``qvalues`` are the quantized prefix of ``Q`` tokens.
    Whenever the window holds at least ``residual_length + group_size`` tokens, its oldest whole
    groups are quantized (after this step's attention, which therefore sees exact new tokens).
    :meth:`update` returns the dequantized prefix followed by the window: ``[B, H, Q + r, D]``
    (or, with ``fused_decode`` on a single-token step, views the fused kernel reads packed).

    Parameters
    ----------
    spec : Quantization
        Bits, group size and residual window.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False  # only the exact window can be cropped; see `crop`

    def __init__(self, spec: Quantization):
        super().__init__()
        self.spec = spec
        self.qkeys: QuantizedTensor | None = None
        self.qvalues: QuantizedTensor | None = None
        # Set by MiniCache.use_kernels: single-token steps then return MergedKVView snapshots of the
        # packed prefix and the window, which the fused decode kernel reads without dequantizing.
        self.fused_decode = False

    def __repr__(self) -> str:
        return f"QuantizedDynamicLayer({self.spec.describe()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.qkeys is None:
            out = self.keys, self.values
        elif self.fused_decode and key_states.shape[-2] == 1:
            from minicache.runtime.cache import MergedKVView  # cache imports this module

            out = (
                MergedKVView.of_quantized_layer(self.keys, self.qkeys),
                MergedKVView.of_quantized_layer(self.values, self.qvalues),
            )
        else:
            out = (
                torch.cat([self.qkeys.dequantize(self.dtype), self.keys], dim=-2),
                torch.cat([self.qvalues.dequantize(self.dtype), self.values], dim=-2),
            )
        g = self.spec.group_size
        count = (self.keys.shape[-2] - self.spec.residual_length) // g * g
        if count > 0:
            self.qkeys = append(self.qkeys, quantize_keys(self.keys[..., :count, :], self.spec))
            self.qvalues = append(self.qvalues, quantize_values(self.values[..., :count, :], self.spec))
            # Clone so that the old window's storage is freed, not kept alive by a view.
            self.keys = self.keys[..., count:, :].clone()
            self.values = self.values[..., count:, :].clone()
        return out

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held: the exact window, then packed codes, scales and zero points."""
        if not self.is_initialized:
            return
        yield self.keys
        yield self.values
        for q in (self.qkeys, self.qvalues):
            if q is not None:
                yield from q.tensors()

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        window = self.keys.shape[-2]
        if count > window:
            raise ValueError(
                f"cannot crop {count} tokens from a quantized layer: only the exact residual window "
                f"({window} tokens) can be cropped; quantized tokens cannot be un-quantized"
            )
        self.keys = self.keys[..., : window - count, :].clone()
        self.values = self.values[..., : window - count, :].clone()

    def _select(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        if self.qkeys is not None:
            self.qkeys = self.qkeys.index_select(0, index)
            self.qvalues = self.qvalues.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.long())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def offload(self) -> None:
        if self.is_initialized:
            super().offload()
            self.qkeys = None if self.qkeys is None else self.qkeys.to("cpu")
            self.qvalues = None if self.qvalues is None else self.qvalues.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            super().prefetch()
            self.qkeys = None if self.qkeys is None else self.qkeys.to(self.device)
            self.qvalues = None if self.qvalues is None else self.qvalues.to(self.device)
