"""Torch reference of the fused decode attention: restore the merged store, then softmax attention."""

from __future__ import annotations

import torch

from minicache.runtime.views import MergedKVView, decode_mask_bias


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
