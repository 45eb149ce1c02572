"""The quantizer protocol: how one role of the cache is packed into integers.

A quantizer turns ``[..., N, D]`` tensors of one *role* into a :class:`~minicache.quant.packed.QuantizedTensor`:

``"keys"``
    a merge method's key-like stored fields and an unmerged layer's keys (a sequence of tokens);
``"values"``
    value-like stored fields and an unmerged layer's values;
``"vectors"``
    sparse lists of exact vectors (retained tokens): rows with no token order, packed per row.

The cache owns the tensors (residual windows, growth, batch selection); a quantizer only says how a
chunk of tokens is packed and how many tokens a chunk must hold (a per-channel key group cannot be
packed until its ``group_size`` tokens exist). Register a new scheme with
:func:`minicache.quant.register_quantizer`; profiles name it in ``quantization.scheme``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from minicache.quant.packed import QuantizedTensor

__all__ = ["ROLES", "Quantizer"]

ROLES = ("keys", "values", "vectors")


class Quantizer(ABC):
    """One quantization scheme (stateless; one instance per scheme, from the registry).

    Attributes
    ----------
    name : str
        The scheme's name in profiles (``quantization.scheme``).
    bits : tuple of int
        Supported code widths.
    scale_widths : tuple of int
        Widths other than float at which it can store scales and zero points (``quantize(..., scale_bits=)``,
        profiles' ``quantization.scale_bits``); empty: floats only.
    weighted_rounding : bool
        Whether :meth:`quantize` takes ``weights`` (per-channel costs of the error, which it then rounds by:
        profiles' ``quantization.key_rounding``); only meaningful for schemes that rotate, since without a
        rotation every channel's error is its own.
    kernel_layout : str or None
        Packed layout that fused attention kernels may read directly (``"uniform_groups"``: uniform
        asymmetric groups, codes packed low bits first, as :func:`~minicache.quant.packed.quantize`
        writes them, possibly in a rotated frame, :attr:`QuantizedTensor.rotation`, and with a table of
        levels, :attr:`QuantizedTensor.levels`, in a layer's packed prefix); None when only the
        torch path (dequantize a block, then attend) can read it.
    """

    name: ClassVar[str]
    bits: ClassVar[tuple[int, ...]]
    scale_widths: ClassVar[tuple[int, ...]] = ()
    weighted_rounding: ClassVar[bool] = False
    kernel_layout: ClassVar[str | None] = None

    @abstractmethod
    def quantize(self, x: torch.Tensor, role: str, bits: int, group_size: int,
                 scale_bits: int | None = None, *, weights: torch.Tensor | None = None) -> QuantizedTensor:
        """Pack ``x`` ``[..., H, N, D]`` of ``role``; ``N`` is a multiple of :meth:`chunk_tokens`. ``scale_bits``:
        None stores scales and zero points as floats, 8 as 8-bit codes (:attr:`QuantizedTensor.scale_bits`).
        ``weights`` ``[H, D]`` (schemes with :attr:`weighted_rounding` only): what an error in each channel
        costs; the codes then minimise the weighted error (:func:`~minicache.quant.packed.quantize`)."""

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """The ``[..., N, D]`` approximation in ``dtype``."""
        return q.dequantize(dtype)

    @abstractmethod
    def chunk_tokens(self, role: str, group_size: int) -> int:
        """Tokens packed together: appends of ``role`` are held exact until a whole chunk exists."""

    def check(self, bits: int, group_size: int, head_dim: int) -> tuple[str, str] | None:
        """Why this scheme cannot pack vectors of ``head_dim`` this way: ``(field at fault, message)``
        (``field`` is ``"bits"`` or ``"group_size"``), or None."""
        return None
