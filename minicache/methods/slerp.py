"""SLERP: MiniCache's merge (arXiv 2405.14366), with calibrated alignment and groups of k ≥ 2 layers.

Notation (DESIGN.md §2): for one KV head and token, ``x_a`` is the vector of the shallower layer
(l-1) and ``x_b`` that of the deeper layer (l). ``m = ‖x‖``, ``u = x / ‖x‖``, ``Ω = ∠(u_a, u_b)``.
The merged direction is ``e = sin((1-t)Ω)/sin Ω · u_a + sin(tΩ)/sin Ω · u_b`` (``t`` weights the
deeper layer), and a layer is restored as ``x̂ = m · e / ‖e‖``.

Beyond the paper: groups of ``k ≥ 2`` layers and calibrated orthogonal alignment
(:mod:`minicache.methods.alignment`). Member ``i`` of an aligned group has an orthogonal ``R_i``
(``[H, D, D]``, one per KV head, shipped in the profile's sidecar as ``rotation.<group>.<keys|values>``)
that maps its unit vectors into the group's common frame, ``u_i' = u_i R_i`` (row vectors). The
shared direction is the weighted spherical mean of the ``u_i'`` by incremental SLERP (for two
layers exactly SLERP with ``t``), and member ``i`` is restored as ``x̂_i = m_i · e R_iᵀ``.

Stored form per token: the shared unit ``direction`` ``[D]`` (model dtype; quantizable like the
component) and every member's ``magnitude`` ``[k]`` (fp16, fp32 for fp32 models). Retained tokens'
magnitudes carry the flag :data:`RETAINED_MAGNITUDE`, so a fused kernel streaming the dense store can
skip them without reading the retained list. The Triton kernels read this layout directly
(``kernel_layout = "direction_magnitude"``).

The retention distance is ``Ω / π`` (for ``k > 2``, the largest pairwise angle between aligned
members, / π). Calibration measures the restore error of a grid of ``t`` for pairs (uniform weights
for larger groups), with and without alignment; the search regresses damage on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minicache.methods.alignment import CrossCovariance, check_rotation
from minicache.methods.base import Encoded, Field, Frame, MergeMethod, MethodParams, energy, magnitude_dtype
from minicache.methods.geometry import NORM_EPS, SIN_EPS, angle_between, rotate, rotate_back, unit_and_norm
from minicache.validation import ProfileError, check_bool, check_unit, check_weights

__all__ = [
    "RETAINED_MAGNITUDE",
    "T_GRID",
    "PairMerge",
    "SlerpMethod",
    "SlerpParams",
    "merge_group",
    "restore",
    "slerp_pair",
]

#: Magnitude stored for retained tokens (norms are never negative).
RETAINED_MAGNITUDE = -1.0
#: SLERP weights the calibration measures for pairs.
T_GRID: tuple[float, ...] = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class SlerpParams(MethodParams):
    """Parameters of SLERP (and of averaging) for one component of one group.

    Attributes
    ----------
    t : float
        SLERP weight of the deeper layer of a pair, in [0, 1] (0 = the shallower layer's direction).
    weights : tuple of float or None
        Groups of more than two layers only: each member's weight in the shared direction
        (non-negative, summing to 1); None = uniform. Written only when set.
    align : bool
        Merge in a calibrated aligned frame: every member has an orthogonal matrix per KV head in the
        profile's sidecar (``rotation.<group>.<component>``). Written only when true.
    """

    t: float = 0.6
    weights: tuple[float, ...] | None = None
    align: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", check_unit(self.t, "t"))
        if self.weights is not None:
            object.__setattr__(self, "weights", check_weights(self.weights, "weights"))
        object.__setattr__(self, "align", check_bool(self.align, "align"))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"t": self.t}
        if self.weights is not None:
            data["weights"] = list(self.weights)
        if self.align:
            data["align"] = True
        return data

    def summary(self) -> str:
        return f"t {self.t:g}"


@dataclass(frozen=True)
class PairMerge:
    """Result of merging ``k`` layers' vectors token by token.

    Attributes
    ----------
    direction : torch.Tensor
        ``[..., head_dim]`` float32, the shared direction ``e`` (unit norm, or zero when the
        inputs are zero or exactly opposite at ``t = 0.5``).
    magnitudes : torch.Tensor
        ``[..., k]`` float32, every member's ``‖x‖``.
    distance : torch.Tensor
        ``[...]`` float32, angular distance ``Ω / π`` in ``[0, 1]``.
    """

    direction: torch.Tensor
    magnitudes: torch.Tensor
    distance: torch.Tensor


# ---- the math (one reference implementation: cache, calibration and kernel tests call it) ------
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
    e, omega = slerp_units(u_a, u_b, t)
    return PairMerge(direction=e, magnitudes=torch.stack([m_a, m_b], dim=-1), distance=omega / torch.pi)


def slerp_units(
    u_a: torch.Tensor, u_b: torch.Tensor, t: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of float32 unit (or zero) vectors ``[..., D]``: normalised direction and the angle Ω ``[...]``.

    ``t`` is a float or a tensor broadcastable to ``[...]``.
    """
    omega = angle_between(u_a, u_b)
    sin_omega = torch.sin(omega)
    small = sin_omega < SIN_EPS
    safe_sin = torch.where(small, torch.ones_like(sin_omega), sin_omega)
    t = torch.as_tensor(t, dtype=omega.dtype, device=omega.device).expand_as(omega)
    w_a = torch.where(small, 1.0 - t, torch.sin((1.0 - t) * omega) / safe_sin)
    w_b = torch.where(small, t, torch.sin(t * omega) / safe_sin)
    e = w_a.unsqueeze(-1) * u_a + w_b.unsqueeze(-1) * u_b
    # SLERP keeps unit norm in exact arithmetic; the linear fallback and zero inputs do not.
    e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    return e / e_norm.clamp_min(NORM_EPS), omega


def aligned_units(
    xs: Sequence[torch.Tensor], rotations: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every member's unit vectors in the group's frame (``u_i R_i``) and norms, float32."""
    units, norms = [], []
    for i, x in enumerate(xs):
        u, m = unit_and_norm(x)
        if rotations is not None:
            u = rotate(u, rotations[i])
        units.append(u)
        norms.append(m)
    return units, norms


def check_group_inputs(xs: Sequence[torch.Tensor], weights, rotations) -> None:
    k = len(xs)
    if k < 2:
        raise ValueError(f"a group merges at least 2 layers, got {k}")
    if any(x.shape != xs[0].shape for x in xs):
        raise ValueError(f"cannot merge tensors of different shapes {[tuple(x.shape) for x in xs]}")
    if weights is not None and len(weights) != k:
        raise ValueError(f"{len(weights)} weights for a group of {k} layers")
    if rotations is not None and (rotations.dim() != 4 or rotations.shape[0] != k):
        raise ValueError(f"rotations must be [k={k}, H, D, D], got {tuple(rotations.shape)}")


def merge_group(
    xs: Sequence[torch.Tensor],
    t: float = 0.6,
    *,
    weights: Sequence[float] | None = None,
    rotations: torch.Tensor | None = None,
) -> PairMerge:
    """SLERP-merge ``k ≥ 2`` layers' vectors token by token into one shared direction, in float32.

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

    Returns
    -------
    PairMerge
        Direction ``[B, H, N, D]`` (in the aligned frame), magnitudes ``[B, H, N, k]`` and the
        angular distance ``[B, H, N]``: the largest pairwise angle between aligned members, / π
        (for a pair, ``Ω / π``).
    """
    check_group_inputs(xs, weights, rotations)
    k = len(xs)
    units, norms = aligned_units(xs, rotations)
    if k == 2 and weights is None:
        e, omega = slerp_units(units[0], units[1], t)
        distance = omega / torch.pi
    else:
        w = [1.0 / k] * k if weights is None else [float(v) for v in weights]
        e, total = units[0], w[0]
        for i in range(1, k):
            total += w[i]
            e, _ = slerp_units(e, units[i], w[i] / total if total > 0 else 0.0)
        distance = max_pairwise_distance(units)
    return PairMerge(direction=e, magnitudes=torch.stack(norms, dim=-1), distance=distance)


def max_pairwise_distance(units: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest angle between any two of the unit vectors ``[..., D]``, / π: ``[...]``."""
    omega = torch.zeros(units[0].shape[:-1], dtype=units[0].dtype, device=units[0].device)
    for i in range(len(units)):
        for j in range(i + 1, len(units)):
            omega = torch.maximum(omega, angle_between(units[i], units[j]))
    return omega / torch.pi


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
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    out = e * magnitude.float().unsqueeze(-1)
    if rotation is not None:
        out = rotate_back(out, rotation)
    return out.to(dtype or direction.dtype)


def _direction_and_scale(fields, member: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored directions ``[B, H, n, D]`` float32 and each token's ``m / ‖e‖`` ``[B, H, n]`` for
    ``member`` (what :func:`restore` multiplies the direction by; retained tokens keep their flag)."""
    e = fields["direction"].float()
    norm = torch.linalg.vector_norm(e, dim=-1).clamp_min(NORM_EPS)
    return e, fields["magnitude"][..., member].float() / norm


# ---- the method ---------------------------------------------------------------------------------
class SlerpMethod(MergeMethod):
    """MiniCache's SLERP merge (see the module docstring)."""

    name = "slerp"
    Params = SlerpParams
    fields = (
        Field("direction", "head_dim", dtype="model", quantize="component", part="directions"),
        Field("magnitude", "members", dtype="scalar", quantize=None, part="magnitudes"),
    )
    factored = True
    kernel_layout = "direction_magnitude"
    fit_key = "alignment"
    tensor_part = "alignment"

    def check_members(self, params: SlerpParams, members: int) -> None:
        if params.weights is None:
            return
        if members == 2:
            raise ProfileError(
                f"{list(params.weights)} given for a pair; allowed: t for pairs, weights for groups of 3+ layers",
                "weights",
            )
        if len(params.weights) != members:
            raise ProfileError(
                f"{len(params.weights)} weights for {members} layers; allowed: one weight per layer", "weights"
            )

    def tensor_names(self, params: SlerpParams) -> tuple[str, ...]:
        return ("rotation",) if params.align else ()

    def check_tensor(self, params, local, tensor, members, kv_shape, path, name) -> None:
        problem = check_rotation(tensor, members, kv_shape, name)
        if problem is not None:
            raise ProfileError(problem, path)

    # -- runtime ------------------------------------------------------------------------------
    def shared(self, params: SlerpParams, xs: Sequence[torch.Tensor], rotations: torch.Tensor | None) -> PairMerge:
        """The shared direction, magnitudes and distance of a block (float32)."""
        return merge_group(xs, params.t, weights=params.weights, rotations=rotations)

    def encode(self, params: SlerpParams, xs, tensors) -> Encoded:
        merged = self.shared(params, xs, tensors.get("rotation"))
        return Encoded({"direction": merged.direction, "magnitude": merged.magnitudes}, merged.distance)

    def mark_retained(self, fields, keep):
        # A retained token's magnitudes are never used (its exact vectors are stored aside), so they
        # carry the flag instead: a fused kernel can then skip it without reading the sparse list.
        return {**fields, "magnitude": fields["magnitude"].masked_fill(keep.unsqueeze(-1), RETAINED_MAGNITUDE)}

    def decode(self, params, fields, member, tensors, dtype, *, in_frame=False):
        rotation = tensors.get("rotation")
        rotation = None if rotation is None or in_frame else rotation[member]
        return restore(fields["direction"], fields["magnitude"][..., member], dtype, rotation)

    def frame(self, params, tensors, member) -> Frame | None:
        rotation = tensors.get("rotation")
        return None if rotation is None else Frame(rotation[member])

    def factored_scores(self, params, q, fields, member, tensors):
        # q · (m e/‖e‖) = (q · e) m/‖e‖: one product with the shared directions, scaled per token,
        # instead of restoring every member vector (q is already in the aligned frame)
        e, scale = _direction_and_scale(fields, member)
        return torch.einsum("bhgd,bhnd->bhgn", q, e) * scale.unsqueeze(2)

    def factored_values(self, params, probs, fields, member, tensors):
        # Σ p m e/‖e‖ = Σ (p m/‖e‖) e
        e, scale = _direction_and_scale(fields, member)
        return torch.einsum("bhgn,bhnd->bhgd", probs * scale.unsqueeze(2), e)

    def fused_encode(self, params: SlerpParams, members: int):
        # The Triton merge kernel implements SLERP of pairs; an aligned pair enters it rotated.
        if members != 2 or params.weights is not None:
            return None

        def run(xs, tensors, gamma, retention, valid, sink, window, count, dtype):
            from minicache.runtime.kernels.merge import merge_block

            k_a, k_b = xs
            rotation = tensors.get("rotation")
            if rotation is not None:
                k_a, k_b = rotate(k_a, rotation[0]), rotate(k_b, rotation[1])
            block = merge_block(
                k_a, k_b, params.t, gamma, retention, valid=valid, sink=sink, window=window, count=count,
                magnitude_dtype=magnitude_dtype(dtype), retained_flag=RETAINED_MAGNITUDE,
            )
            return {"direction": block.direction.to(dtype), "magnitude": block.magnitude}, block.keep

        return run

    # -- calibration --------------------------------------------------------------------------
    def param_options(self, members: int, fitted: bool, defaults: Mapping[str, Any]) -> list[SlerpParams]:
        """Unaligned then (when fitted) aligned: every ``t`` of :data:`T_GRID` for pairs, uniform
        weights for larger groups (``t`` then only names the default)."""
        ts = T_GRID if members == 2 else (float(defaults.get("t", SlerpParams.t)),)
        aligns = (False, True) if fitted else (False,)
        return [self.Params(t=t, align=align) for align in aligns for t in ts]

    def restore_error(self, params: SlerpParams, xs, tensors):
        # ‖m e − m u'‖² = m² ‖e − u'‖² for each member (rotations are orthogonal): exact, and cheaper
        # than restoring.
        rotations = tensors.get("rotation")
        merged = self.shared(params, xs, rotations)
        units, _ = aligned_units(xs, rotations)
        sq = energy(xs)
        err = sum(sq[..., i] * (merged.direction - units[i]).square().sum(-1).double() for i in range(len(xs)))
        return merged.distance, err

    def new_fit_statistic(self, num_layers, num_heads, head_dim, max_offset) -> CrossCovariance:
        return CrossCovariance(num_layers, num_heads, head_dim, max_offset=max(1, max_offset))

    def fit(self, statistic: CrossCovariance, layers: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {"rotation": r} for name, r in statistic.fit(layers).items()}
