"""Torch reference of the fused decode attention: restore the merged store, then softmax attention."""

from __future__ import annotations

import torch

from minicache.runtime.cache import MergedKVView


def decode_mask_row(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The query row of a decode-step attention mask, as ``[B, T]``.

    Parameters
    ----------
    attention_mask : torch.Tensor or None
        ``[B or 1, 1, 1, T]`` boolean (True = attend) or additive float mask, as transformers builds
        it for one query token, or a ``[B, T]`` row already; None when every position is attended.
    batch, length : int
        ``B`` and the key length ``T`` the mask must cover.

    Returns
    -------
    torch.Tensor or None
        ``[B, T]`` view (bool or float), or None.
    """
    if attention_mask is None:
        return None
    row = attention_mask
    if row.dim() == 4:
        if row.shape[1] != 1 or row.shape[2] != 1:
            raise ValueError(f"expected a [B, 1, 1, T] decode mask, got {tuple(row.shape)}")
        row = row[:, 0, 0, :]
    if row.dim() != 2 or row.shape[-1] != length:
        raise ValueError(f"mask of shape {tuple(attention_mask.shape)} does not cover {length} key positions")
    return row.expand(batch, length)


def decode_mask_bias(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The decode mask as an additive float32 bias ``[B, T]`` (0 / -inf for boolean masks), or None."""
    row = decode_mask_row(attention_mask, batch, length)
    if row is None:
        return None
    return torch.where(row, 0.0, -torch.inf) if row.dtype == torch.bool else row.float()


def fused_decode_reference(
    query: torch.Tensor,
    keys: MergedKVView,
    values: MergedKVView,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    use_magnitude: bool = True,
) -> torch.Tensor:
    """Attention of one query token over a merged store, by materialising it (float32 math).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, Hq, 1, D]``; ``Hq`` a multiple of the store's ``H`` (query heads ``h·G … h·G+G−1``
        share KV head ``h``, as transformers' ``repeat_kv`` lays them out).
    keys, values : MergedKVView
        One member layer's keys and values.
    attention_mask : torch.Tensor, optional
        Decode mask (see :func:`decode_mask_row`).
    scaling : float, optional
        Logit scale; default ``D ** -0.5``.
    use_magnitude : bool
        False: reference of the benchmark's no-magnitude kernel variant (attention over the stored
        directions as they are, then the residual window; retained tokens ignored).

    Returns
    -------
    torch.Tensor
        ``[B, 1, Hq, D]`` in ``query.dtype`` (the layout transformers' attention functions return).
    """
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query token, got {q_len}")
    if use_magnitude:
        k, v = keys.materialize(), values.materialize()
    else:
        k, v = (
            view.residual if view.merged_length == 0 else torch.cat([view.full_direction(), view.residual], dim=-2)
            for view in (keys, values)
        )
    h = k.shape[1]
    group = hq // h
    scaling = d**-0.5 if scaling is None else scaling
    q = query.float().reshape(b, h, group, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", q, k.float()) * scaling
    bias = decode_mask_bias(attention_mask, b, k.shape[-2])
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v.float())
    return out.reshape(b, hq, d).unsqueeze(1).to(query.dtype)
