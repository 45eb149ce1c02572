"""KIVI (arXiv 2402.02750): keys per channel, values per token, asymmetric uniform groups.

Keys have outlier *channels*, so every channel of ``group_size`` consecutive tokens shares a scale
and a zero point (``axis="tokens"``; a key chunk is a whole group of tokens); values are quantized per
token in groups of ``min(group_size, head_dim)`` channels (``axis="channels"``), and so are sparse
lists of vectors. Scales and zero points are fp16 for half-precision caches (fp32 for fp32 ones), or
8-bit codes (``scale_bits=8``, :func:`~minicache.quant.packed.encode_scales`).
At ``head_dim`` 64, 4 bits, bf16 and a 4,096-token context, KIVI alone compresses the cache 3.4x
with groups of 128 and 3.0x with 32.
"""

from __future__ import annotations

import torch

from minicache.quant.base import Quantizer
from minicache.quant.packed import SCALE_BITS, QuantizedTensor, quantize

__all__ = ["KiviQuantizer"]


class KiviQuantizer(Quantizer):
    name = "kivi"
    bits = (2, 3, 4)
    scale_widths = SCALE_BITS
    kernel_layout = "uniform_groups"

    def quantize(self, x: torch.Tensor, role: str, bits: int, group_size: int,
                 scale_bits: int | None = None, *, weights: torch.Tensor | None = None) -> QuantizedTensor:
        if weights is not None and not self.weighted_rounding:
            raise ValueError(f"scheme {self.name!r} does not round by weights")
        rotation, levels = self.rotation_for(x), self.levels_for(bits, x)
        if role == "keys":
            return quantize(x, bits, group_size, "tokens", rotation, levels=levels, scale_bits=scale_bits,
                            weights=weights)
        return quantize(x, bits, self.value_group(group_size, x.shape[-1]), "channels", rotation, levels=levels,
                        scale_bits=scale_bits, weights=weights)

    def rotation_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Orthogonal ``[D, D]`` matrix applied before packing (None: none; subclasses rotate)."""
        return None

    def levels_for(self, bits: int, x: torch.Tensor) -> torch.Tensor | None:
        """Table of ``bits``-bit code levels (:attr:`QuantizedTensor.levels`; None: even levels)."""
        return None

    def chunk_tokens(self, role: str, group_size: int) -> int:
        return group_size if role == "keys" else 1

    @staticmethod
    def value_group(group_size: int, head_dim: int) -> int:
        """Channels per value (and vector) group: ``group_size`` capped at ``head_dim``."""
        return min(group_size, head_dim)

    def check(self, bits: int, group_size: int, head_dim: int) -> tuple[str, str] | None:
        group = self.value_group(group_size, head_dim)
        if head_dim % group:
            return "group_size", (
                f"{group_size} does not divide head_dim {head_dim} into whole value groups; "
                f"allowed: a divisor of {head_dim}, or a multiple of it"
            )
        if (head_dim * bits) % 8:
            return "bits", (
                f"{bits} bits do not pack head_dim {head_dim} into whole bytes; "
                "allowed: a width whose packed head vector fills whole bytes"
            )
        return None
