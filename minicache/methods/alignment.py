"""Calibrated orthogonal alignment between the layers of a group (orthogonal Procrustes from streamed sums).

On models whose adjacent layers are not similar as they are (SmolLM2: cos ≈ 0 for keys and values
at every depth), a per-(group, KV head, K/V) orthogonal map makes them similar: member ``i``'s unit
vectors ``u_i`` are rotated into the group's frame, ``u_i R_i``, before merging, and restored
through ``R_iᵀ``. SLERP and averaging use it when their ``align`` parameter is set.

* :class:`CrossCovariance` accumulates ``C_ab = Σ u_aᵀ u_b`` (``[D, D]`` float64) over calibration
  tokens for every layer pair up to ``max_offset`` apart, per KV head and component. Sums add
  across batches and processes (one all-reduce).
* :func:`fit_rotations` maximises ``Σ_{i<j} Σ_tokens (u_i R_i)·(u_j R_j)`` over orthogonal ``R_i``
  with the deepest member fixed to the identity (generalised Procrustes by block coordinate ascent:
  ``R_i = polar(Σ_{j≠i} C_ij R_j)``, ``polar(C) = U Vᵀ`` of ``C = U S Vᵀ``). For a pair this is one
  SVD: ``R_a = polar(C_ab)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from minicache.methods.base import all_reduce_sum
from minicache.methods.geometry import unit_and_norm

__all__ = ["ORTHOGONALITY_TOLERANCE", "PROCRUSTES_SWEEPS", "CrossCovariance", "check_rotation", "fit_rotations",
           "polar"]

COMPONENTS = ("keys", "values")
#: Sweeps of the block-coordinate Procrustes for groups of more than two layers.
PROCRUSTES_SWEEPS = 8
#: Largest ``|RᵀR − I|`` entry accepted for an alignment matrix. float32 SVD products are
#: orthogonal to ~1e-6; anything far above is not a rotation and would scale restored vectors.
ORTHOGONALITY_TOLERANCE = 1e-4


def polar(c: torch.Tensor) -> torch.Tensor:
    """Orthogonal factor ``U Vᵀ`` of ``c = U S Vᵀ`` (``[..., D, D]``): argmax over orthogonal R of ⟨R, c⟩."""
    u, _, vh = torch.linalg.svd(c.double())
    return u @ vh


@dataclass
class CrossCovariance:
    """Streamed sums ``Σ u_aᵀ u_b`` for layer pairs ``(a, a + o)``, ``o = 1..max_offset``.

    Attributes
    ----------
    sums : torch.Tensor
        ``[max_offset, L, 2, H, D, D]`` float64; ``sums[o-1, a, c, h]`` = Σ over counted tokens of
        ``u_aᵀ u_{a+o}`` for component ``c`` (0 keys, 1 values) and KV head ``h`` (rows beyond the
        last layer stay zero).
    tokens : torch.Tensor
        ``[1]`` float64, tokens counted (per sequence; sinks excluded).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    max_offset: int = 1
    sums: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.max_offset < 1:
            raise ValueError(f"max_offset must be at least 1, got {self.max_offset}")
        shape = (self.max_offset, self.num_layers, 2, self.num_heads, self.head_dim, self.head_dim)
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.tokens = torch.zeros(1, dtype=torch.float64)

    def add(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], sink_tokens: int = 1) -> None:
        """Add one batch (every layer's ``(keys, values)``, ``[B, H, T, D]``); the first ``sink_tokens`` are skipped."""
        units = []
        for layer in kv[: self.num_layers]:
            pair = []
            for x in layer:
                u, _ = unit_and_norm(x[..., sink_tokens:, :])
                pair.append(u.double())
            units.append(pair)
        b, _, t, _ = units[0][0].shape
        self.tokens += b * t
        for o in range(1, self.max_offset + 1):
            for a in range(self.num_layers - o):
                for c in range(2):
                    self.sums[o - 1, a, c] += torch.einsum("bhtd,bhte->hde", units[a][c], units[a + o][c])

    def between(self, a: int, b: int, component: int) -> torch.Tensor:
        """``[H, D, D]`` Σ u_aᵀ u_b (either order)."""
        if a == b:
            raise ValueError("a layer's cross-covariance with itself is not stored")
        if a < b:
            return self.sums[b - a - 1, a, component]
        return self.sums[a - b - 1, b, component].transpose(-1, -2)

    def all_reduce(self) -> None:
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""
        all_reduce_sum((self.sums, self.tokens))

    def fit(self, layers: Iterable[int]) -> dict[str, torch.Tensor]:
        """Rotations of one group: ``{"keys": R, "values": R}``, each ``[k, H, D, D]`` float32."""
        return {name: fit_rotations(self, tuple(layers), c) for c, name in enumerate(COMPONENTS)}

    def aligned_cosine(
        self, layers: tuple[int, ...], component: int, rotations: torch.Tensor
    ) -> torch.Tensor:
        """``[H]`` mean cosine between aligned members' directions, over all member pairs of the group."""
        total = torch.zeros(self.num_heads, dtype=torch.float64)
        count = 0
        r = rotations.double()
        for i in range(len(layers)):
            for j in range(i + 1, len(layers)):
                c = self.between(layers[i], layers[j], component)
                # Σ (u_i R_i)·(u_j R_j) = tr(R_iᵀ C_ij R_j)
                total += torch.einsum("hde,hdf,hfe->h", r[i], c, r[j])
                count += 1
        return total / (count * self.tokens.clamp_min(1))


def fit_rotations(cov: CrossCovariance, layers: tuple[int, ...], component: int) -> torch.Tensor:
    """Generalised orthogonal Procrustes for one group and component → ``[k, H, D, D]`` float32.

    The deepest member is the reference (identity); the others are fitted by block coordinate
    ascent on ``Σ_{i<j} tr(R_iᵀ C_ij R_j)`` (one exact SVD per member and sweep; a pair needs one).
    """
    k = len(layers)
    if k < 2:
        raise ValueError(f"a group has at least 2 layers, got {layers}")
    if layers[-1] - layers[0] > cov.max_offset:
        raise ValueError(f"group {list(layers)} spans more than the {cov.max_offset} layers captured")
    eye = torch.eye(cov.head_dim, dtype=torch.float64).expand(cov.num_heads, -1, -1)
    ref = k - 1
    rot = [eye.clone() for _ in range(k)]
    # Start: every member straight onto the reference.
    for i in range(k - 1):
        rot[i] = polar(cov.between(layers[i], layers[ref], component))
    for _ in range(PROCRUSTES_SWEEPS if k > 2 else 0):
        for i in range(k - 1):
            m = sum(cov.between(layers[i], layers[j], component) @ rot[j] for j in range(k) if j != i)
            rot[i] = polar(m)
    return torch.stack(rot).float()


def check_rotation(tensor: torch.Tensor, members: int, shape: tuple[int, int] | None, name: str) -> str | None:
    """Why ``tensor`` is not a valid ``[k, H, D, D]`` float32 orthogonal alignment (None if it is).

    Parameters
    ----------
    tensor : torch.Tensor
        The sidecar tensor.
    members : int
        ``k``, the group's number of layers.
    shape : (int, int) or None
        ``(H, D)`` of the model when known.
    name : str
        Its name in the sidecar, for the message.
    """
    if tensor.dtype != torch.float32:
        return f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; allowed: float32"
    heads = "H" if shape is None else shape[0]
    dim = "D" if shape is None else shape[1]
    ok = tensor.dim() == 4 and tensor.shape[0] == members and tensor.shape[2] == tensor.shape[3]
    if ok and shape is not None:
        ok = tuple(tensor.shape[1:3]) == tuple(shape)
    if not ok:
        return (
            f"{name} has shape {list(tensor.shape)}; allowed: [{members}, {heads}, {dim}, {dim}] (k layers of the "
            "group, KV heads, head_dim, head_dim)"
        )
    if not torch.isfinite(tensor).all():
        return f"{name} has non-finite entries; allowed: orthogonal matrices"
    r = tensor.double()
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    worst = float((r.transpose(-1, -2) @ r - eye).abs().max()) if r.numel() else 0.0
    if worst > ORTHOGONALITY_TOLERANCE:
        return (
            f"{name} is not orthogonal (|RᵀR - I| up to {worst:.2g}); allowed: orthogonal matrices "
            f"(|RᵀR - I| <= {ORTHOGONALITY_TOLERANCE:g})"
        )
    return None
