"""Rotated KIVI with unevenly spaced levels (``rotated-lloyd``): the same bytes, rounded more finely
where the values are.

After the Hadamard rotation of :mod:`minicache.quant.rotated`, the values of a group are
near-Gaussian: most sit in the middle of the group's ``[min, max]`` range, few near its ends. Even
levels spend as much resolution on the sparse ends as on the crowded middle. This scheme keeps the
packing (codes, fp16 scale and zero point per group) and only changes what a code means: code ``j``
restores ``zero + LEVELS[bits][j] * scale`` (:attr:`~minicache.quant.packed.QuantizedTensor.levels`).

The tables were fitted by Lloyd's algorithm (each value weighted by its group's squared range, so
they minimise the values' squared error) on SmolLM2's rotated keys and values (4 x 1,024 tokens of the
built-in corpus and the shipped licences; keys in groups of 64 and 128 tokens, values per token),
**with the ends held at the group's minimum and maximum**, then averaged over those three fits and
made symmetric (the fits agreed to about 0.05 of a step). Rotated groups are near-Gaussian whatever
the model, so the tables are constants of the scheme, like the rotation's seed.

Why the ends are held (``benchmarks/levels_probe.py``, ``benchmarks/results/transform-cpu/``): free
Lloyd levels cut the squared error more (3-bit keys -21 %, 2-bit -44 %) but pull every group's
extremes inwards, which shrinks the spread of the attention logits; KL to the full cache *doubled*
at 3 bits (0.0060 -> 0.0112). With the ends held, the squared error drops less (3 bits -11 %, 2 bits
-7 to -9 %) and the KL follows it: 3 bits 0.0060 -> 0.0056, 2 bits 0.0650 -> 0.0535 (simulation,
1,024-token prefixes, 9 windows of 3 kinds of text).

Only the torch path reads this packing (``kernel_layout`` None): the Triton decode kernel reads even
levels; a table lookup there is future work.
"""

from __future__ import annotations

import functools

import torch

from minicache.quant.packed import QuantizedTensor, checked_levels, quantize
from minicache.quant.rotated import RotatedQuantizer

__all__ = ["LEVELS", "RotatedLloydQuantizer", "levels_table"]

#: Code values in steps above the group's minimum, per code width (ends fixed at 0 and 2^bits - 1).
LEVELS: dict[int, tuple[float, ...]] = {
    2: (0.0, 1.10, 1.90, 3.0),
    3: (0.0, 1.35, 2.29, 3.11, 3.89, 4.71, 5.65, 7.0),
    4: (0.0, 1.52, 2.70, 3.71, 4.63, 5.48, 6.30, 7.10, 7.90, 8.70, 9.52, 10.37, 11.29, 12.30, 13.48, 15.0),
}


def levels_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[2^bits]`` float32 table of ``bits``-bit codes (one tensor per width and device)."""
    return _table(bits, str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _table(bits: int, device: str) -> torch.Tensor:
    return checked_levels(LEVELS[bits], bits).to(device)


class RotatedLloydQuantizer(RotatedQuantizer):
    """:class:`RotatedQuantizer`'s groups, widths and rotation, every role rounded to :data:`LEVELS`."""

    name = "rotated-lloyd"
    bits = (2, 3, 4)
    kernel_layout = None  # the Triton kernel reads even levels only

    def quantize(self, x: torch.Tensor, role: str, bits: int, group_size: int) -> QuantizedTensor:
        rotation, levels = self.rotation_for(x), levels_table(bits, x.device)
        if role == "keys":
            return quantize(x, bits, group_size, "tokens", rotation, levels=levels)
        return quantize(x, bits, self.value_group(group_size, x.shape[-1]), "channels", rotation, levels=levels)
