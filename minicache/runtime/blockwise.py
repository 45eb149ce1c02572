"""Decode attention over a merged (and possibly packed) store in torch, one block of tokens at a time.

The torch path of `MiniCache` hands the model restored tensors: a layer's whole merged prefix is
restored (and, in a quantized store, dequantized) in the model dtype on every step. This module
is the alternative for machines without the Triton kernels (``enable_fused_attention(model,
backend="torch")``): an online softmax over blocks of ``block_tokens`` merged tokens, each restored
and dequantized only while it is attended (:meth:`MergedKVView.restored_block`), then the exact
residual window. Methods that can be attended in their stored form (``factored``: SLERP, low rank) are
never restored: the query is scored against their stored form (SLERP's shared directions scaled
per token, low rank's coefficients after one projection) and the output mapped back once per block
(:meth:`MergedKVView.scores_block`, :meth:`MergedKVView.values_block`). The largest
temporary is one block, not one layer. The math is float32 and
matches :func:`~minicache.runtime.kernels.reference.fused_decode_reference`.
"""

from __future__ import annotations

import math

import torch

from minicache.runtime.views import MergedKVView, decode_mask_bias

#: Merged tokens restored at a time at most (rounded up to a whole number of packed key groups). Fewer, larger
#: blocks spend less on per-operation overhead: SmolLM2, 2,048 tokens, 2 CPU cores, 4-bit KIVI decode steps
#: 0.076 / 0.061 / 0.052 s with blocks of 512 / 1,024 / 2,048 tokens (benchmarks/lowbit_decode.py --block-tokens).
DEFAULT_BLOCK_TOKENS = 2048
#: ... and fewer when one block of float32 vectors, ``[B, H, tokens, D]``, would take more than this (large batches
#: and heads): the largest temporaries stay a few blocks, not a layer.
BLOCK_BYTES = 4 << 20


def blockwise_decode_attention(
    query: torch.Tensor,
    keys: MergedKVView,
    values: MergedKVView,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    block_tokens: int | None = None,
) -> torch.Tensor:
    """Attention of one query token over a merged store, a block of the prefix at a time.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, Hq, 1, D]``; query heads ``h·G … h·G+G−1`` share KV head ``h``.
    keys, values : MergedKVView
        One layer's keys and values (merged or an unmerged quantized layer), ``[B, H, M + r, D]``
        logically.
    attention_mask : torch.Tensor, optional
        Decode mask, ``[B or 1, 1, 1, M + r]`` bool (True = attend) or additive float.
    scaling : float, optional
        Logit scale; default ``D ** -0.5``.
    block_tokens : int, optional
        Merged tokens restored at a time (default :data:`DEFAULT_BLOCK_TOKENS`, read at the call, fewer for
        large batches and heads: at most :data:`BLOCK_BYTES` of float32 vectors).

    Returns
    -------
    torch.Tensor
        ``[B, 1, Hq, D]`` in ``query.dtype`` (the layout transformers' attention functions return).
    """
    b, hq, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query token, got {q_len}")
    h = keys.residual.shape[1]
    if block_tokens is None:  # float32 [B, H, tokens, D] within BLOCK_BYTES
        block_tokens = max(1, min(DEFAULT_BLOCK_TOKENS, BLOCK_BYTES // (b * h * d * 4)))
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
    m_len, total = keys.merged_length, keys.shape[-2]
    if values.shape != keys.shape or hq % h:
        raise ValueError(f"query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
    group = hq // h
    scaling = d**-0.5 if scaling is None else scaling
    q = query.float().reshape(b, h, group, d) * scaling
    bias = decode_mask_bias(attention_mask, b, total)

    # Methods whose prefix lives in a per-head frame (aligned groups, as in the fused kernel): the
    # prefix stays in that frame, since q · (v Rᵀ) = (q R) · v, and the prefix's value numerator is
    # mapped back once at the end, instead of mapping every restored token back.
    q_prefix = q if keys.frame is None else keys.frame.query(q)

    running_max = torch.full((b, h, group), -math.inf, device=query.device)
    normaliser = torch.zeros(b, h, group, device=query.device)
    # Numerators of the merged prefix (aligned frame for aligned values) and of the exact window.
    acc = {part: torch.zeros(b, h, group, d, device=query.device) for part in ("prefix", "window")}

    def attend(logits: torch.Tensor, start: int, numerator, part: str) -> None:
        nonlocal running_max, normaliser
        if bias is not None:
            logits = logits + bias[:, None, None, start : start + logits.shape[-1]]
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        # Rows with nothing attended yet keep -inf: shift by 0 there, so that exp gives 0, not NaN.
        shift = torch.where(torch.isinf(new_max), 0.0, new_max)
        alpha = torch.exp(running_max - shift)
        probs = torch.exp(logits - shift.unsqueeze(-1))
        normaliser = normaliser * alpha + probs.sum(dim=-1)
        for name in acc:
            acc[name] = acc[name] * alpha.unsqueeze(-1)
        acc[part] = acc[part] + numerator(probs)
        running_max = new_max

    # Blocks start at multiples of the packed key groups (those cannot be split). Each block is read
    # through the views: restored and attended, or (factored methods: SLERP, low rank) scored and
    # summed from the stored form, the query and the output projected once per block.
    align = max(keys.block_alignment, values.block_alignment)
    block = -(-block_tokens // align) * align
    for start in range(0, m_len, block):
        end = min(start + block, m_len)
        attend(keys.scores_block(q_prefix, start, end), start,
               lambda p, s=start, e=end: values.values_block(p, s, e), "prefix")
    if keys.residual.shape[-2]:
        window_v = values.residual.float()
        attend(torch.einsum("bhgd,bhnd->bhgn", q, keys.residual.float()), m_len,
               lambda p: torch.einsum("bhgn,bhnd->bhgd", p, window_v), "window")
    prefix = acc["prefix"] if values.frame is None else values.frame.output(acc["prefix"])
    out = (prefix + acc["window"]) / normaliser.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return out.reshape(b, hq, d).unsqueeze(1).to(query.dtype)
