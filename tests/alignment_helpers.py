"""Helpers for tests of aligned and k-layer groups: random rotations and profiles that use them."""

from __future__ import annotations

import torch

from minicache.methods.base import tensor_name
from minicache.profile import Defaults, MergeGroup, MergeProfile
from minicache.sidecar import ProfileTensors


def random_rotations(k: int, heads: int, dim: int, seed: int = 0, identity_last: bool = True) -> torch.Tensor:
    """``[k, H, D, D]`` float32 random orthogonal matrices (the last the identity, as calibration fits)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(k, heads, dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    if identity_last:
        q[-1] = torch.eye(dim, dtype=torch.float64)
    return q.float()


def aligned_profile(
    groups: tuple[tuple[int, ...], ...],
    heads: int,
    dim: int,
    *,
    align: tuple[str, ...] = ("keys", "values"),
    defaults: Defaults | None = None,
    seed: int = 0,
    rotations: dict | None = None,
) -> MergeProfile:
    """A profile whose groups align ``align`` components with random (or given) rotations."""
    defaults = defaults or Defaults(residual_length=8, block_size=4, gamma=0.1)
    made, tensors = [], {}
    for i, layers in enumerate(groups):
        parts = {}
        for j, component in enumerate(("keys", "values")):
            on = component in align
            parts[component] = defaults.settings(align=on)
            if on:
                label = f"{layers[0]}-{layers[-1]}"
                given = (rotations or {}).get((label, component))
                tensors[tensor_name("rotation", label, component)] = (
                    given
                    if given is not None
                    else random_rotations(len(layers), heads, dim, seed + 10 * i + j)
                )
        made.append(MergeGroup(tuple(layers), parts["keys"], parts["values"]))
    return MergeProfile(
        groups=tuple(made), defaults=defaults, tensors=ProfileTensors(tensors) if tensors else None
    )
