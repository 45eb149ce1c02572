"""Merge math of MiniCache: SLERP of directions, magnitudes, retention, restore.

This is the one reference implementation. The runtime cache, the calibrator and the GPU kernels'
tests all call these functions, so what is measured is what ships.

Notation (DESIGN.md §2): for one KV head and token, ``x_a`` is the vector of the shallower layer
(l-1) and ``x_b`` that of the deeper layer (l). ``m = ‖x‖``, ``u = x / ‖x‖``, ``Ω = ∠(u_a, u_b)``.
The merged direction is ``e = sin((1-t)Ω)/sin Ω · u_a + sin(tΩ)/sin Ω · u_b`` (``t`` weights the
deeper layer), and a layer is restored as ``x̂ = m · e / ‖e‖``.

Beyond the paper (issue 7): groups of ``k ≥ 2`` layers and calibrated orthogonal alignment. Member
``i`` of a group has an orthogonal ``R_i`` (``[H, D, D]``, one per KV head; identity when the group
is not aligned) that maps its unit vectors into the group's common frame, ``u_i' = u_i R_i`` (row
vectors). The shared direction is the weighted spherical mean of the ``u_i'`` by incremental SLERP
(for two layers exactly SLERP with ``t``), and member ``i`` is restored as ``x̂_i = m_i · e R_iᵀ``.

Baseline (issue 4): ``method="average"`` is the paper's plain-averaging baseline. The group keeps the
weighted mean of its (aligned) vectors, ``x̄ = Σ w_i x_i R_i`` (a pair: ``(1-t)·x_a + t·x_b``, so
``t = 0.5`` is ``(x_a + x_b)/2``), and every member is restored as that same vector, ``x̂_i = x̄ R_iᵀ``:
no per-layer magnitudes. It is stored in the SLERP layout (unit direction ``x̄/‖x̄‖`` and, per member,
the magnitude ``‖x̄‖``), so the cache, :func:`restore` and the attention kernels need no second code
path; the angular distance that drives retention is the same as for SLERP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Below this sin Ω, SLERP's weights are 0/0: interpolate linearly and renormalise instead.
_SIN_EPS = 1e-4
# Norms below this count as zero vectors (their direction is the zero vector, never NaN).
_NORM_EPS = 1e-12
#: How a group's vectors become one shared vector: "slerp" (MiniCache) or "average" (the baseline).
MERGE_METHODS = ("slerp", "average")


@dataclass(frozen=True)
class PairMerge:
    """Result of merging two layers' vectors token by token.

    Attributes
    ----------
    direction : torch.Tensor
        ``[..., head_dim]`` float32, the shared direction ``e`` (unit norm, or zero when both
        inputs are zero or exactly opposite at ``t = 0.5``).
    magnitudes : torch.Tensor
        ``[..., 2]`` float32, ``(‖x_a‖, ‖x_b‖)``.
    distance : torch.Tensor
        ``[...]`` float32, angular distance ``Ω / π`` in ``[0, 1]``.
    """

    direction: torch.Tensor
    magnitudes: torch.Tensor
    distance: torch.Tensor


def unit_and_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``[..., D]``) into float32 unit directions ``[..., D]`` and norms ``[...]``.

    Zero vectors get a zero direction, so nothing downstream divides 0 by 0.
    """
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    unit = x / norm.clamp_min(_NORM_EPS).unsqueeze(-1)
    return unit, norm


def angle_between(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Angle Ω in ``[0, π]`` between unit vectors ``[..., D]`` → ``[...]``.

    Uses ``2·atan2(‖u_a − u_b‖, ‖u_a + u_b‖)``, which stays accurate near 0 and π where
    ``arccos`` of a clamped cosine loses half the digits.
    """
    diff = torch.linalg.vector_norm(u_a - u_b, dim=-1)
    summ = torch.linalg.vector_norm(u_a + u_b, dim=-1)
    return 2.0 * torch.atan2(diff, summ)


def slerp_pair(x_a: torch.Tensor, x_b: torch.Tensor, t: float) -> PairMerge:
    """Merge two layers' vectors by SLERP of their directions, in float32.

    Parameters
    ----------
    x_a, x_b : torch.Tensor
        ``[..., head_dim]`` keys or values of the shallower and the deeper layer, any float dtype.
    t : float
        Interpolation weight of the deeper layer, in ``[0, 1]``.

    Returns
    -------
    PairMerge
        Direction ``[..., head_dim]``, magnitudes ``[..., 2]`` and angular distance ``[...]``.
    """
    if x_a.shape != x_b.shape:
        raise ValueError(f"cannot merge tensors of different shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    u_a, m_a = unit_and_norm(x_a)
    u_b, m_b = unit_and_norm(x_b)
    e, omega = _slerp_units(u_a, u_b, t)
    return PairMerge(direction=e, magnitudes=torch.stack([m_a, m_b], dim=-1), distance=omega / torch.pi)


def _slerp_units(
    u_a: torch.Tensor, u_b: torch.Tensor, t: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of float32 unit (or zero) vectors ``[..., D]``: normalised direction and the angle Ω ``[...]``.

    ``t`` is a float or a tensor broadcastable to ``[...]``.
    """
    omega = angle_between(u_a, u_b)
    sin_omega = torch.sin(omega)
    small = sin_omega < _SIN_EPS
    safe_sin = torch.where(small, torch.ones_like(sin_omega), sin_omega)
    t = torch.as_tensor(t, dtype=omega.dtype, device=omega.device).expand_as(omega)
    w_a = torch.where(small, 1.0 - t, torch.sin((1.0 - t) * omega) / safe_sin)
    w_b = torch.where(small, t, torch.sin(t * omega) / safe_sin)
    e = w_a.unsqueeze(-1) * u_a + w_b.unsqueeze(-1) * u_b
    # SLERP keeps unit norm in exact arithmetic; the linear fallback and zero inputs do not.
    e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    return e / e_norm.clamp_min(_NORM_EPS), omega


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x R`` per KV head, in float32: ``x`` ``[B, H, N, D]``, ``rotation`` ``[H, D, D]``."""
    return torch.einsum("bhnd,hde->bhne", x.float(), rotation.to(device=x.device, dtype=torch.float32))


def rotate_back(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x Rᵀ`` per KV head (the inverse of :func:`rotate` for orthogonal ``R``), in float32."""
    return torch.einsum("bhne,hde->bhnd", x.float(), rotation.to(device=x.device, dtype=torch.float32))


def merge_group(
    xs: Sequence[torch.Tensor],
    t: float = 0.6,
    *,
    weights: Sequence[float] | None = None,
    rotations: torch.Tensor | None = None,
    method: str = "slerp",
) -> PairMerge:
    """Merge ``k ≥ 2`` layers' vectors token by token into one shared direction, in float32.

    Member ``i`` is first aligned into the group's frame, ``u_i' = u_i R_i``; the shared direction
    is the weighted spherical mean of the ``u_i'`` by incremental SLERP: ``e_0 = u_0'``,
    ``e_i = slerp(e_{i-1}, u_i', w_i / (w_0 + … + w_i))``. For two layers this is SLERP with
    weight ``t`` on the deeper layer; without rotations it equals :func:`slerp_pair` bit for bit.

    Parameters
    ----------
    xs : sequence of torch.Tensor
        ``k`` tensors ``[B, H, N, D]``, shallowest layer first.
    t : float
        Weight of the deeper layer of a pair (``k = 2``, ``weights`` None).
    weights : sequence of float, optional
        ``k`` non-negative weights summing to 1; default ``(1 - t, t)`` for a pair, uniform for
        ``k > 2``.
    rotations : torch.Tensor, optional
        ``[k, H, D, D]`` orthogonal alignment of every member (float32); None = no alignment.
    method : {"slerp", "average"}
        ``"average"``: the shared vector is the weighted mean ``x̄`` of the aligned vectors
        (same weights as above) and every member's magnitude is ``‖x̄‖``, so that
        :func:`restore` rebuilds ``x̄`` for every member (the paper's averaging baseline).

    Returns
    -------
    PairMerge
        Direction ``[B, H, N, D]`` (in the aligned frame), magnitudes ``[B, H, N, k]`` and the
        angular distance ``[B, H, N]``: the largest pairwise angle between aligned members, / π
        (for a pair, ``Ω / π``), whatever the method.
    """
    k = len(xs)
    if k < 2:
        raise ValueError(f"a group merges at least 2 layers, got {k}")
    if any(x.shape != xs[0].shape for x in xs):
        raise ValueError(f"cannot merge tensors of different shapes {[tuple(x.shape) for x in xs]}")
    if weights is not None and len(weights) != k:
        raise ValueError(f"{len(weights)} weights for a group of {k} layers")
    if rotations is not None and (rotations.dim() != 4 or rotations.shape[0] != k):
        raise ValueError(f"rotations must be [k={k}, H, D, D], got {tuple(rotations.shape)}")
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(map(repr, MERGE_METHODS))}")
    units, norms = [], []
    for i, x in enumerate(xs):
        u, m = unit_and_norm(x)
        if rotations is not None:
            u = rotate(u, rotations[i])
        units.append(u)
        norms.append(m)
    if method == "average":
        return _average(units, norms, t, weights)
    if k == 2 and weights is None:
        e, omega = _slerp_units(units[0], units[1], t)
        distance = omega / torch.pi
    else:
        w = [1.0 / k] * k if weights is None else [float(v) for v in weights]
        e, total = units[0], w[0]
        for i in range(1, k):
            total += w[i]
            e, _ = _slerp_units(e, units[i], w[i] / total if total > 0 else 0.0)
        distance = _max_pairwise_distance(units)
    return PairMerge(direction=e, magnitudes=torch.stack(norms, dim=-1), distance=distance)


def _max_pairwise_distance(units: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest angle between any two of the unit vectors ``[..., D]``, / π: ``[...]``."""
    omega = torch.zeros(units[0].shape[:-1], dtype=units[0].dtype, device=units[0].device)
    for i in range(len(units)):
        for j in range(i + 1, len(units)):
            omega = torch.maximum(omega, angle_between(units[i], units[j]))
    return omega / torch.pi


def _average(
    units: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], t: float, weights: Sequence[float] | None
) -> PairMerge:
    """The averaging baseline of :func:`merge_group` from aligned float32 units and norms."""
    k = len(units)
    if weights is None:
        weights = (1.0 - t, t) if k == 2 else [1.0 / k] * k
    # Σ w_i x_i R_i, rebuilt from the aligned units (x R = m · u R): rotations are applied once.
    mean = sum(float(w) * m.unsqueeze(-1) * u for w, m, u in zip(weights, norms, units, strict=True))
    direction, norm = unit_and_norm(mean)
    magnitudes = norm.unsqueeze(-1).expand(*norm.shape, k).contiguous()
    return PairMerge(direction=direction, magnitudes=magnitudes, distance=_max_pairwise_distance(units))


def restore(
    direction: torch.Tensor,
    magnitude: torch.Tensor,
    dtype: torch.dtype | None = None,
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild one layer's vectors from the shared direction: ``x̂ = m · e / ‖e‖`` (then ``· Rᵀ``).

    Parameters
    ----------
    direction : torch.Tensor
        ``[..., head_dim]`` stored direction (any float dtype; renormalised in float32 because the
        stored copy may be rounded to the model dtype).
    magnitude : torch.Tensor
        ``[...]`` that layer's norms.
    dtype : torch.dtype, optional
        Output dtype; defaults to ``direction.dtype``.
    rotation : torch.Tensor, optional
        ``[H, D, D]`` this layer's alignment ``R`` (direction ``[B, H, N, D]``); the restored
        vectors are rotated back into the layer's own frame by ``Rᵀ``.

    Returns
    -------
    torch.Tensor
        ``[..., head_dim]`` restored vectors.
    """
    e = direction.float()
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    out = e * magnitude.float().unsqueeze(-1)
    if rotation is not None:
        out = rotate_back(out, rotation)
    return out.to(dtype or direction.dtype)


def retention_mask(
    distance: torch.Tensor,
    gamma: float,
    rule: str = "distinct",
    *,
    valid: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    window: int | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """Decide which tokens keep their exact per-layer vectors instead of being merged.

    The threshold is relative to the range of angular distances ``[d_min, d_max]`` of one sequence,
    KV head and component, taken over a window of that sequence's own valid tokens:

    * ``distinct`` (our reading of the paper): retain ``d ≥ d_max − (d_max − d_min)·γ``;
    * ``similar`` (xKV's reading, kept for A/B): retain ``d ≤ d_min + (d_max − d_min)·γ``.

    ``γ = 0`` retains nothing (the most compression), rather than only the extreme token.
    Sink tokens are always retained and never enter the range; invalid (padding) tokens are
    never retained and never enter the range. A range needs at least two valid tokens.

    Parameters
    ----------
    distance : torch.Tensor
        ``[B, H, N]`` angular distances ``Ω/π``.
    gamma : float
        Retention fraction of the distance range, in ``[0, 1]``.
    rule : {"distinct", "similar"}
    valid : torch.Tensor, optional
        ``[B, N]`` (or broadcastable to ``[B, H, N]``) bool, False for padding. Default: all valid.
    sink : torch.Tensor, optional
        ``[B, N]`` bool, True for sink tokens. Default: none.
    window : int, optional
        Size of the forward window ``[i, i + window)`` whose range decides token ``i``. Because the
        window is made of the sequence's own tokens, the decision does not depend on other
        sequences in the batch, on left padding, or on how the tokens were chunked. ``None``: one
        range over all ``N`` tokens.
    count : int, optional
        Decide only the first ``count`` tokens (the rest only serve as look-ahead). Default: ``N``.

    Returns
    -------
    torch.Tensor
        ``[B, H, count]`` bool, True where the token is retained.
    """
    if rule not in ("distinct", "similar"):
        raise ValueError(f"retention rule {rule!r} is not one of 'distinct', 'similar'")
    b, h, n = distance.shape
    count = n if count is None else count
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=distance.device)
    if sink is None:
        sink = torch.zeros(b, n, dtype=torch.bool, device=distance.device)
    valid = valid.expand(b, n) if valid.dim() == 2 else valid
    sink = sink.expand(b, n) if sink.dim() == 2 else sink
    in_range = (valid & ~sink)
    in_range = in_range.unsqueeze(1).expand(b, h, n) if in_range.dim() == 2 else in_range
    sink_bh = sink.unsqueeze(1).expand(b, h, n) if sink.dim() == 2 else sink
    sink_bh = sink_bh[..., :count]
    if gamma <= 0.0:
        return sink_bh.clone()

    d = distance.float()
    hi = torch.where(in_range, d, torch.full_like(d, -torch.inf))
    lo = torch.where(in_range, d, torch.full_like(d, torch.inf))
    n_valid = in_range.float()
    if window is None:
        d_max = hi.amax(dim=-1, keepdim=True).expand(b, h, count)
        d_min = lo.amin(dim=-1, keepdim=True).expand(b, h, count)
        n_in = n_valid.sum(dim=-1, keepdim=True).expand(b, h, count)
    else:
        # Forward windows [i, i+window), truncated at the end (padding beyond N is out of range).
        pad = window - 1
        d_max = F.pad(hi, (0, pad), value=-torch.inf).unfold(-1, window, 1)[..., :count, :].amax(-1)
        d_min = F.pad(lo, (0, pad), value=torch.inf).unfold(-1, window, 1)[..., :count, :].amin(-1)
        n_in = F.pad(n_valid, (0, pad)).unfold(-1, window, 1)[..., :count, :].sum(-1)
    spread = d_max - d_min
    d_c = d[..., :count]
    if gamma >= 1.0:  # the whole range; avoids rounding at its ends
        keep = torch.ones_like(d_c, dtype=torch.bool)
    elif rule == "distinct":
        keep = d_c >= d_max - spread * gamma
    else:
        keep = d_c <= d_min + spread * gamma
    keep = keep & in_range[..., :count] & (n_in >= 2)
    return keep | sink_bh
