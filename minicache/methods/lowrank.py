"""Low rank: a calibrated basis shared by a group's layers, one set of coefficients per token.

For a group of ``k ≥ 1`` adjacent layers and one component (keys or values), a token's member vectors
are concatenated into ``X = [x_0 | … | x_{k-1}]`` and stored as ``r`` coefficients

    ``c = (X − μ) U``,   restored as   ``x̂_l = μ_l + c U_lᵀ``,

where ``μ`` is the calibration mean and ``U`` (orthonormal columns) the top principal directions of
``X`` on calibration data (PCA of the streamed second moments, :class:`SecondMoments`). The saving
comes from one set of coefficients per token serving every layer of the group (xKV, arXiv
2503.18893, shares the token-side factor the same way; its basis is computed online per prompt, ours
is calibrated offline and shipped in the profile's sidecar). A group of one layer is a per-layer
low-rank projection (Palu-like, arXiv 2407.21118).

Two layouts of the heads (``heads`` parameter), both storing ``rank`` coefficients per token and KV
head, i.e. a ``[B, H, N, rank]`` field like every other method's:

* ``joint``: one basis over all KV heads of the group's layers, ``U`` ``[k·H·D, H·rank]``; the
  ``H·rank`` coefficients of a token are stored as ``rank`` per KV head. Every head's restore reads
  all of a token's coefficients. On SmolLM2 this restores better than ``each`` at the same bytes
  (heads share structure);
* ``each``: one basis per KV head, ``U_h`` ``[k·D, rank]``.

Sidecar tensors per component: ``basis`` ``[k, H, D, R]`` float32 (``R = H·rank`` joint, ``rank``
each; orthonormal columns over ``k·H·D`` resp. ``k·D`` rows) and ``mean`` ``[k, H, D]`` float32.
With ``basis: query`` (keys), the basis is fitted for the logits of the calibration queries rather
than for the keys themselves (:mod:`minicache.methods.moments`): ``basis`` is then the decoder
``S⁻¹U`` and an ``encoder`` ``S U`` of the same shape stores the coefficients
(``c = (X − μ) E``); the two are biorthogonal (``EᵀB = I``), which is what the profile checks.
Keys are projected as the cache receives them (post-RoPE), so attention can score a query against the
coefficients without restoring (``q · x̂_l = q · μ_l + (q U_l) · c``, see :meth:`LowRankMethod.factored_scores`),
or, with the group's ``pre_rope: true`` (a setting of the store, not of this method), with RoPE removed:
RoPE turns every channel pair by an angle that grows with the position, which smears a basis shared by
all tokens; before it the same width restores SmolLM2's keys 2-3x closer
(``benchmarks/results/lowrank-cpu/probe.md``) and every layer's keys at a quarter of their width cost
+0.80 % perplexity instead of +3.43 % (``prerope-keys-only-512.md``). The price: attention restores such
a prefix a block at a time (the store turns it back), since a query cannot be projected once for keys
whose rotation differs per token.

The retention distance is the relative restore error of the token at a head, ``‖X̂_h − X_h‖ /
‖X_h‖`` over the members (clamped to 1). The calibration offers a grid of ranks for both layouts;
the restore error of each is measured out of sample and the search buys bytes with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minicache.methods.base import Encoded, Field, MergeMethod, MethodParams
from minicache.methods.moments import SecondMoments, fit_bases
from minicache.validation import ProfileError, check_choice, check_int

__all__ = ["BASES", "HEAD_LAYOUTS", "RANK_FRACTIONS", "LowRankMethod", "LowRankParams", "SecondMoments", "fit_bases"]

HEAD_LAYOUTS = ("joint", "each")
#: What a basis is fitted for: least restore error, or least logit error for the queries (keys only).
BASES = ("pca", "query")
#: Ranks the calibration measures, as fractions of a group's full width ``k·D`` per KV head.
RANK_FRACTIONS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
#: Largest ``|UᵀU − I|`` entry accepted for a basis (float32 eigenvectors are orthonormal to ~1e-6).
ORTHONORMALITY_TOLERANCE = 1e-4
#: Largest ``|EᵀB − I|`` entry accepted for a query-weighted encoder ``E`` and basis ``B`` (their
#: condition number, up to ~1e3, multiplies float32 rounding).
BIORTHOGONALITY_TOLERANCE = 1e-3
#: Key basis the calibration fits unless told otherwise (``--lowrank-basis``).
DEFAULT_KEY_BASIS = "pca"


@dataclass(frozen=True)
class LowRankParams(MethodParams):
    """Parameters of the low-rank method for one component of one group.

    Attributes
    ----------
    rank : int
        Coefficients stored per token and KV head (``joint``: ``H·rank`` coefficients per token shared
        by all heads). Must be below the group's full width ``k·head_dim`` to save anything.
    heads : str
        ``"joint"`` (one basis over all KV heads) or ``"each"`` (one basis per KV head).
    basis : str
        ``"pca"``: orthonormal, least restore error (sidecar ``basis``). ``"query"`` (keys): least
        error in the logits ``q·k`` of the calibration queries; the sidecar carries an ``encoder``
        beside the ``basis`` (decoder), biorthogonal to it (:mod:`minicache.methods.moments`).
    """

    rank: int = 16
    heads: str = "joint"
    basis: str = "pca"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", check_int(self.rank, "rank", 1))
        object.__setattr__(self, "heads", check_choice(self.heads, "heads", HEAD_LAYOUTS, "a head layout"))
        object.__setattr__(self, "basis", check_choice(self.basis, "basis", BASES, "a basis kind"))

    def summary(self) -> str:
        weighted = ", query-weighted" if self.basis == "query" else ""
        return f"rank {self.rank} ({self.heads}{weighted})"


# ---- the method ---------------------------------------------------------------------------------
def _stack(xs: Sequence[torch.Tensor], mean: torch.Tensor) -> torch.Tensor:
    """Centered members ``[B, H, N, k, D]`` float32."""
    x = torch.stack([x.float() for x in xs], dim=3)
    return x - mean.to(x.device).permute(1, 0, 2).unsqueeze(1)


class LowRankMethod(MergeMethod):
    """A calibrated shared low-rank basis (see the module docstring)."""

    name = "lowrank"
    Params = LowRankParams
    fields = (Field("coefficients", "rank", dtype="model", quantize="vectors", part="coefficients"),)
    fit_key = "second_moments"
    tensor_part = "bases"
    min_members = 1
    factored = True
    rope_sensitive = True
    tensors_in_cache_dtype = True

    # -- profile side -------------------------------------------------------------------------------
    def tensor_names(self, params: LowRankParams) -> tuple[str, ...]:
        return ("basis", "encoder", "mean") if params.basis == "query" else ("basis", "mean")

    def tensors_for(self, params: LowRankParams, fitted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "basis" in fitted:  # already a profile's tensors
            return {local: fitted[local] for local in self.tensor_names(params)}
        name = _fitted_name(params, "basis")
        if name not in fitted:
            raise ValueError("query-weighted bases are fitted for keys only, from the queries the capture saw "
                             "(none were counted: the model's attention could not be hooked, or these are values)")
        heads = fitted["mean"].shape[1]
        width = params.rank * (heads if params.heads == "joint" else 1)
        out = {"basis": fitted[name][..., :width].contiguous()}
        if params.basis == "query":
            out["encoder"] = fitted[_fitted_name(params, "encoder")][..., :width].contiguous()
        out["mean"] = fitted["mean"]
        return out

    def kept_variance(self, params: LowRankParams, fitted: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        spectrum = fitted.get(_fitted_name(params, "spectrum"))
        if spectrum is None:
            return None
        spectrum = spectrum.double()
        if params.heads == "joint":  # per-head rank j stands for the first j·H components
            heads = fitted["mean"].shape[1]
            kept = spectrum.cumsum(0)[heads - 1 :: heads]
        else:
            kept = spectrum.sum(0).cumsum(0)
        return (kept / spectrum.sum().clamp_min(1e-30)).float()

    def check_tensor(self, params, local, tensor, members, kv_shape, path, name) -> None:
        problem = _check_tensor(params, local, tensor, members, kv_shape, name)
        if problem is not None:
            raise ProfileError(problem, path)

    def check_tensor_set(self, params, tensors, members, kv_shape, path) -> None:
        if params.basis != "query":
            return
        # the encoder must undo what the decoder restores: (S U)ᵀ (S⁻¹ U) = I
        encoder, decoder = tensors["encoder"], tensors["basis"]
        if encoder.shape != decoder.shape:
            raise ProfileError(f"encoder has shape {list(encoder.shape)}, the basis {list(decoder.shape)}; allowed: "
                               "the same shape", path)
        worst = _identity_error(params, encoder, decoder)
        if worst > BIORTHOGONALITY_TOLERANCE:
            raise ProfileError(f"encoder and basis are not biorthogonal (|EᵀB - I| up to {worst:.2g}); allowed: "
                               f"|EᵀB - I| <= {BIORTHOGONALITY_TOLERANCE:g}", path)

    def saved_layers(self, params: LowRankParams, members: int, head_dim: int) -> float:
        # rank coefficients per token and head stand for k·D values
        return members - params.rank / head_dim

    # -- runtime ------------------------------------------------------------------------------------
    def encode(self, params: LowRankParams, xs, tensors) -> Encoded:
        coefficients, distance, _ = _project(params, xs, tensors)
        return Encoded({"coefficients": coefficients}, distance)

    def decode(self, params, fields, member, tensors, dtype, *, in_frame=False):
        c = fields["coefficients"].float()
        basis = tensors["basis"][member].to(c.device, torch.float32)  # [H, D, R]
        mean = tensors["mean"][member].to(c.device, torch.float32)  # [H, D]
        if params.heads == "joint":
            b, h, n, r = c.shape
            full = c.permute(0, 2, 1, 3).reshape(b, n, h * r)
            out = torch.einsum("bnr,hdr->bhnd", full, basis)
        else:
            out = torch.einsum("bhnr,hdr->bhnd", c, basis)
        return (out + mean[None, :, None, :]).to(dtype)

    def factored_scores(self, params, q, fields, member, tensors):
        # q · x̂ = q · μ_l + (q U_l) · c: the query is projected once, never a token restored
        c = fields["coefficients"].float()
        basis = tensors["basis"][member].to(q.device, torch.float32)  # [H, D, R]
        mean = tensors["mean"][member].to(q.device, torch.float32)
        bias = torch.einsum("bhgd,hd->bhg", q, mean).unsqueeze(-1)
        projected = torch.einsum("bhgd,hdr->bhgr", q, basis)
        if params.heads == "joint":  # a head's restore reads every head's coefficients of the token
            b, h, g, _ = projected.shape
            return torch.einsum("bhgkr,bknr->bhgn", projected.reshape(b, h, g, h, -1), c) + bias
        return torch.einsum("bhgr,bhnr->bhgn", projected, c) + bias

    def factored_values(self, params, probs, fields, member, tensors):
        # Σ p x̂ = (Σ p) μ_l + (Σ p c) U_lᵀ
        c = fields["coefficients"].float()
        basis = tensors["basis"][member].to(probs.device, torch.float32)
        mean = tensors["mean"][member].to(probs.device, torch.float32)
        if params.heads == "joint":
            b, h, g, _ = probs.shape
            weighted = torch.einsum("bhgn,bknr->bhgkr", probs, c).reshape(b, h, g, -1)
        else:
            weighted = torch.einsum("bhgn,bhnr->bhgr", probs, c)
        out = torch.einsum("bhgr,hdr->bhgd", weighted, basis)
        return out + probs.sum(-1, keepdim=True) * mean[None, :, None, :]

    def restore_error(self, params, xs, tensors):
        _, distance, error = _project(params, xs, tensors)
        return distance, error

    # -- calibration --------------------------------------------------------------------------------
    def param_options(self, members: int, fitted: bool, defaults: Mapping[str, Any]) -> list[LowRankParams]:
        """Both head layouts at the ranks of :data:`RANK_FRACTIONS` (needs the fitted bases)."""
        if not fitted:
            return []
        head_dim = int(defaults.get("head_dim", 64))
        ranks = sorted({max(1, round(f * members * head_dim)) for f in RANK_FRACTIONS})
        # one basis kind per search: the search compares options by their plain restore error, which
        # a query-weighted basis trades for logit error, so offering both would always pick PCA
        basis = defaults.get("lowrank_basis", DEFAULT_KEY_BASIS) if defaults.get("component") == "keys" else "pca"
        return [LowRankParams(rank=r, heads=heads, basis=basis) for heads in HEAD_LAYOUTS for r in ranks]

    def new_fit_statistic(self, num_layers, num_heads, head_dim, max_offset) -> SecondMoments:
        return SecondMoments(num_layers, num_heads, head_dim, max_offset=max(0, max_offset))

    def fit(self, statistic: SecondMoments, layers: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
        return fit_bases(statistic, tuple(layers))


def _project(params: LowRankParams, xs, tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients ``[B, H, N, rank]`` float32, the retention distance ``[B, H, N]`` float32 (relative
    restore error, clamped to 1) and the squared restore error ``[B, H, N]`` float64 summed over members.

    The error is measured by restoring: ``joint`` mixes heads, so a head's share needs its own rows.
    """
    mean, basis = tensors["mean"], tensors["basis"]
    x = _stack(xs, mean)  # [B, H, N, k, D] centered
    b, h, n, k, d = x.shape
    u = basis.to(x.device, torch.float32)  # [k, H, D, R] decoder (orthonormal for PCA: the encoder too)
    e = tensors["encoder"].to(x.device, torch.float32) if "encoder" in tensors else u
    if params.heads == "joint":
        flat = x.permute(0, 2, 3, 1, 4).reshape(b, n, k * h * d)
        c = flat @ e.reshape(k * h * d, -1)  # [B, N, H·rank]
        restored = (c @ u.reshape(k * h * d, -1).T).reshape(b, n, k, h, d).permute(0, 3, 1, 2, 4)
        coefficients = c.reshape(b, n, h, -1).permute(0, 2, 1, 3)
    else:
        per_head = u.permute(1, 0, 2, 3).reshape(h, k * d, -1)  # [H, kD, rank]
        encoder = e.permute(1, 0, 2, 3).reshape(h, k * d, -1)
        c = torch.einsum("bhnk,hkr->bhnr", x.reshape(b, h, n, k * d), encoder)
        restored = torch.einsum("bhnr,hkr->bhnk", c, per_head).reshape(b, h, n, k, d)
        coefficients = c
    error = (restored - x).square().sum((-1, -2)).double()
    # Σ‖x‖² from the squares (not base.energy's squared norms): the same bits as the profile shipped with
    total = torch.stack([x.float() for x in xs], dim=3).square().sum((-1, -2)).double()
    distance = (error / total.clamp_min(1e-30)).sqrt().clamp(0.0, 1.0).float()
    return coefficients.contiguous(), distance, error


def _fitted_name(params: LowRankParams, what: str) -> str:
    """Key of ``what`` (basis, encoder, spectrum) for ``params`` in what :func:`fit_bases` returns."""
    kind = "query_" if params.basis == "query" else ""
    return f"{what}_{kind}{params.heads}"


def _identity_error(params: LowRankParams, encoder: torch.Tensor, decoder: torch.Tensor) -> float:
    """Largest ``|EᵀB − I|`` entry over the bases (one joint, or one per KV head)."""
    if not decoder.numel():
        return 0.0

    def columns(u: torch.Tensor) -> torch.Tensor:
        k, h, d, r = u.shape
        u = u.double()
        return u.reshape(k * h * d, r).unsqueeze(0) if params.heads == "joint" else u.permute(1, 0, 2, 3).reshape(
            h, k * d, r)

    e, b = columns(encoder), columns(decoder)
    return float((e.transpose(-1, -2) @ b - torch.eye(b.shape[-1], dtype=torch.float64)).abs().max())


def _check_tensor(params: LowRankParams, local: str, tensor: torch.Tensor, members: int,
                  kv_shape: tuple[int, int] | None, name: str) -> str | None:
    if tensor.dtype != torch.float32:
        return f"{name} has dtype {str(tensor.dtype).replace('torch.', '')}; allowed: float32"
    heads = "H" if kv_shape is None else kv_shape[0]
    dim = "D" if kv_shape is None else kv_shape[1]
    if local == "mean":
        ok = tensor.dim() == 3 and tensor.shape[0] == members
        if ok and kv_shape is not None:
            ok = tuple(tensor.shape[1:]) == tuple(kv_shape)
        if not ok:
            return f"{name} has shape {list(tensor.shape)}; allowed: [{members}, {heads}, {dim}]"
    else:
        width = f"{heads}*{params.rank}" if params.heads == "joint" else str(params.rank)
        ok = tensor.dim() == 4 and tensor.shape[0] == members
        if ok and kv_shape is not None:
            h, d = kv_shape
            want = params.rank * (h if params.heads == "joint" else 1)
            ok = tuple(tensor.shape[1:]) == (h, d, want)
            if ok and params.rank >= members * d:
                return (f"{name}: rank {params.rank} stores as much as the {members} layers themselves "
                        f"({members}x{d} per KV head); allowed: rank < {members * d}")
        if not ok:
            return f"{name} has shape {list(tensor.shape)}; allowed: [{members}, {heads}, {dim}, {width}]"
    if not torch.isfinite(tensor).all():
        return f"{name} has non-finite entries; allowed: finite numbers"
    if local == "basis" and params.basis == "pca":
        worst = _identity_error(params, tensor, tensor)
        if worst > ORTHONORMALITY_TOLERANCE:
            return (f"{name} does not have orthonormal columns (|UᵀU - I| up to {worst:.2g}); allowed: "
                    f"|UᵀU - I| <= {ORTHONORMALITY_TOLERANCE:g}")
    return None
