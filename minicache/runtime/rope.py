"""A model's rotary position embedding, to take positions out of keys before packing and put them back.

Keys reach the cache after RoPE: every channel pair is turned by an angle that grows with the
position, fast for the high-frequency pairs. Per-channel key groups (KIVI's) then see each such
channel swing over ``±`` its pair's norm, and spend their levels on the swing. Before RoPE, a
channel keeps its own offset and range from token to token, which is what per-channel groups are
for (KVQuant, arXiv 2401.18079, quantizes keys pre-RoPE for this reason). Measured on SmolLM2
(2 × 1,024 tokens of licences, every layer, relative error of the attention output from 3-bit keys):
0.209 post-RoPE, 0.174 pre-RoPE; with 4 exact sinks 0.177 and 0.147.

The cache only sees post-RoPE keys, so a layer that packs pre-RoPE keys removes the rotation at the
tokens' cache indices and puts it back on restore. The index need not be the model's position: a
constant offset between the two (left padding) turns every token of a row by the same angle, which
per-channel groups absorb, and restoring uses the same indices, so the round trip is exact up to
the packing's rounding.

Only rotations that depend on the position alone can be undone later: RoPE types whose angles change
with the sequence length (``dynamic``, ``longrope``) are refused.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field

import torch

from minicache.model_spec import ModelSpec

__all__ = ["RopeAngles"]

#: RoPE types whose angles depend on the position alone.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: Positions per table of cos and sin. Tables are always computed for the same ranges of positions
#: (``k · TABLE_CHUNK`` onwards), so a position's angles have the same bits whatever range a reader asks for.
TABLE_CHUNK = 1024
#: Tables kept, least recently used dropped (``TABLE_CHUNK`` positions each; 512 KiB for 64 rotary channels).
#: Like the rotated scheme's matrix they are constants of the model, shared by every cache, not part of its bytes.
TABLES_HELD = 64


@functools.lru_cache(maxsize=TABLES_HELD)
def _table(freqs: tuple[float, ...], scaling: float, index: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Table ``index`` of a RoPE: ``cos`` and signed ``sin`` ``[TABLE_CHUNK, R]`` float32 of positions
    ``index · TABLE_CHUNK ..`` (``x · cos + rotate_half(x) · sin`` is RoPE, with ``rotate_half(x) = [x₂, x₁]``:
    ``sin``'s first half is negated)."""
    positions = torch.arange(index * TABLE_CHUNK, (index + 1) * TABLE_CHUNK, device=device, dtype=torch.float32)
    angles = positions[:, None] * torch.tensor(freqs, dtype=torch.float32, device=device)[None, :]
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


#: Runs of up to this many tables are kept joined (aligned powers of two: the blockwise path's blocks of 2,048 tokens
#: start at multiples of 2,048), so that a block's rows are a slice, not a copy of its rows made on every read:
#: decode reads every layer's pre-RoPE prefix on every step, and that copy took two thirds of putting RoPE back
#: (SmolLM2, 1,920 packed tokens of a layer, 2 CPU cores: 0.44 -> 0.15 ms). Longer ranges are copied per read.
SPAN_HELD = 4
#: Joined runs kept (4 MiB each at most for 128 rotary channels), least recently used dropped.
SPANS_HELD = 16


@functools.lru_cache(maxsize=SPANS_HELD)
def _span(freqs: tuple[float, ...], scaling: float, first: int, count: int, device: str) -> tuple[torch.Tensor, ...]:
    """Tables ``first .. first + count − 1`` of :func:`_table` as one ``cos`` and one signed ``sin`` (the same bits)."""
    chunks = [_table(freqs, scaling, k, device) for k in range(first, first + count)]
    return chunks[0] if count == 1 else tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))


def _covering(low: int, high: int) -> tuple[int, int]:
    """``(first, count)``: the aligned power-of-two run of tables that holds tables ``low .. high``."""
    count = 1
    while low // count != high // count:
        count *= 2
    return low // count * count, count


@dataclass(frozen=True)
class RopeAngles:
    """One model's RoPE (the rotate-half layout of Llama, Mistral, Qwen2, Phi-3, Gemma).

    Attributes
    ----------
    inv_freq : torch.Tensor
        ``[R / 2]`` float32 angular frequencies; ``R`` (``2 · len(inv_freq)``) leading channels of
        each head vector are rotated, the rest pass through (partial rotary).
    scaling : float
        The factor the model multiplies ``cos`` and ``sin`` by (``attention_scaling``; 1 for plain RoPE).
    """

    inv_freq: torch.Tensor
    scaling: float = 1.0
    # inv_freq as plain numbers: the key of the tables of cos and sin (_table). Decode reads every block of a
    # pre-RoPE prefix on every step: the angles are computed once, not per read.
    _freqs: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.inv_freq.dim() != 1 or not len(self.inv_freq) or not torch.isfinite(self.inv_freq).all():
            raise ValueError(f"inv_freq must be a non-empty finite vector, got shape {tuple(self.inv_freq.shape)}")
        if not self.scaling > 0:
            raise ValueError(f"scaling must be positive, got {self.scaling}")
        object.__setattr__(self, "_freqs", tuple(self.inv_freq.tolist()))

    @classmethod
    def of_model(cls, config_or_model) -> RopeAngles:
        """The rotary embedding a model applies to its keys (from its module, or built from its config).

        Raises
        ------
        ValueError
            The model has no rotary embedding minicache can find, several different ones (per-layer
            RoPE), or one whose angles depend on the sequence length.
        """
        if isinstance(config_or_model, torch.nn.Module):
            found = {id(m): m for m in config_or_model.modules() if type(m).__name__.endswith("RotaryEmbedding")}
            modules = list(found.values())
            if not modules:
                raise ValueError(f"{type(config_or_model).__name__} has no rotary embedding module: its keys "
                                 "carry no RoPE to remove (do not ask for pre-RoPE keys)")
        spec = ModelSpec.from_config(config_or_model)
        if not isinstance(config_or_model, torch.nn.Module):
            modules = [_build_from_config(spec.model_type, config_or_model)]
        angles = {(tuple(m.inv_freq.tolist()), float(getattr(m, "attention_scaling", 1.0)),
                   getattr(m, "rope_type", "default")) for m in modules}
        if len(angles) > 1:
            raise ValueError("the model rotates keys with several different RoPEs (per layer type); pre-RoPE "
                             "keys support one RoPE per model")
        freqs, scaling, rope_type = angles.pop()
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} changes its angles with the sequence length; pre-RoPE keys "
                             f"support {', '.join(STATIC_ROPE_TYPES)}")
        head_dim = min(layer.head_dim for layer in spec.layers)
        if 2 * len(freqs) > head_dim:
            raise ValueError(f"{2 * len(freqs)} rotary channels do not fit head_dim {head_dim}")
        return cls(torch.tensor(freqs, dtype=torch.float32), scaling)

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def cos_sin(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` ``[length, R / 2]`` float32 of indices ``start .. start + length − 1`` (scaled):
        one per channel pair (the model's tables repeat them for both halves)."""
        cos, sin = self._rows(start, length, device)
        half = len(self.inv_freq)
        return cos[:, :half], sin[:, half:]

    def _rows(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and signed ``sin`` ``[length, R]`` of indices ``start ..`` (rows of :func:`_table`)."""
        low, high = start // TABLE_CHUNK, (start + max(length, 1) - 1) // TABLE_CHUNK
        first, count = _covering(low, high)
        if count <= SPAN_HELD:
            cos, sin = _span(self._freqs, self.scaling, first, count, str(torch.device(device)))
        else:  # a long range: its own tables joined for this read only (not kept)
            first, count = low, high - low + 1
            cos, sin = _span.__wrapped__(self._freqs, self.scaling, first, count, str(torch.device(device)))
        offset = start - first * TABLE_CHUNK
        return cos[offset : offset + length], sin[offset : offset + length]

    def _turn(self, x: torch.Tensor, start: int, sign: float) -> torch.Tensor:
        """``x`` turned by ``sign ×`` the angles at indices ``start ..`` (rotate-half pairs), float32."""
        cos, sin = self._rows(start, x.shape[-2], x.device)
        if sign < 0:
            sin = -sin  # on the [N, R] table, not on every head's keys
        x = x.float()
        half, r = len(self.inv_freq), self.rotary_dim
        turned = x[..., :r]
        # x₁ cos − x₂ sin and x₂ cos + x₁ sin as one product per half: the same bits, a third of the operations
        out = turned * cos + torch.cat([turned[..., half:], turned[..., :half]], -1) * sin
        if r < x.shape[-1]:  # partial rotary: the rest passes through
            out = torch.cat([out, x[..., r:]], -1)
        return out

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE of ``x`` ``[..., N, D]`` at indices ``start ..``, float32 (what the model does)."""
        return self._turn(x, start, 1.0)

    def remove(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The inverse of :meth:`apply`: ``x`` ``[..., N, D]`` before RoPE, float32."""
        out = self._turn(x, start, -1.0)
        r = self.rotary_dim
        out[..., :r] /= self.scaling**2
        return out


def _build_from_config(model_type: str, config) -> torch.nn.Module:
    """The model family's own rotary module, built from its config (as the model builds it)."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as err:
        raise ValueError(f"cannot find the rotary embedding of model type {model_type!r}: pass the model, "
                         "not its config") from err
    classes = [getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding")]
    if len(classes) != 1:
        raise ValueError(f"model type {model_type!r} has {len(classes)} rotary embedding classes; pass the model, "
                         "not its config")
    return classes[0](config)
