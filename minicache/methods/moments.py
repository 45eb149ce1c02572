"""Streamed second moments of the KV (and the queries reading the keys), and the bases fitted on them.

:class:`SecondMoments` sums, over calibration batches, every layer's keys and values and their
products with nearby layers (what a cross-layer basis or predictor is fitted on), plus the second
moment of the post-RoPE queries that read each KV head. :func:`fit_bases` turns them into one
group's principal bases:

* ``pca``: the top eigenvectors of the members' concatenated covariance (least restore error);
* ``query`` (keys only): the basis that least disturbs the attention logits ``q·k`` the queries of
  the calibration data compute, ``E[(q·(k − k̂))²]`` summed over the query heads reading a KV head
  (Eigen Attention, arXiv 2408.05646; Palu's Fisher weighting, arXiv 2407.21118, in spirit). With
  ``W = E[q qᵀ]`` and ``S = W^{1/2}`` (block-diagonal over members and KV heads), it is PCA of
  ``x S``: ``U`` the top eigenvectors of ``S C S``; a token is stored as ``c = (x − μ) S U`` and
  restored as ``x̂ = μ + c (S⁻¹ U)ᵀ``. Encoder ``S U`` and decoder ``S⁻¹ U`` are biorthogonal
  (``(S U)ᵀ (S⁻¹ U) = I``) but not orthonormal, so the profile carries both.

Everything is float64 sums that add up across processes (``all_reduce``); no dataset-sized tensor
is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from minicache.methods.base import all_reduce_sum

__all__ = ["QUERY_RIDGE", "SecondMoments", "fit_bases"]

#: Ridge added to ``E[q qᵀ]`` (times its mean eigenvalue) before the square root: directions no
#: calibration query reads still get a finite weight, so the decoder ``S⁻¹ U`` stays bounded.
QUERY_RIDGE = 1e-3


@dataclass
class SecondMoments:
    """Streamed first and second moments of every layer's keys and values, with nearby layers.

    Attributes
    ----------
    sums : torch.Tensor
        ``[L, 2, H·D]`` float64: Σ x over counted tokens (heads concatenated, head-major).
    products : torch.Tensor
        ``[max_offset + 1, L, 2, H·D, H·D]`` float64: ``products[o, l, c]`` = Σ x_lᵀ x_{l+o}.
    tokens : torch.Tensor
        ``[1]`` float64, tokens counted (sinks excluded).
    queries : torch.Tensor
        ``[L, H, D, D]`` float64: Σ q qᵀ of the post-RoPE queries over the query heads reading each
        KV head (sinks excluded), from :meth:`add_queries`.
    query_tokens : torch.Tensor
        ``[1]`` float64, tokens whose queries were counted (0 when the capture could not see them).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    max_offset: int = 0
    sums: torch.Tensor = field(init=False)
    products: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)
    queries: torch.Tensor = field(init=False)
    query_tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.max_offset < 0:
            raise ValueError(f"max_offset must be >= 0, got {self.max_offset}")
        width = self.num_heads * self.head_dim
        self.sums = torch.zeros(self.num_layers, 2, width, dtype=torch.float64)
        self.products = torch.zeros(self.max_offset + 1, self.num_layers, 2, width, width, dtype=torch.float64)
        self.tokens = torch.zeros(1, dtype=torch.float64)
        self.queries = torch.zeros(self.num_layers, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float64)
        self.query_tokens = torch.zeros(1, dtype=torch.float64)
        # queries of the batch being prefilled: counted when its KV is added (add), so that a batch
        # whose KV is not added to the fit does not leak its queries into it
        self._pending = torch.zeros_like(self.queries)
        self._pending_tokens = 0.0

    def add_queries(self, layer: int, queries: torch.Tensor, sink_tokens: int = 1) -> None:
        """Note one layer's post-RoPE queries ``[B, Hq, T, D]`` of the batch being prefilled.

        They count once :meth:`add` adds that batch's KV. Layer 0 starts a new batch.
        """
        if layer == 0:
            self._pending.zero_()
            self._pending_tokens = 0.0
        if layer >= self.num_layers:
            return
        b, hq, _, d = queries.shape
        if hq % self.num_heads or d != self.head_dim:
            raise ValueError(f"queries of shape {list(queries.shape)} do not read {self.num_heads} KV heads of "
                             f"dimension {self.head_dim}")
        q = queries[..., sink_tokens:, :].double().cpu().reshape(b, self.num_heads, hq // self.num_heads, -1, d)
        self._pending[layer] += torch.einsum("bhgtd,bhgte->hde", q, q)
        if layer == 0:
            self._pending_tokens = float(b * q.shape[3])

    def add(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], sink_tokens: int = 1) -> None:
        """Add one batch (every layer's ``(keys, values)``, ``[B, H, T, D]``); sinks are skipped."""
        flat = []  # [L][c] -> [B·T', H·D] float64
        for layer in kv[: self.num_layers]:
            flat.append([x[..., sink_tokens:, :].permute(0, 2, 1, 3).flatten(2).flatten(0, 1).double().cpu()
                         for x in layer])
        self.tokens += flat[0][0].shape[0]
        for layer, pair in enumerate(flat):
            for c, x in enumerate(pair):
                self.sums[layer, c] += x.sum(0)
                for o in range(min(self.max_offset, self.num_layers - 1 - layer) + 1):
                    self.products[o, layer, c] += x.T @ flat[layer + o][c]
        self.queries += self._pending
        self.query_tokens += self._pending_tokens
        self._pending.zero_()
        self._pending_tokens = 0.0

    def all_reduce(self) -> None:
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""
        all_reduce_sum((self.sums, self.products, self.tokens, self.queries, self.query_tokens))

    def covariance(self, layers: tuple[int, ...], component: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[k·H·D]`` and covariance ``[k·H·D, k·H·D]`` (float64) of the concatenated members."""
        k = len(layers)
        if layers[-1] - layers[0] > self.max_offset:
            raise ValueError(f"group {list(layers)} spans more than the {self.max_offset + 1} layers captured")
        n = self.tokens.clamp_min(1)
        mean = torch.cat([self.sums[layer, component] for layer in layers]) / n
        blocks = [[None] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                block = self.products[j - i, layers[i], component] / n
                blocks[i][j] = block
                blocks[j][i] = block.T
        second = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        cov = second - torch.outer(mean, mean)
        return mean, (cov + cov.T) / 2

    def query_weights(self, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(S, S⁻¹)`` ``[k, H, D, D]`` float64, ``S = W^{1/2}`` of the queries' ``W = E[q qᵀ]`` per
        member and KV head (ridged, scaled to mean eigenvalue 1), or None when no query was counted."""
        if float(self.query_tokens) <= 0:
            return None
        w = self.queries[list(layers)] / self.query_tokens
        d = w.shape[-1]
        scale = w.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-30)
        w = w / scale
        w = w + QUERY_RIDGE * w.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=w.dtype)
        values, vectors = torch.linalg.eigh((w + w.transpose(-1, -2)) / 2)
        values = values.clamp_min(1e-30)
        half = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
        inverse = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
        return half, inverse


def _descending_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(-1).clamp_min(0), vectors.flip(-1)


def fit_bases(stat: SecondMoments, layers: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Full bases of one group, per component (truncated to a rank by the low-rank method).

    Returns ``{component: {"mean": [k, H, D], "basis_joint": [k, H, D, k·H·D], "basis_each":
    [k, H, D, k·D], "spectrum_joint": [k·H·D], "spectrum_each": [H, k·D]}}``, float32, eigenvectors
    by descending variance (the spectra give the variance each rank keeps). Keys also get the
    query-weighted bases when queries were counted: ``"basis_query_<heads>"`` (the decoder
    ``S⁻¹ U``), ``"encoder_query_<heads>"`` (``S U``) and ``"spectrum_query_<heads>"`` (the logit
    energy each rank keeps), same shapes.
    """
    k, h, d = len(layers), stat.num_heads, stat.head_dim
    # per head: the rows of that head in every member
    index = torch.arange(k * h * d).reshape(k, h, d).permute(1, 0, 2).reshape(h, k * d)
    weights = stat.query_weights(tuple(layers))
    out = {}
    for c, name in enumerate(("keys", "values")):
        mean, cov = stat.covariance(tuple(layers), c)
        spectrum, vectors = _descending_eigh(cov)
        cov_h = cov[index.unsqueeze(-1), index.unsqueeze(-2)]  # [H, kD, kD]
        spectrum_h, vectors_h = _descending_eigh(cov_h)
        out[name] = {
            "mean": mean.reshape(k, h, d).float(),
            "basis_joint": vectors.reshape(k, h, d, k * h * d).float().contiguous(),
            "basis_each": vectors_h.reshape(h, k, d, k * d).permute(1, 0, 2, 3).float().contiguous(),
            "spectrum_joint": spectrum.float(),
            "spectrum_each": spectrum_h.float(),
        }
        if name == "keys" and weights is not None:
            out[name].update(_query_weighted(cov, weights, index, k, h, d))
    return out


def _query_weighted(cov: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor,
                    k: int, h: int, d: int) -> dict[str, torch.Tensor]:
    """The query-weighted encoders, decoders and spectra of one group's keys (module docstring)."""
    half, inverse = (torch.block_diag(*w.reshape(k * h, d, d)) for w in weights)  # [kHD, kHD]
    spectrum, u = _descending_eigh(half @ cov @ half)
    half_h = half[index.unsqueeze(-1), index.unsqueeze(-2)]  # [H, kD, kD] (block-diagonal per head)
    inverse_h = inverse[index.unsqueeze(-1), index.unsqueeze(-2)]
    spectrum_h, u_h = _descending_eigh(half_h @ cov[index.unsqueeze(-1), index.unsqueeze(-2)] @ half_h)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # [H, kD, kD] -> [k, H, D, kD]
        return x.reshape(h, k, d, k * d).permute(1, 0, 2, 3).float().contiguous()

    return {
        "basis_query_joint": (inverse @ u).reshape(k, h, d, k * h * d).float().contiguous(),
        "encoder_query_joint": (half @ u).reshape(k, h, d, k * h * d).float().contiguous(),
        "spectrum_query_joint": spectrum.float(),
        "basis_query_each": per_head(inverse_h @ u_h),
        "encoder_query_each": per_head(half_h @ u_h),
        "spectrum_query_each": spectrum_h.float(),
    }
