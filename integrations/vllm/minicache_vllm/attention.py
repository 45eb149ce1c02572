"""The attention of a store's member for one engine step: prefill rows per request, decode rows batched.

Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minicache.runtime.attention import decode_views
from minicache.runtime.views import MergedKVView

__all__ = ["DecodeRow", "attend_views", "attention_dtype", "decode_attention", "restored_attention"]


def attention_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype the restore path attends ``rows`` query rows of a request in.

    A decode step (one row) on CPU: float32. torch's CPU SDPA for one bfloat16 query row is several times
    slower than in float32 on a CPU without native bf16 instructions (one thread, 9 query heads: 0.81 vs
    0.18 ms over 600 tokens, 2.7 vs 1.9 ms over 2,048, upcasts included), and the blockwise path already
    computes in float32. Prefill rows and GPUs: the model's dtype (512 bf16 rows over 512 tokens ran no
    faster upcast: 8.1 vs 9.7 ms).
    """
    return torch.float32 if device.type == "cpu" and rows == 1 else dtype


def restored_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, before: int,
                       scale: float) -> torch.Tensor:
    """Causal attention of a request's new tokens over everything it has.

    Parameters
    ----------
    query : torch.Tensor
        ``[1, Hq, n, D]``: the step's ``n`` query rows; query heads ``h·G … h·G+G−1`` share KV head ``h``.
    keys, values : torch.Tensor
        ``[1, H, before + n, D]`` restored (the stored prefix, then the step's tokens).
    before : int
        Tokens before the step: query ``i`` (position ``before + i``) sees keys ``0 .. before + i``.
    scale : float
        Logit scale.

    Returns
    -------
    torch.Tensor
        ``[1, Hq, n, D]`` in ``query.dtype``.
    """
    n, total = query.shape[-2], keys.shape[-2]
    compute = attention_dtype(query.dtype, query.device, n)
    # a decode step (one row) sees every key: no mask, which also lets SDPA take its fastest kernel
    mask = None if n == 1 else torch.ones(n, total, dtype=torch.bool, device=query.device).tril(diagonal=before)
    out = F.scaled_dot_product_attention(query.to(compute), keys.to(compute), values.to(compute), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.to(query.dtype)


@dataclass
class DecodeRow:
    """One request's decode row in a step.

    Attributes
    ----------
    row : int
        The request's row in the step's batch.
    table : torch.Tensor
        Its block ids.
    before : int
        Its tokens before the step.
    step : torch.Tensor
        ``[2, H, 1, D]``: the step's key and value at this member.
    query : torch.Tensor
        ``[1, Hq, 1, D]``.
    """

    row: int
    table: torch.Tensor
    before: int
    step: torch.Tensor
    query: torch.Tensor


#: Bytes of padded keys and values (in the attention dtype) one batched call may hold: requests beyond it
#: go to the next call, so a large batch of long requests never holds a whole step's prefixes at once.
STACK_BYTES = 64 * 2**20


def attend_views(query: torch.Tensor, keys: MergedKVView, values: MergedKVView, mask: torch.Tensor | None,
                 scale: float, fused: bool = False) -> torch.Tensor:
    """Decode attention read from stored views a block at a time, never restoring the whole prefix
    (:func:`minicache.runtime.attention.decode_views`: with ``fused``, the fused Triton decode kernel where it
    reads these views and can run on their device, else the blockwise torch path, the reason logged once).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, Hq, 1, D]``.
    keys, values : MergedKVView
        ``[B, H, T, D]`` logically.
    mask : torch.Tensor, optional
        ``[B, 1, 1, T]`` bool, True where a key is attended (padding of a stacked batch is False).
    scale : float

    Returns
    -------
    torch.Tensor
        ``[B, Hq, D]`` in the query's dtype.
    """
    return decode_views(query, keys, values, mask, scale, fused=fused)[:, 0]


def decode_attention(store, member: int, rows: list[DecodeRow], blockwise: bool, scale: float,
                     fused: bool = False) -> torch.Tensor:
    """Attention of every decode row of a step at member ``member`` of ``store``, batched.

    ``store`` is a :class:`~minicache_vllm.paged.PagedGroup` or a
    :class:`~minicache_vllm.quantized.PagedQuantizedLayer`. ``blockwise``: every request's stored prefix is
    read into one padded batch of views, once per step for all of a group's members (``stacked_views``:
    one gather of every request's units; a packed group's merged tails, which do not fill a unit yet,
    merged again per request), and attended a block at a time in one call; stores that cannot stack
    (:attr:`~minicache_vllm.paged.PagedGroup.stacks_decode_rows` false: closed-loop methods, tails packed in
    part) are attended request by request.
    Otherwise the rows are restored into one padded batch and attended in one masked SDPA call (float32 on
    CPU, :func:`attention_dtype`): a packed unmerged layer restores every request's chunks at once
    (:meth:`~minicache_vllm.quantized.PagedQuantizedLayer.restored_rows`), a group one request at a time.
    Requests go in chunks of at most :data:`STACK_BYTES` of padded keys and values.
    ``fused`` (with ``blockwise``): the views go to the fused Triton decode kernel where it reads them
    (:func:`attend_views`).

    Returns
    -------
    torch.Tensor
        ``[len(rows), Hq, D]`` in the queries' dtype.
    """
    _, h, _, d = rows[0].step.shape
    compute = attention_dtype(rows[0].query.dtype, rows[0].query.device, 1)
    per_token = 2 * h * d * torch.empty((), dtype=compute).element_size()
    out, chunk, longest = [], [], 0
    for r in rows:
        longest = max(longest, r.before + 1)
        if chunk and (len(chunk) + 1) * longest * per_token > STACK_BYTES:
            out.append(_decode_chunk(store, member, chunk, blockwise, scale, fused))
            chunk, longest = [], r.before + 1
        chunk.append(r)
    out.append(_decode_chunk(store, member, chunk, blockwise, scale, fused))
    return torch.cat(out)


def _decode_chunk(store, member: int, rows: list[DecodeRow], blockwise: bool, scale: float,
                  fused: bool) -> torch.Tensor:
    query = torch.cat([r.query for r in rows])  # [R, Hq, 1, D]
    if blockwise and len(rows) > 1 and store.stacks_decode_rows:
        # read from the pages into one padded batch, once per step for all members
        keys, values, mask = store.stacked_views(member, [(r.row, r.table, r.before, r.step) for r in rows])
        return attend_views(query, keys, values, mask[:, None, None, :], scale, fused)
    if blockwise:  # one request, or a store whose requests' prefixes do not stack
        return torch.cat([attend_views(r.query, *store.member_views(member, r.row, r.table, r.before, r.step), None,
                                       scale, fused) for r in rows])
    compute = attention_dtype(query.dtype, query.device, 1)
    if len(rows) > 1 and store.restores_decode_rows:  # one restore of every request's packed prefix
        keys, values, mask = store.restored_rows(member, [(r.row, r.table, r.before, r.step) for r in rows])
        mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query.to(compute), keys.to(compute), values.to(compute), attn_mask=mask,
                                             scale=scale, enable_gqa=True)
        return out[:, :, 0].to(query.dtype)
    # Each request restored straight into the padded batch (its length is known: before + 1), so a chunk
    # holds one request's restore beside the batch, not every request's.
    lengths = [r.before + 1 for r in rows]
    total = max(lengths)
    _, h, _, d = rows[0].step.shape
    keys = query.new_zeros(len(rows), h, total, d, dtype=compute)
    values = torch.zeros_like(keys)
    for i, r in enumerate(rows):
        k, v = store.member_kv(member, r.row, r.table, r.before, r.step)
        keys[i, :, : lengths[i]] = k[0]
        values[i, :, : lengths[i]] = v[0]
    # no padding (one request, or equal lengths): no mask, which lets SDPA take its fastest kernel
    mask = None
    if min(lengths) < total:
        mask = (torch.arange(total, device=query.device) < torch.tensor(lengths, device=query.device).unsqueeze(1))
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(query.to(compute), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, 0].to(query.dtype)
