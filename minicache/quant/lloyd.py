"""Rotated KIVI whose 2-bit codes have unevenly spaced levels (``rotated-lloyd``): the same bytes,
rounded more finely where the values are.

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

**In the runtime it pays at 2 bits only** (``bash benchmarks/key_storage_results.sh lloyd``, 16
windows of 4,096 + 1,024 tokens of unseen text, bfloat16, 4 exact sinks; uneven levels at every width):

========================  ===================  =====================
storage                   even (``rotated``)   uneven
========================  ===================  =====================
2 bits                    +20.26 %, KL 0.178   **+14.40 %, KL 0.125**
3 bits                    +1.56 %, KL 0.0174   +1.77 %, KL 0.0163
3 bits, key groups of 64  +1.23 %, KL 0.0140   +1.53 %, KL 0.0135
the same, keys pre-RoPE   +1.03 %, KL 0.0126   +1.51 %, KL 0.0136
========================  ===================  =====================

At 3 bits the KL barely moves and the perplexity gets worse. So only 2-bit codes use a table here
(:data:`LEVELS`); 3- and 4-bit codes are ``rotated``'s even levels, bit for bit. The fitted 3- and
4-bit tables are kept in :data:`FITTED` for the record. ``--kv-bits auto`` with this scheme can
then choose 2 bits where ``rotated``'s 2 bits cost too much.

Readers: the blockwise torch path (:meth:`~minicache.quant.packed.QuantizedTensor.dequantize` looks each
packed byte up in a table of its four levels, :func:`~minicache.quant.packed.code_values`: a decode step
with 2-bit uneven levels reads its codes no slower than one with even levels), and the Triton decode
kernel for unmerged layers, which loads ``levels[code]`` where even levels use the code itself
(``kernel_layout`` ``uniform_groups``: KIVI's layout plus the table).
"""

from __future__ import annotations

import functools

import torch

from minicache.quant.packed import checked_levels
from minicache.quant.rotated import RotatedQuantizer

__all__ = ["FITTED", "LEVELS", "RotatedLloydQuantizer", "levels_table"]

#: The fitted tables: code values in steps above the group's minimum (ends fixed at 0 and 2^bits - 1).
FITTED: dict[int, tuple[float, ...]] = {
    2: (0.0, 1.10, 1.90, 3.0),
    3: (0.0, 1.35, 2.29, 3.11, 3.89, 4.71, 5.65, 7.0),
    4: (0.0, 1.52, 2.70, 3.71, 4.63, 5.48, 6.30, 7.10, 7.90, 8.70, 9.52, 10.37, 11.29, 12.30, 13.48, 15.0),
}
#: The tables this scheme packs with (widths not listed use even levels: they measured better).
LEVELS: dict[int, tuple[float, ...]] = {2: FITTED[2]}


def levels_table(bits: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The ``[2^bits]`` float32 table of ``bits``-bit codes (one tensor per width and device), or None
    where this scheme packs even levels."""
    return _table(bits, str(torch.device(device))) if bits in LEVELS else None


@functools.lru_cache(maxsize=16)
def _table(bits: int, device: str) -> torch.Tensor:
    return checked_levels(LEVELS[bits], bits).to(device)


class RotatedLloydQuantizer(RotatedQuantizer):
    """:class:`RotatedQuantizer`'s groups, widths and rotation; widths in :data:`LEVELS` (2 bits) rounded to
    its table, every role."""

    name = "rotated-lloyd"
    bits = (2, 3, 4)
    kernel_layout = "uniform_groups"  # the kernel reads the table too (QuantizedTensor.levels)
    weighted_rounding = False  # feedback rounds to even levels only

    def levels_for(self, bits: int, x: torch.Tensor) -> torch.Tensor | None:
        return levels_table(bits, x.device)
