"""Rotated KIVI: a fixed randomized Hadamard rotation of every head vector before packing.

A few channels of keys (and, less, of values) carry most of the range; uniform low-bit groups spend
their levels on them. Multiplying each head vector by an orthogonal ``R = H · diag(s) / √D`` (``H``
the Sylvester Hadamard matrix, ``s`` random signs from a fixed seed) spreads every channel's energy
over all of them, so per-token groups see near-Gaussian vectors (QuaRot, arXiv 2404.00456; QuIP#).
Dequantization multiplies by ``Rᵀ``: attention sees the same vectors up to rounding.

``R`` depends only on ``head_dim`` and the seed, so nothing is stored: each tensor keeps a reference
to the one matrix (:attr:`~minicache.quant.packed.QuantizedTensor.rotation`). Head sizes that are
not a power of two get a seeded random orthogonal matrix (QR of a Gaussian) instead.

Groups are KIVI's (keys per channel over ``group_size`` tokens, values and retained vectors per
token): rotated keys still carry a per-channel offset (RoPE keeps it), and per-channel groups keep
absorbing it. Measured on SmolLM2 (bf16, 4,096-token prefix, 2 windows, KL to the full cache):
keys per channel after the rotation 0.030 at 3 bits and 0.27 at 2 bits (KIVI 0.036 and 0.37; the
rotation with keys per token 0.034 and 0.50); rotated values at 2 bits under 4-bit keys 0.020
(KIVI 0.044). Both decode paths (Triton kernel, blockwise torch) read a rotated packing in its frame (query
rotated once per step): an unmerged layer's as it is, a merged group's after its short dense tail is
rotated in (:func:`minicache.runtime.kernels.support.in_packing_frame`).
"""

from __future__ import annotations

import functools

import torch

from minicache.quant.kivi import KiviQuantizer

__all__ = ["ROTATION_SEED", "RotatedQuantizer", "rotation_matrix"]

#: Seed of the random signs (and of the fallback orthogonal matrix): part of the format.
ROTATION_SEED = 20240402


@functools.lru_cache(maxsize=16)
def _rotation_cpu(head_dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ROTATION_SEED + head_dim)
    if head_dim & (head_dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < head_dim:  # Sylvester: H_2n = [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (head_dim,), generator=generator).float() * 2 - 1
        return (h * signs) / head_dim**0.5
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: a unique Q for the seed


def rotation_matrix(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[head_dim, head_dim]`` float32 orthogonal rotation of the ``rotated`` scheme."""
    return _rotation_on(head_dim, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _rotation_on(head_dim: int, device: str) -> torch.Tensor:
    return _rotation_cpu(head_dim).to(device)


class RotatedQuantizer(KiviQuantizer):
    """KIVI's groups and widths (:meth:`check` too), every head vector rotated first."""

    name = "rotated"
    bits = (2, 3, 4)
    # The codes are KIVI's, in the rotated frame: the kernel reads them with the query rotated once
    # (a merged group's dense tail is rotated into that frame first: in_packing_frame).
    kernel_layout = "uniform_groups"
    # The rotation couples the channels' errors, so rounding them in turn can steer the error
    # (profiles' key_rounding: queries, minicache.quant.packed.feedback_factor).
    weighted_rounding = True

    def rotation_for(self, x: torch.Tensor) -> torch.Tensor:
        return rotation_matrix(x.shape[-1], x.device)
