"""Calibrated alignment between layers and statistics of groups of k ≥ 2 layers (issue 7).

On models whose adjacent layers are not similar as they are (SmolLM2: cos ≈ 0 for keys and
values at every depth), a per-(group, KV head, K/V) orthogonal map makes them similar: member
``i``'s unit vectors ``u_i`` are rotated into the group's frame, ``u_i R_i``, before merging, and
restored through ``R_iᵀ`` (:func:`minicache.runtime.merge.merge_group`).

Fitting (orthogonal Procrustes from streamed sums):

* :class:`CrossCovariance` accumulates ``C_ab = Σ u_aᵀ u_b`` (``[D, D]`` float64) over the
  calibration tokens for every layer pair up to ``max_offset`` apart, per KV head and component.
  Sums add across batches and processes (one all-reduce).
* :func:`fit_rotations` maximises ``Σ_{i<j} Σ_tokens (u_i R_i)·(u_j R_j)`` over orthogonal
  ``R_i`` with the deepest member fixed to the identity (generalised Procrustes by block
  coordinate ascent: ``R_i = polar(Σ_{j≠i} C_ij R_j)``, ``polar(C) = U Vᵀ`` of ``C = U S Vᵀ``).
  For a pair this is one SVD: ``R_a = polar(C_ab)``.

:class:`GroupStatistics` then measures candidate groups (pairs and larger, aligned or not) with
the runtime's own merge (``merge_group`` + ``retention_mask``): per grid point of ``t`` (pairs) or
uniform weights (``k > 2``) and ``γ``, the restore error energy of the merged tokens. To keep
those errors honest, :func:`capture_alignment` fits the rotations it measures with on the first
half of the calibration windows and measures on the second half; the rotations shipped are then
refitted on all windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from minicache.calibrate.statistics import GAMMA_GRID, T_GRID, PairStatistics, _progress
from minicache.runtime.merge import merge_group, retention_mask, rotate, unit_and_norm

COMPONENTS = ("keys", "values")
#: Sweeps of the block-coordinate Procrustes for groups of more than two layers.
PROCRUSTES_SWEEPS = 8


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

    def add_cache(self, cache: DynamicCache, sink_tokens: int = 1) -> None:
        """Add a filled cache (``[B, H, T, D]`` per layer); the first ``sink_tokens`` are skipped."""
        units = []
        for layer in cache.layers[: self.num_layers]:
            pair = []
            for x in (layer.keys, layer.values):
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
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.tokens, op=dist.ReduceOp.SUM)

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


@dataclass(frozen=True)
class GroupKey:
    """A candidate group: its layers and whether it is merged in the aligned frame."""

    layers: tuple[int, ...]
    aligned: bool

    @property
    def size(self) -> int:
        return len(self.layers)


class GroupStatistics:
    """Restore errors of candidate groups measured with the runtime's merge, as float64 sums.

    For every key and component: ``tokens [H]``, ``energy [H]`` (Σ over members of ``m_i²``),
    ``retained [H, G]`` and ``error [H, G, T]``, the squared restore error ``Σ_i ‖x̂_i − x_i‖²`` of
    the merged (non-retained) tokens, for each ``γ`` of ``gammas`` and each option of ``t``
    (``ts`` for pairs; one option, uniform weights, for larger groups).
    """

    def __init__(
        self,
        keys: list[GroupKey],
        rotations: dict[tuple[tuple[int, ...], str], torch.Tensor],
        num_heads: int,
        *,
        ts: tuple[float, ...] = T_GRID,
        gammas: tuple[float, ...] = GAMMA_GRID,
        window: int = 64,
    ):
        self.keys = list(keys)
        self.rotations = rotations
        self.ts, self.gammas, self.window = ts, gammas, window
        self.num_heads = num_heads
        self.sums: dict[tuple[GroupKey, int], dict[str, torch.Tensor]] = {}
        for key in self.keys:
            options = len(ts) if key.size == 2 else 1
            for c in range(2):
                self.sums[key, c] = {
                    "tokens": torch.zeros(num_heads, dtype=torch.float64),
                    "energy": torch.zeros(num_heads, dtype=torch.float64),
                    "retained": torch.zeros(num_heads, len(gammas), dtype=torch.float64),
                    "error": torch.zeros(num_heads, len(gammas), options, dtype=torch.float64),
                }

    def t_options(self, key: GroupKey) -> tuple[float | None, ...]:
        """The merge weight options of a key: ``ts`` for pairs, ``(None,)`` (uniform) otherwise."""
        return tuple(self.ts) if key.size == 2 else (None,)

    def add_cache(self, cache: DynamicCache, sink_tokens: int = 1) -> None:
        for key in self.keys:
            for c, name in enumerate(COMPONENTS):
                xs = [getattr(cache.layers[layer], name) for layer in key.layers]
                rot = self.rotations[key.layers, name] if key.aligned else None
                self._add(key, c, xs, rot, sink_tokens)

    def _add(self, key: GroupKey, c: int, xs: list[torch.Tensor], rot, sink_tokens: int) -> None:
        s = self.sums[key, c]
        units = []
        norms = []
        for i, x in enumerate(xs):
            u, m = unit_and_norm(x)
            units.append(u if rot is None else rotate(u, rot[i]))
            norms.append(m)
        energy = torch.stack(norms, -1).square().double()  # [B, H, T, k]
        counted = torch.ones(energy.shape[:3], dtype=torch.bool)
        counted[..., :sink_tokens] = False
        sink = ~counted[:, 0, :]
        s["tokens"] += counted.double().sum(dim=(0, 2))
        s["energy"] += (energy.sum(-1) * counted).sum(dim=(0, 2))
        keeps = None
        for o, t in enumerate(self.t_options(key)):
            merged = merge_group(xs, 0.5 if t is None else t, rotations=rot)
            if keeps is None:
                keeps = [
                    retention_mask(merged.distance, g, window=self.window, sink=sink) for g in self.gammas
                ]
                for gi, keep in enumerate(keeps):
                    s["retained"][:, gi] += (keep & counted).double().sum(dim=(0, 2))
            # ‖m e − m u'‖² = m² ‖e − u'‖² for each member (rotations are orthogonal).
            err = sum(
                energy[..., i] * (merged.direction - units[i]).square().sum(-1).double()
                for i in range(len(xs))
            )
            for gi, keep in enumerate(keeps):
                s["error"][:, gi, o] += (err * (~keep & counted)).sum(dim=(0, 2))

    def relative_error(self, key: GroupKey, component: int) -> torch.Tensor:
        """``[G, T]`` restore error energy / KV energy of the group's members, summed over heads."""
        s = self.sums[key, component]
        return s["error"].sum(0) / s["energy"].sum().clamp_min(1e-30)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for sums in self.sums.values():
                for tensor in sums.values():
                    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def candidate_keys(num_layers: int, max_group_size: int, align: bool) -> list[GroupKey]:
    """Every run of 2..max_group_size adjacent layers, unaligned and (with ``align``) aligned."""
    keys = []
    for size in range(2, max_group_size + 1):
        for start in range(num_layers - size + 1):
            layers = tuple(range(start, start + size))
            keys.append(GroupKey(layers, False))
            if align:
                keys.append(GroupKey(layers, True))
    return keys


@dataclass
class AlignmentCapture:
    """What :func:`capture_alignment` measured."""

    statistics: PairStatistics
    cross: CrossCovariance
    groups: GroupStatistics | None


@torch.inference_mode()
def capture_alignment(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    window: int = 64,
    sink_tokens: int = 1,
    max_group_size: int = 2,
    group_keys: Callable[[], list[GroupKey]] | list[GroupKey] | None = None,
    progress: bool = True,
) -> AlignmentCapture:
    """One pass over ``windows`` (``[N, T]``): pair statistics, cross-covariances, group statistics.

    Cross-covariances cover layer pairs up to ``max_group_size - 1`` apart and use every window.
    When ``group_keys`` is given, the batches of the second half of the windows are also measured
    for those candidate groups, with rotations fitted on the first half only (out-of-sample
    restore errors); with a single batch, fit and measurement share it.
    """
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_layers = config.num_hidden_layers
    stats = PairStatistics(num_layers=n_layers, num_heads=heads, window=window)
    cross = CrossCovariance(n_layers, heads, head_dim, max_offset=max(1, max_group_size - 1))
    device = next(model.parameters()).device
    starts = list(range(0, windows.shape[0], batch_size))
    # Batches from `split` on are measured with rotations fitted on the batches before (all of one
    # batch when there is only one).
    split = len(starts) // 2 if group_keys is not None else len(starts)
    groups: GroupStatistics | None = None
    bar = _progress(total=int(windows.numel()), enabled=progress, desc="capturing KV statistics + alignment")
    for i, start in enumerate(starts):
        batch = windows[start : start + batch_size].to(device)
        cache = DynamicCache(config=model.config)
        model(input_ids=batch, attention_mask=torch.ones_like(batch), cache=cache)
        stats.add_cache(cache, sink_tokens)
        counted = False
        if i >= split:
            if groups is None:
                if float(cross.tokens) == 0:
                    cross.add_cache(cache, sink_tokens)
                    counted = True
                keys = group_keys() if callable(group_keys) else group_keys
                rotations = {}
                for layers in sorted({k.layers for k in keys if k.aligned}):
                    for name, r in cross.fit(layers).items():
                        rotations[layers, name] = r
                groups = GroupStatistics(keys, rotations, heads, window=window)
            groups.add_cache(cache, sink_tokens)
        if not counted:
            cross.add_cache(cache, sink_tokens)
        del cache
        bar.update(batch.numel())
    bar.close()
    return AlignmentCapture(statistics=stats, cross=cross, groups=groups)
