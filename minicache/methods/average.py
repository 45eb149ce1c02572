"""Averaging: the paper's baseline merge (every member restored as the group's weighted mean vector).

The group keeps the weighted mean of its (aligned) vectors, ``x̄ = Σ w_i x_i R_i`` (a pair:
``(1-t)·x_a + t·x_b``, so ``t = 0.5`` is ``(x_a + x_b)/2``), and every member is restored as that
same vector, ``x̂_i = x̄ R_iᵀ``: no per-layer magnitudes. It is stored in SLERP's layout (unit
direction ``x̄/‖x̄‖`` and, per member, the magnitude ``‖x̄‖``), so restoring, retention, alignment and
the attention kernels are SLERP's; the retention distance is the same angle as SLERP's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minicache.methods.base import MergeMethod
from minicache.methods.geometry import unit_and_norm
from minicache.methods.slerp import (
    PairMerge,
    SlerpMethod,
    SlerpParams,
    aligned_units,
    check_group_inputs,
    max_pairwise_distance,
)

__all__ = ["AverageMethod", "AverageParams", "average_group"]


@dataclass(frozen=True)
class AverageParams(SlerpParams):
    """Parameters of averaging: a pair's weight ``t`` of the deeper layer (0.5 = the plain mean),
    ``weights`` of larger groups (default uniform), ``align`` (see :class:`SlerpParams`)."""

    def summary(self) -> str:
        return f"t {self.t:g}"


def average_group(
    xs: Sequence[torch.Tensor],
    t: float = 0.5,
    *,
    weights: Sequence[float] | None = None,
    rotations: torch.Tensor | None = None,
) -> PairMerge:
    """The weighted mean of ``k ≥ 2`` layers' (aligned) vectors in SLERP's stored layout, float32.

    Parameters
    ----------
    xs : sequence of torch.Tensor
        ``k`` tensors ``[B, H, N, D]``, shallowest first.
    t : float
        Weight of the deeper layer of a pair (``weights`` None).
    weights : sequence of float, optional
        ``k`` weights summing to 1; default ``(1 - t, t)`` for a pair, uniform for ``k > 2``.
    rotations : torch.Tensor, optional
        ``[k, H, D, D]`` orthogonal alignment of every member.

    Returns
    -------
    PairMerge
        Unit direction of ``x̄`` ``[B, H, N, D]``, ``‖x̄‖`` for every member ``[B, H, N, k]``, and the
        largest pairwise angle between aligned members / π ``[B, H, N]``.
    """
    check_group_inputs(xs, weights, rotations)
    k = len(xs)
    units, norms = aligned_units(xs, rotations)
    if weights is None:
        weights = (1.0 - t, t) if k == 2 else [1.0 / k] * k
    # Σ w_i x_i R_i, rebuilt from the aligned units (x R = m · u R): rotations are applied once.
    mean = sum(float(w) * m.unsqueeze(-1) * u for w, m, u in zip(weights, norms, units, strict=True))
    direction, norm = unit_and_norm(mean)
    magnitudes = norm.unsqueeze(-1).expand(*norm.shape, k).contiguous()
    return PairMerge(direction=direction, magnitudes=magnitudes, distance=max_pairwise_distance(units))


class AverageMethod(SlerpMethod):
    """The paper's averaging baseline, in SLERP's stored layout (see the module docstring)."""

    name = "average"
    Params = AverageParams

    def shared(self, params, xs, rotations) -> PairMerge:
        return average_group(xs, params.t, weights=params.weights, rotations=rotations)

    def fused_encode(self, params, members):
        return None  # the merge kernel implements SLERP only

    def restore_error(self, params, xs, tensors):
        # Every member is restored as x̄ (no own magnitude): SLERP's shortcut does not hold.
        return MergeMethod.restore_error(self, params, xs, tensors)
