"""Merged groups inside vLLM: the store layer that owns a group's pages, and the members' attention.

Per merged group of layers ``l .. l+k−1`` (``docs/vllm-plugin-design.md``):

* :class:`StoreLayer`, a pseudo attention layer named ``model.layers.<l>.self_attn.minicache_store``,
  asks vLLM for one page per block of :class:`~minicache_vllm.layout.PageLayout` bytes. It is a full
  attention spec like the model's other layers, so vLLM puts it in their KV cache group: one block
  table, one block pool, and a page of its own size (vLLM counts every layer's page bytes).
* the members' ``self_attn.attn`` is replaced by :class:`MergedAttention`; they get no pages. Each
  step, member ``m`` attends its restored merged prefix (read from the pages and restored by
  minicache's own :class:`~minicache.runtime.store.ComponentStore`), its exact window
  (:class:`~minicache_vllm.windows.WindowPool`) and the step's tokens; the last member then merges
  every whole block that left the window (the same ``ComponentStore.merge`` the transformers runtime
  runs) and writes it into the pages.

In a quantized profile every other layer is served the same way (one store layer, one member:
:class:`~minicache_vllm.quantized.PagedQuantizedLayer`), its pages holding packed chunks.

Prefill steps restore each request's store; a step's decode rows are attended together, read a block at a
time from the stored form (:func:`~minicache_vllm.attention.decode_attention`): plain PyTorch on CPU, the
fused Triton decode kernel on the gathered batch where it reads the store (``MINICACHE_VLLM_DECODE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import FullAttentionSpec

from minicache_vllm.attention import DecodeRow, decode_attention, restored_attention
from minicache_vllm.layout import UnitLayout
from minicache_vllm.paged import DECODE_PATHS, PagedGroup, reads_blockwise, reads_fused
from minicache_vllm.quantized import PagedQuantizedLayer

__all__ = ["MergedAttention", "StoreLayer"]


# -- vLLM's view of a store layer ----------------------------------------------------------------
@dataclass
class StoreMetadata:
    """What the members need of a step: per request, its query rows, length and blocks (CPU tensors)."""

    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R]
    block_table: torch.Tensor  # [R, max blocks]
    num_actual_tokens: int


class StoreMetadataBuilder(AttentionMetadataBuilder[StoreMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM's base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StoreMetadata:
        m = common_attn_metadata
        return StoreMetadata(
            query_start_loc=m.query_start_loc_cpu.clone(),
            seq_lens=m.seq_lens.cpu().clone(),
            block_table=m.block_table_tensor.cpu().clone(),
            num_actual_tokens=m.num_actual_tokens,
        )


class StoreBackend(CPUAttentionBackend):
    """vLLM's handle on a store layer: CPU page shapes, our metadata (the members do the attention)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_builder_cls():
        return StoreMetadataBuilder


class StoreLayer(torch.nn.Module, AttentionLayerBase):
    """A store's pages (a merged group's, or a quantized layer's), as a layer vLLM allocates for (it
    computes nothing itself)."""

    def __init__(self, name: str, layout: UnitLayout, page_tokens: int):
        super().__init__()
        self.layer_name = name
        self.layout = layout
        self.page_tokens = page_tokens
        self.num_kv_heads = layout.heads
        self.num_heads = layout.heads
        self.head_size = layout.head_dim
        self.kv_cache = torch.tensor([])
        context = get_current_vllm_config().compilation_config.static_forward_context
        if name in context:
            raise ValueError(f"duplicate layer name {name}")
        context[name] = self

    def get_kv_cache_spec(self, vllm_config) -> FullAttentionSpec:
        return FullAttentionSpec(
            block_size=self.page_tokens, num_kv_heads=self.layout.heads, head_size=self.layout.head_dim,
            dtype=self.layout.dtype, state_content_bytes=self.layout.content_bytes(self.page_tokens),
        )

    def get_attn_backend(self):
        return StoreBackend

    def blocks(self) -> torch.Tensor:
        """The pages as ``[num_blocks, page bytes]`` uint8."""
        cache = self.kv_cache
        return cache.view(torch.uint8).view(cache.shape[0], -1)


# -- the members' attention -----------------------------------------------------------------------
class MergedAttention(torch.nn.Module):
    """Attention of one member of a merged group, or of an unmerged layer of a quantized profile (replaces
    vLLM's ``Attention`` there; no pages of its own: ``group`` reads and writes its store's).

    ``forward(q, k, v)`` takes and returns what vLLM's ``Attention`` does: ``q`` ``[T, Hq·D]``,
    ``k``/``v`` ``[T, H·D]``, output ``[T, Hq·D]``.

    ``decode``: how a step's decode rows (one new token each) attend, one of
    :data:`~minicache_vllm.paged.DECODE_PATHS`. ``"blockwise"`` reads the stored prefix a block at a time
    without restoring it whole (:func:`~minicache.runtime.blockwise.blockwise_decode_attention`: the query is
    turned into an aligned group's frame once instead of every token turned back, SLERP and low-rank stores
    are scored from their stored form, packed chunks dequantized a block at a time); ``"fused"`` hands the
    same views to the fused Triton decode kernel where it reads them; ``"restore"`` restores the whole prefix
    and runs SDPA, as prefill steps always do; ``"auto"`` (default) is ``"fused"`` where the kernels run on
    the queries' device without the interpreter (a GPU), else ``"blockwise"``, the faster path on CPU for
    every kind of store (``benchmarks/results/vllm-cpu/decode-paths.txt``).
    """

    def __init__(self, group: PagedGroup | PagedQuantizedLayer, member: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, scale: float, decode: str = "auto"):
        super().__init__()
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
        self.group = group
        self.member = member
        self.decode = decode
        self.blockwise = reads_blockwise(decode)
        self.fused: bool | None = None  # decided on the first decode step, from the queries' device
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(q)
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.group.layer_name)
        if metadata is None:  # vLLM's warm-up and profile runs
            return out
        g = self.group
        if self.member == 0:
            g.begin_step()
        n = metadata.num_actual_tokens
        H, D = self.num_kv_heads, self.head_dim
        q, k, v = q[:n].view(n, self.num_heads, D), k[:n].view(n, H, D), v[:n].view(n, H, D)
        starts = metadata.query_start_loc.tolist()
        lengths = metadata.seq_lens.tolist()
        rows, decoding = [], []
        for r, total in enumerate(lengths):
            lo, hi = starts[r], starts[r + 1]
            if hi <= lo:
                continue
            before = total - (hi - lo)
            table = metadata.block_table[r]
            rows.append((r, table, before, total))
            step = torch.stack([k[lo:hi], v[lo:hi]]).transpose(1, 2)  # [2, H, new, D]
            query = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, Hq, new, D]
            if hi - lo == 1:  # a decode step: attended with the step's other decode rows below
                decoding.append(DecodeRow(r, table, before, step, query))
                continue
            keys, values = g.member_kv(self.member, r, table, before, step)
            att = restored_attention(query, keys, values, before, self.scale)  # [1, Hq, new, D]
            out[lo:hi] = att[0].transpose(0, 1).reshape(hi - lo, -1).to(out.dtype)
        if decoding:
            if self.fused is None:
                self.fused = reads_fused(self.decode, q.device)
            att = decode_attention(g, self.member, decoding, self.blockwise, self.scale, self.fused)  # [R, Hq, D]
            at = torch.tensor([starts[d.row] for d in decoding], device=out.device)
            out[at] = att.reshape(len(decoding), -1).to(out.dtype)
        if self.member == g.members - 1:
            g.end_step(rows)
        return out
