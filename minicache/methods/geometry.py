"""Vector geometry shared by merge methods and kernels: norms, directions, angles, per-head rotations."""

from __future__ import annotations

import torch

__all__ = ["NORM_EPS", "SIN_EPS", "angle_between", "rotate", "rotate_back", "unit_and_norm"]

#: Norms below this count as zero vectors (their direction is the zero vector, never NaN).
NORM_EPS = 1e-12
#: Below this sin Ω, SLERP's weights are 0/0: interpolate linearly and renormalise instead.
SIN_EPS = 1e-4


def unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``[..., D]``) into float32 unit directions ``[..., D]`` and norms ``[...]``.

    Zero vectors get a zero direction, so nothing downstream divides 0 by 0.
    """
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    unit = x / norm.clamp_min(NORM_EPS).unsqueeze(-1)
    return unit, norm


def angle_between(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Angle Ω in ``[0, π]`` between unit vectors ``[..., D]`` → ``[...]``.

    Uses ``2·atan2(‖u_a − u_b‖, ‖u_a + u_b‖)``, which stays accurate near 0 and π where
    ``arccos`` of a clamped cosine loses half the digits.
    """
    diff = torch.linalg.vector_norm(u_a - u_b, dim=-1)
    summ = torch.linalg.vector_norm(u_a + u_b, dim=-1)
    return 2.0 * torch.atan2(diff, summ)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x R`` per KV head, in float32: ``x`` ``[B, H, N, D]``, ``rotation`` ``[H, D, D]``."""
    return torch.einsum("bhnd,hde->bhne", x.float(), rotation.to(device=x.device, dtype=torch.float32))


def rotate_back(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x Rᵀ`` per KV head (the inverse of :func:`rotate` for orthogonal ``R``), in float32."""
    return torch.einsum("bhne,hde->bhnd", x.float(), rotation.to(device=x.device, dtype=torch.float32))
