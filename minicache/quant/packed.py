"""Packed integer tensors: uniform asymmetric group-wise quantization, codes as a bit stream.

``x ≈ q · scale + zero`` with ``q`` in ``[0, 2^bits - 1]``, ``zero`` the group minimum and
``scale = (max - min) / (2^bits - 1)``, for groups running along one of two axes of a
``[..., N, D]`` tensor:

* ``axis="tokens"``: every channel of ``group_size`` consecutive tokens shares a scale and a zero
  point (per-channel quantization);
* ``axis="channels"``: every ``group_size`` consecutive channels of one token share them
  (per-token quantization); this layout also serves sparse lists of vectors.

Scales and zero points are fp16 for half-precision data (fp32 for fp32), and ``q`` is computed from
the *stored* (rounded) scale and zero point, so the error of a value is at most half a step plus the
rounding of the zero point. The codes of a row form a little-endian bit stream: code ``j`` sits in
bits ``[j * bits, (j + 1) * bits)`` of the row, so 2- and 4-bit codes never cross a byte (``8 // bits``
per byte, the first in the lowest bits) and 3-bit codes pack 8 to 3 bytes, some crossing a byte.

A quantizer may rotate vectors before packing them (:attr:`QuantizedTensor.rotation`, an orthogonal
``[D, D]`` matrix shared by every tensor of a scheme): :meth:`QuantizedTensor.dequantize` undoes it.
It may also space the ``2^bits`` levels of a group unevenly (:attr:`QuantizedTensor.levels`: code ``j``
means ``levels[j]`` steps above the zero point instead of ``j``), with the same bytes.

A group's scale and zero point may also be stored in 8 bits each instead of 16 (:attr:`QuantizedTensor.scale_bits`):
the scale as ``2^((c - 128) / 8)`` for a ``uint8`` code ``c`` (eight steps per octave, ``2^-16`` to ``2^15.875``)
and the zero point in quarter steps of that scale, ``z / 4 · scale`` for an ``int8`` ``z``. Half the bytes of
scales; a group's step may be up to 4.4 % coarser or finer than its range asks (the codes are clamped), and a
group whose minimum lies beyond the zero point's reach (32 steps below zero, 31.75 above) gets a coarser scale.

The codes are the nearest levels, or with per-channel ``weights`` (:func:`quantize`) chosen channel by channel with
error feedback, so that the weighted error is small rather than the plain one (the same levels and bytes).

A :class:`QuantizedTensor` only grows by concatenation: the packed data of old tokens never changes.
Quantizers (:mod:`minicache.quant`) decide which axis and group size each role of the cache uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from minicache.sidecar import held_copy

__all__ = ["AXES", "PACKABLE_BITS", "SCALE_BITS", "QuantizedTensor", "append", "checked_levels", "code_values",
           "decode_scales", "encode_scales", "feedback_factor", "pack", "quantize", "scale_dtype", "unpack"]

AXES = ("tokens", "channels")
#: Supported code widths (3 bits: a row's width must be a multiple of 8 codes; 6 bits: of 4).
PACKABLE_BITS = (1, 2, 3, 4, 6, 8)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scales and zero points for data of ``dtype``: fp16, or fp32 for fp32 data."""
    # fp16 rather than bf16: a zero point needs precision (its rounding adds to every value's
    # error); key/value ranges of real models sit far inside fp16's range.
    return torch.float32 if dtype.itemsize >= 4 else torch.float16


#: Widths a group's scale and zero point may be stored at instead of fp16/fp32 (:attr:`QuantizedTensor.scale_bits`).
SCALE_BITS = (8,)
#: 8-bit scales: code ``c`` means ``2^((c - SCALE_CODE_OFFSET) / SCALE_CODES_PER_OCTAVE)``.
SCALE_CODES_PER_OCTAVE = 8
SCALE_CODE_OFFSET = 128
#: 8-bit zero points: ``z`` means ``z / ZERO_STEPS`` steps of the group's scale.
ZERO_STEPS = 4


@functools.lru_cache(maxsize=8)
def _scale_table(device: str) -> torch.Tensor:
    """``[256]`` float32: the scale each code means (a table, not ``exp2``: vectorised and scalar ``exp2`` may
    differ in the last bit, and every reader of a tensor must restore the same bits)."""
    codes = torch.arange(256, dtype=torch.float64)
    return torch.exp2((codes - SCALE_CODE_OFFSET) / SCALE_CODES_PER_OCTAVE).float().to(device)


def _scale_of(code: torch.Tensor) -> torch.Tensor:
    return _scale_table(str(code.device))[code.long()]


def _scale_code(scale: torch.Tensor, rounding) -> torch.Tensor:
    log = torch.log2(scale.float().clamp_min(2.0**-40)) * SCALE_CODES_PER_OCTAVE + SCALE_CODE_OFFSET
    return rounding(log).clamp_(0, 255)


def encode_scales(lo: torch.Tensor, hi: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of the scales and zero points of groups spanning ``[lo, hi]`` with codes ``0..top``:
    ``(uint8 scale codes, int8 zero points)``, shaped like ``lo``. The scale is the nearest code's (so the
    top of a group may be clamped by a few percent of a step); a group whose ``lo`` lies beyond 31.75 steps
    of zero gets the smallest coarser scale that reaches it."""
    code = _scale_code((hi - lo) / top, torch.round)
    z = torch.round(lo / _scale_of(code) * ZERO_STEPS)
    far = (z < -128) | (z > 127)
    if bool(far.any()):
        wide = _scale_code(lo.abs() * ZERO_STEPS / 127, torch.ceil)
        code = torch.where(far, torch.maximum(code, wide), code)
        z = torch.round(lo / _scale_of(code) * ZERO_STEPS)
    return code.to(torch.uint8), z.clamp_(-128, 127).to(torch.int8)


def decode_scales(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scales and zero points of :func:`encode_scales`' codes."""
    step = _scale_of(scale)
    return step, zero.float() * step / ZERO_STEPS


def codes_per_word(bits: int) -> int:
    """The fewest codes that fill a whole number of bytes: ``8 // bits`` for widths dividing 8, 8 for 3 bits
    (3 bytes), 4 for 6 bits (3 bytes). A word spans at most 3 bytes, so it fits the int32 of :func:`pack`."""
    return 8 // math.gcd(bits, 8)


#: Codes converted at a time by :func:`pack` and :func:`unpack`: their int32 intermediates stay
#: within a few hundred MiB however large the tensor (a 32 x 32k-token Llama-2-7B cache has 4.3 G
#: codes; converting it whole needed tens of GiB on the GPU).
CONVERT_CHUNK = 1 << 26


def _by_rows(fn, x: torch.Tensor, width: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``fn`` applied to ``x`` ``[..., W]`` in slices of rows, into one ``[..., width]`` tensor of ``dtype``."""
    rows = x.reshape(x.numel() // max(1, x.shape[-1]), x.shape[-1])  # explicit: -1 is ambiguous for 0 rows
    step = max(1, CONVERT_CHUNK // max(1, x.shape[-1]))
    if rows.shape[0] <= step:
        return fn(rows).reshape(*x.shape[:-1], width)
    out = torch.empty(rows.shape[0], width, dtype=dtype, device=x.device)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = fn(rows[start : start + step])
    return out.reshape(*x.shape[:-1], width)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` (uint8, each < ``2**bits``) into ``[..., D * bits // 8]`` uint8.

    Little-endian bit stream: code ``j`` sits in bits ``[j * bits, (j + 1) * bits)`` of the row.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    if bits == 8:  # one code per byte: the codes are their own bit stream
        return codes.to(torch.uint8).contiguous()
    per = codes_per_word(bits)
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"cannot pack {d} codes of {bits} bits into whole bytes (a multiple of {per} is needed)")
    word_bytes = per * bits // 8
    shifts = torch.arange(0, per * bits, bits, dtype=torch.int32, device=codes.device)
    byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32, device=codes.device)

    def rows(c: torch.Tensor) -> torch.Tensor:
        grouped = c.to(torch.int32).reshape(c.shape[0], d // per, per)
        # disjoint bit fields: the sum is their bitwise or (int32: a word holds at most 24 bits)
        word = (grouped << shifts).sum(-1, dtype=torch.int32)
        return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(c.shape[0], d * bits // 8)

    return _by_rows(rows, codes, d * bits // 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., P]`` uint8 → ``[..., P * 8 // bits]`` uint8 codes."""
    if bits == 8:
        return packed
    per = codes_per_word(bits)
    word_bytes = per * bits // 8
    p = packed.shape[-1]
    if word_bytes == 1:
        # widths dividing 8: no code crosses a byte, so shift the bytes themselves (uint8 throughout, masked
        # in place: no temporary beyond the codes, so no slicing; ~1.4x faster on CPU than int32 words)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = packed.unsqueeze(-1) >> shifts
        codes &= (1 << bits) - 1
        return codes.reshape(*packed.shape[:-1], p * per)
    return _by_rows(lambda x: _word_codes(x, bits).to(torch.uint8), packed, p * 8 // bits)


def _word_codes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[rows, P * 8 // bits]`` int32 of packed rows ``x`` ``[rows, P]`` whose words span several bytes
    (3 bits: 8 codes in 3 bytes)."""
    per = codes_per_word(bits)
    word_bytes = per * bits // 8
    n, p = x.shape
    shifts = torch.arange(0, per * bits, bits, dtype=torch.int32, device=x.device)
    grouped = x.reshape(n, p // word_bytes, word_bytes)
    if word_bytes == 3 and sys.byteorder == "little":
        # a zero byte after each 3-byte word and the 4 bytes read as one int32 (the stream is little-endian):
        # one copy instead of widening every byte, shifting it into place and summing (1.3-1.5x faster on 2 CPU cores,
        # benchmarks/unpack_speed.py)
        word = torch.nn.functional.pad(grouped, (0, 1)).view(torch.int32)
    else:
        byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32, device=x.device)
        word = (grouped.to(torch.int32) << byte_shifts).sum(-1, keepdim=True, dtype=torch.int32)
    codes = word >> shifts
    codes &= (1 << bits) - 1
    return codes.reshape(n, p * 8 // bits)


@functools.lru_cache(maxsize=16)
def _byte_table(bits: int, device: str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``[256, 8 // bits]``: the codes each byte holds, the first in the lowest bits (int64 to index a table
    of levels, float32 as even levels); widths dividing 8."""
    byte = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
    return ((byte >> torch.arange(0, 8, bits)) & ((1 << bits) - 1)).to(device, dtype)


def code_values(packed: torch.Tensor, bits: int, levels: torch.Tensor | None = None) -> torch.Tensor:
    """What the codes of ``packed`` ``[..., P]`` mean, in steps above the zero point: ``[..., P * 8 // bits]``
    float32 (the code itself, or ``levels[code]``).

    1- and 2-bit codes are read a byte at a time from a 256-row table of the values the byte's codes
    stand for, instead of shifting every code out and then converting or looking it up: uneven 2-bit
    levels cost one gather per byte instead of one per code. Inside decode steps (2,048 tokens, blocks of
    512, 2 CPU cores; ``benchmarks/lookup_decode.py``, ``benchmarks/results/keys-cpu/lookup-decode-*.md``)
    a block's uneven 2-bit codes took 0.076 ms instead of 0.211 (a step 0.108 s instead of 0.141); even
    2-bit codes 0.113 ms instead of 0.116. Wider codes are shifted apart as before: a 4096-row table for
    3-bit words (two 12-bit halves of 4 codes) won 1.1-1.5x on one hot tensor
    (``benchmarks/lookup_probe.py``) but lost inside decode steps (0.256 -> 0.288 ms a block, one run), and 4-bit
    codes gain nothing.
    """
    if bits > 2:
        if levels is None and 8 % bits:  # int32 codes straight to float, not through uint8
            width = packed.shape[-1] * 8 // bits
            return _by_rows(lambda x: _word_codes(x, bits).float(), packed, width, torch.float32)
        codes = unpack(packed, bits)
        return codes.float() if levels is None else torch.take(levels.to(codes.device), codes.long())
    device = str(packed.device)
    table = (_byte_table(bits, device, torch.float32) if levels is None
             else levels.to(packed.device)[_byte_table(bits, device)])
    # int32 indices: a quarter of the transient of int64 ones
    return torch.nn.functional.embedding(packed.int(), table).flatten(-2)


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
        fp16 or fp32 (:func:`scale_dtype`), or with :attr:`scale_bits` 8 their uint8 and int8 codes
        (:func:`encode_scales`). Readers take them from :meth:`scales`.
    bits : int
        Code width.
    group_size : int
        ``G``.
    axis : str
        ``"tokens"`` or ``"channels"``: along which axis a group runs.
    rotation : torch.Tensor or None
        ``[D, D]`` float32 orthogonal matrix ``R`` the vectors were multiplied by before packing
        (``x R`` is what the codes hold; :meth:`dequantize` returns ``(x R) Rᵀ``). One matrix shared
        by every tensor of a scheme, regenerated from a seed: not part of :attr:`nbytes`.
    levels : torch.Tensor or None
        ``[2^bits]`` float32: code ``j`` restores ``zero + levels[j] * scale`` (ascending, ``levels[0]``
        0 and ``levels[-1]`` ``2^bits - 1``, so a group's minimum and maximum stay exact); None: the
        even levels ``0, 1, ..., 2^bits - 1``. A constant of the scheme, like ``rotation``: not part
        of :attr:`nbytes`.
    scale_bits : int or None
        None: :attr:`scale` and :attr:`zero` hold floats; 8: 8-bit codes of them (:func:`encode_scales`).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    rotation: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    scale_bits: int | None = None

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

    @property
    def code_bytes(self) -> int:
        """Bytes of the packed codes alone."""
        return self.data.numel() * self.data.element_size()

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.scale, self.zero))

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zero points as floats, shaped like :attr:`scale` (stored ones, or decoded from 8 bits)."""
        return (self.scale, self.zero) if self.scale_bits is None else decode_scales(self.scale, self.zero)

    def dequantize(self, dtype: torch.dtype, *, unrotate: bool = True) -> torch.Tensor:
        """The ``[..., N, D]`` approximation in ``dtype`` (computed in float32). ``unrotate=False``:
        leave rotated data in the rotated frame (``x R``), for readers that rotate the query instead."""
        codes = code_values(self.data, self.bits, self.levels)
        *lead, n, d = codes.shape
        g = self.group_size
        scale, zero = self.scales()
        # code_values returns a tensor of its own: scaled and shifted in place (the same bits as out of place, and
        # no second and third block-sized temporary to allocate on every read)
        if self.axis == "tokens":
            grouped = codes.reshape(*lead, n // g, g, d)
            out = grouped.mul_(scale.float().unsqueeze(-2)).add_(zero.float().unsqueeze(-2))
        else:
            grouped = codes.reshape(*lead, n, d // g, g)
            out = grouped.mul_(scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1))
        out = out.reshape(*lead, n, d)
        if self.rotation is not None and unrotate:
            if _half_products(dtype, out.device):
                # rotated back in the half dtype asked for (float32 accumulation): the result is rounded to it
                # anyway, and the product takes a third of the time on CPUs with bf16 instructions
                # (the rotated scheme's matrix, ±1/√D, is exact in bf16 for power-of-two D; converted once)
                return out.to(dtype) @ held_copy(self.rotation, out.device, dtype).T
            out = out @ self.rotation.to(out.device).T
        return out.to(dtype)

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
        return dataclasses.replace(self, data=self.data[..., start:end, :], scale=self.scale[..., rows, :],
                                   zero=self.zero[..., rows, :])

    def clone(self) -> QuantizedTensor:
        """A copy that owns its storage (a slice's views otherwise keep the whole tensor alive)."""
        return self._map(torch.clone)

    def _map(self, fn) -> QuantizedTensor:
        return dataclasses.replace(self, data=fn(self.data), scale=fn(self.scale), zero=fn(self.zero))

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select along a leading dimension (batch, or the rows of a sparse list)."""
        index = index.to(self.data.device)
        return self._map(lambda t: t.index_select(dim, index))

    def to(self, device) -> QuantizedTensor:
        moved = self._map(lambda t: t.to(device, non_blocking=True))
        return dataclasses.replace(moved, rotation=None if self.rotation is None else self.rotation.to(device),
                                   levels=None if self.levels is None else self.levels.to(device))

    def pick(self, index: int) -> QuantizedTensor:
        """Entry ``index`` of the first dimension (views): e.g. keys (0) or values (1) of :meth:`stack`'s result."""
        return self._map(lambda t: t[index])

    @staticmethod
    def stack(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Tensors quantized alike (same width, groups, rotation, levels) along a new first dimension (a copy)."""
        first = tensors[0]
        return dataclasses.replace(first, **{name: torch.stack([getattr(t, name) for t in tensors])
                                             for name in ("data", "scale", "zero")})

    def cat(self, other: QuantizedTensor, dim: int = -2) -> QuantizedTensor:
        """Concatenate along tokens (``dim=-2``) or a leading dimension; both keep their own codes."""
        if ((other.bits, other.group_size, other.axis, other.scale_bits)
                != (self.bits, self.group_size, self.axis, self.scale_bits)
                or not _same_constant(other.rotation, self.rotation) or not _same_constant(other.levels, self.levels)):
            raise ValueError("cannot concatenate tensors quantized differently")
        return dataclasses.replace(self, data=torch.cat([self.data, other.data], dim),
                                   scale=torch.cat([self.scale, other.scale], dim),
                                   zero=torch.cat([self.zero, other.zero], dim))


def _half_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matrix products in ``dtype`` are native and fast on ``device``: half dtypes on CUDA, bf16 on CPUs
    whose oneDNN has bf16 kernels (elsewhere torch would emulate them, slower than float32)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and dtype == torch.bfloat16 and _cpu_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _same_constant(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two schemes' constants (rotation, levels) are the same: both None, or equal tensors."""
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b.to(a.device)))


def checked_levels(values, bits: int) -> torch.Tensor:
    """``values`` as a float32 table of :attr:`QuantizedTensor.levels` for ``bits``-bit codes, or ValueError:
    ``2^bits`` finite ascending values from 0 to ``2^bits - 1`` (the ends keep a group's min and max exact)."""
    levels = torch.as_tensor(values, dtype=torch.float32)
    top = (1 << bits) - 1
    if (levels.shape != (top + 1,) or not bool(torch.isfinite(levels).all()) or levels[0].item() != 0
            or levels[-1].item() != top or not bool((levels[1:] > levels[:-1]).all())):
        raise ValueError(f"levels must be {top + 1} ascending finite values from 0 to {top} for {bits}-bit codes, "
                         f"got {levels.tolist()}")
    return levels


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: str,
             rotation: torch.Tensor | None = None, clip_ratios: tuple[float, ...] = (),
             levels: torch.Tensor | None = None, scale_bits: int | None = None,
             weights: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``x`` ``[..., N, D]`` group-wise (see :class:`QuantizedTensor` for the layout).

    ``axis="tokens"`` needs ``N % group_size == 0``; ``axis="channels"`` needs
    ``D % group_size == 0``. ``rotation`` (``[D, D]`` orthogonal, float32): quantize ``x R`` instead,
    and remember ``R`` for :meth:`QuantizedTensor.dequantize`. ``clip_ratios``: also try each group's
    range shrunk about its midpoint by these factors (< 1), and keep, per group, the range with the
    least squared error (values clipped at its ends); the layout is the same. ``levels``
    (:attr:`QuantizedTensor.levels`): round each value to the nearest of these instead of the even levels.
    ``scale_bits`` (:attr:`QuantizedTensor.scale_bits`): 8 stores scales and zero points as 8-bit codes.
    ``weights`` ``[H, D]`` (``x`` ``[..., H, N, D]``), non-negative: what an error in each channel of each
    head costs (in ``x``'s frame, before ``rotation``); the channels of every vector are then rounded one at
    a time, each one's error pushed onto those not yet rounded (:func:`feedback_factor`), which minimises
    ``Σ_c weights_c · error_c²`` instead of the squared error, with the same levels, scales and zero points:
    only the codes differ (even levels only, no ``clip_ratios``).
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    if scale_bits is not None and scale_bits not in SCALE_BITS:
        raise ValueError(f"scale_bits must be None or one of {SCALE_BITS}, got {scale_bits}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if weights is not None and (levels is not None or clip_ratios):
        raise ValueError("weighted rounding takes even levels and min-max ranges (no levels, no clip_ratios)")
    if weights is not None and (x.dim() < 3 or tuple(weights.shape) != (x.shape[-3], x.shape[-1])):
        raise ValueError(f"weights {tuple(weights.shape)} do not fit x {tuple(x.shape)}: [H, D] for x [..., H, N, D]")
    levels_count = 1 << bits
    if levels is not None and levels.shape != (levels_count,):  # the values: checked_levels, once per scheme
        raise ValueError(f"{bits}-bit codes need {levels_count} levels, got shape {tuple(levels.shape)}")
    *lead, n, d = x.shape
    g = group_size
    x32 = x.float()
    if rotation is not None:
        x32 = x32 @ rotation.to(x32.device)
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
    top = levels_count - 1
    sdtype = scale_dtype(x.dtype)
    # code j restores zero + value_of[j] * scale; the nearest level is found between their midpoints
    value_of = None if levels is None else levels.to(x32.device, torch.float32)
    edges = None if value_of is None else (value_of[1:] + value_of[:-1]) / 2
    limit = torch.finfo(sdtype).max
    lo = grouped.amin(reduce_dim).clamp(-limit, limit)
    hi = grouped.amax(reduce_dim).clamp(-limit, limit)

    def codes_for(lo: torch.Tensor, hi: torch.Tensor):
        if scale_bits is None:
            zero = lo.to(sdtype)
            scale = ((hi - zero.float()) / top).clamp(0, limit).to(sdtype)
            s, z = scale, zero
        else:
            scale, zero = encode_scales(lo, hi, top)
            s, z = decode_scales(scale, zero)
        # Codes from the stored (rounded) scale and zero point: what dequantization will use.
        s, z = s.float().unsqueeze(reduce_dim), z.float().unsqueeze(reduce_dim)
        steps = torch.where(s > 0, (grouped - z) / torch.where(s > 0, s, 1.0), 0.0)
        codes = steps.round_().clamp_(0, top) if edges is None else torch.bucketize(steps, edges).float()
        return codes, scale, zero

    def squared_error(codes, scale, zero):
        s, z = (scale, zero) if scale_bits is None else decode_scales(scale, zero)
        s, z = s.float().unsqueeze(reduce_dim), z.float().unsqueeze(reduce_dim)
        restored = codes if value_of is None else value_of[codes.long()]
        return ((restored * s + z - grouped) ** 2).sum(reduce_dim)

    codes, scale, zero = codes_for(lo, hi)
    if clip_ratios:  # the error is only needed to choose among ranges: plain packing skips it
        error = squared_error(codes, scale, zero)
        mid = (lo + hi) / 2
        for ratio in clip_ratios:
            c, sc, zo = codes_for(mid - ratio * (mid - lo), mid + ratio * (hi - mid))
            err = squared_error(c, sc, zo)
            better = err < error
            codes = torch.where(better.unsqueeze(reduce_dim), c, codes)
            scale, zero, error = (torch.where(better, sc, scale), torch.where(better, zo, zero),
                                  torch.minimum(err, error))
    codes = codes.reshape(*lead, n, d)
    if weights is not None:
        s, z = (scale, zero) if scale_bits is None else decode_scales(scale, zero)
        s, z = (_per_value(t.float(), axis, g, n, d) for t in (s, z))
        codes = _feedback_codes(x32, s, z, top, feedback_factor(weights, rotation))
    return QuantizedTensor(pack(codes.to(torch.uint8), bits), scale, zero, bits, g, axis, rotation, levels,
                           scale_bits)


#: Added to a rounding form's diagonal, as a share of its mean, before it is inverted (GPTQ's damping).
FEEDBACK_DAMPING = 0.01


def feedback_factor(weights: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, D, D]`` float32: the upper Cholesky factor ``U`` of ``(Rᵀ diag(w) R + λ I)⁻¹`` per head (GPTQ's
    and LDLQ's, arXiv 2210.17323 / 2307.13304), for channel weights ``weights`` ``[H, D]`` and the frame
    ``rotation`` (None: the identity) the codes are in; ``λ`` is :data:`FEEDBACK_DAMPING` of the mean weight.
    Even weights give a diagonal ``U``: no feedback, nearest rounding."""
    w = weights.double()
    form = torch.diag_embed(w)
    if rotation is not None:
        r = rotation.to(w.device, torch.float64)
        form = r.T @ form @ r
    damping = FEEDBACK_DAMPING * w.mean(-1).clamp_min(torch.finfo(torch.float32).tiny)
    form = form + damping[:, None, None] * torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(form))
    return torch.linalg.cholesky(inverse, upper=True).float()


def _per_value(t: torch.Tensor, axis: str, g: int, n: int, d: int) -> torch.Tensor:
    """A group's scale or zero point ``[..., groups]`` repeated for every value of the group: ``[..., N, D]``."""
    if axis == "tokens":  # [..., N // g, D]
        return t.unsqueeze(-2).expand(*t.shape[:-2], n // g, g, d).reshape(*t.shape[:-2], n, d)
    return t.unsqueeze(-1).expand(*t.shape[:-1], d // g, g).reshape(*t.shape[:-1], d)  # [..., N, D // g]


def _feedback_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int, factor: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., H, N, D]`` of ``x`` on levels ``z + c · s`` (``s``, ``z`` per value), channel by channel:
    channel ``j``'s rounding error, divided by ``U[j, j]``, is taken off the later channels in proportion to
    ``U[j, j+1:]`` (``factor`` ``[H, D, D]``)."""
    work = x.clone()
    codes = torch.empty_like(x)
    diagonal = factor.diagonal(dim1=-2, dim2=-1)[:, None]  # [H, 1, D]: over the tokens
    for j in range(x.shape[-1]):
        step = s[..., j]
        c = torch.where(step > 0, (work[..., j] - z[..., j]) / torch.where(step > 0, step, 1.0), 0.0)
        c = c.round_().clamp_(0, top)
        codes[..., j] = c
        error = (work[..., j] - (c * step + z[..., j])) / diagonal[..., j]
        work[..., j + 1:] -= error.unsqueeze(-1) * factor[:, None, j, j + 1:]
    return codes


def append(old: QuantizedTensor | None, new: QuantizedTensor, dim: int = -2) -> QuantizedTensor:
    """``old`` followed by ``new`` (``new`` alone when ``old`` is None)."""
    return new if old is None else old.cat(new, dim)
