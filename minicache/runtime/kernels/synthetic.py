"""Random merged stores in the runtime's exact layout (SLERP's), for kernel tests and benchmarks (no triton needed)."""

from __future__ import annotations

import dataclasses

import torch

from minicache.methods import get_method
from minicache.methods.base import Frame, magnitude_dtype
from minicache.methods.slerp import RETAINED_MAGNITUDE
from minicache.quant import get_quantizer
from minicache.runtime.views import FieldSnapshot, MergedKVView, retained_csr_pair


def random_merged_views(
    batch: int,
    kv_heads: int,
    merged: int,
    residual: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    retained: float | torch.Tensor = 0.05,
    member: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[MergedKVView, MergedKVView]:
    """Keys and values of one member layer of a random merged pair, as the store holds them.

    Parameters
    ----------
    batch, kv_heads, merged, residual, head_dim : int
        ``B``, ``H``, merged prefix length ``M``, residual window ``r``, ``D``.
    dtype : torch.dtype
        Model dtype (directions, residual, retained vectors); magnitudes use the store's rule.
    device : torch.device or str
    retained : float or torch.Tensor
        Fraction of merged tokens retained, one number or ``[B, H]`` per row (ragged retention;
        0 gives rows without retained tokens). Keys and values draw their retained sets independently.
    member : int
        Which layer of the pair the views describe.
    seed : int
    shuffle : bool
        Store the COO list in random order (the store only sorts within each merge call).

    Returns
    -------
    tuple of MergedKVView
        Keys and values, ``[B, H, M + r, D]`` logically.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    rate = torch.as_tensor(retained, dtype=torch.float32, device=device).expand(batch, kv_heads)
    parts = []
    for _ in range(2):
        e = torch.randn(batch, kv_heads, merged, head_dim, generator=g, device=device)
        e = (e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)).to(dtype)
        mag = torch.rand(batch, kv_heads, merged, 2, generator=g, device=device) * 3.0 + 0.5
        keep = torch.rand(batch, kv_heads, merged, generator=g, device=device) < rate.unsqueeze(-1)
        mag = mag.masked_fill(keep.unsqueeze(-1), RETAINED_MAGNITUDE).to(magnitude_dtype(dtype))
        index = keep.nonzero()
        if shuffle:
            index = index[torch.randperm(index.shape[0], generator=g, device=device)]
        index = index.to(torch.int32)
        value = (torch.randn(index.shape[0], 2, head_dim, generator=g, device=device) * 2.0).to(dtype)
        window = torch.randn(batch, kv_heads, residual, head_dim, generator=g, device=device).to(dtype)
        parts.append((e, mag, index, value, window))
    csr = retained_csr_pair(parts[0][2], parts[1][2], batch, kv_heads)
    slerp = get_method("slerp")
    return tuple(
        MergedKVView(
            member=member,
            residual=window,
            stored={"direction": FieldSnapshot(dense=e), "magnitude": FieldSnapshot(dense=mag)} if merged else {},
            method=slerp,
            params=slerp.params(),
            retained_value=value if merged else None,
            retained=c if merged else None,
        )
        for (e, mag, _, value, window), c in zip(parts, csr, strict=True)
    )


def with_rotation(view: MergedKVView, rotation: torch.Tensor) -> MergedKVView:
    """The same store in an aligned frame: the view's member has alignment ``rotation`` ``[H, D, D]``
    (the other member the identity), so its vectors are ``m · e Rᵀ``."""
    h, d = rotation.shape[0], rotation.shape[-1]
    eye = torch.eye(d, dtype=torch.float32, device=rotation.device).expand(h, d, d)
    stacked = torch.stack([rotation.float() if i == view.member else eye for i in range(2)])
    params = dataclasses.replace(view.params, align=True)
    return dataclasses.replace(view, params=params, tensors={"rotation": stacked}, frame=Frame(stacked[view.member]))


def quantize_views(
    keys: MergedKVView,
    values: MergedKVView,
    bits: int,
    *,
    key_group: int = 32,
    value_group: int = 32,
    key_tail: int = 0,
) -> tuple[MergedKVView, MergedKVView]:
    """Pack random merged views the way a quantized store does (KIVI, :mod:`minicache.quant.kivi`).

    Key directions are packed per channel in groups of ``key_group`` tokens except the newest
    ``key_tail`` tokens (which must leave a whole number of groups packed); value directions per
    token in groups of ``value_group`` channels; retained vectors of both per token.

    Returns
    -------
    tuple of MergedKVView
        Keys and values holding packed parts (``qdirection``, ``retained_q``) instead of dense ones.
    """
    from minicache.quant import quantize

    if keys.direction is None:
        return keys, values
    m = keys.direction.shape[-2]
    if (m - key_tail) % key_group:
        raise ValueError(f"{m - key_tail} packed key tokens are not a whole number of groups of {key_group}")
    out = []
    layouts = ((keys, m - key_tail, key_group, "tokens"), (values, m, value_group, "channels"))
    for view, packed_tokens, group, axis in layouts:
        qdir = quantize(view.direction[..., :packed_tokens, :], bits, group, axis) if packed_tokens else None
        tail = view.direction[..., packed_tokens:, :].contiguous() if packed_tokens < m else None
        rq = quantize(view.retained_value, bits, value_group, "channels")
        stored = {**view.stored, "direction": FieldSnapshot(packed=qdir, dense=tail)}
        out.append(dataclasses.replace(view, stored=stored, retained_value=None, retained_q=rq,
                                       quantizer=get_quantizer("kivi"), bits=bits))
    return out[0], out[1]
