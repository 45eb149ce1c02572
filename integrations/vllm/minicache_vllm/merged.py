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

This is the reference path: plain torch, one request at a time, correct before fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import FullAttentionSpec

from minicache.runtime.store import ComponentStore, GroupStore
from minicache_vllm.layout import COMPONENTS, PageLayout, RetainedBlock
from minicache_vllm.windows import WindowPool

logger = init_logger("vllm.minicache_vllm")

__all__ = ["GroupRuntime", "MergedAttention", "StoreLayer", "merged_length"]


def merged_length(tokens: int, residual_length: int, block_size: int) -> int:
    """Tokens of a sequence of ``tokens`` that the transformers runtime has merged after a step.

    It merges whole blocks once the exact window reaches ``residual_length + block_size``, so the
    merged length is ``(tokens − residual_length)`` rounded down to blocks (0 before that).
    """
    return max(0, (tokens - residual_length) // block_size * block_size)


# -- vLLM's view of a store layer ----------------------------------------------------------------
@dataclass
class StoreMetadata:
    """What the members need of a step: per request, its query rows, length and blocks (CPU tensors)."""

    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R]
    block_table: torch.Tensor  # [R, max blocks]
    num_actual_tokens: int


class StoreMetadataBuilder(AttentionMetadataBuilder[StoreMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
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
    """A merged group's pages, as a layer vLLM allocates for (it computes nothing itself)."""

    def __init__(self, name: str, layout: PageLayout, page_tokens: int):
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


# -- one group ------------------------------------------------------------------------------------
class GroupRuntime:
    """One merged group: its settings (from minicache's own store), pages, windows and step state.

    Parameters
    ----------
    template : GroupStore
        The group's store as :class:`minicache.MiniCache` builds it from the profile (settings and
        the method's sidecar tensors; it never holds tokens here).
    store : StoreLayer
    pool : WindowPool
    """

    def __init__(self, template: GroupStore, store: StoreLayer, pool: WindowPool):
        self.template = template
        self.layers = template.layers
        self.members = len(template.layers)
        self.residual_length = template.residual_length
        self.block_size = template.block_size
        self.store = store
        self.layout = store.layout
        self.pool = pool
        self.blocks_per_page = self.layout.merge_blocks_per_page(store.page_tokens)
        self._stash: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._slots: dict[int, int] = {}  # batch row -> window slot, this step
        self.dropped = 0  # retained entries left out because a merge block had no room (logged)

    # -- pages ------------------------------------------------------------------------------------
    def _merge_block(self, pages: torch.Tensor, table: torch.Tensor, index: int) -> torch.Tensor:
        page = int(table[index // self.blocks_per_page])
        start = (index % self.blocks_per_page) * self.layout.block_bytes
        return pages[page, start : start + self.layout.block_bytes]

    def restored(self, member: int, table: torch.Tensor, merged: int,
                 exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``member``'s keys and values ``[1, H, merged + n, D]``: its restored merged prefix
        (``merged`` tokens, from the pages) then ``exact`` ``[2, H, n, D]``."""
        out = []
        fields, retained = ({}, {})
        if merged:
            pages = self.store.blocks()
            blocks = torch.stack([self._merge_block(pages, table, j) for j in range(merged // self.block_size)])
            fields, retained = self.layout.read(blocks)
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name].fresh()
            comp.residual[member] = exact[c].unsqueeze(0)
            if merged:
                for field, x in fields[name].items():
                    comp.fields[field].dense = x
                comp.length = merged
                comp.retained_index = retained[name].index
                comp.retained_value = retained[name].value
            out.append(comp.restored(member))
        return out[0], out[1]

    def merge(self, table: torch.Tensor, start: int, xs: torch.Tensor, count: int) -> None:
        """Merge the first ``count`` tokens of ``xs`` ``[2, k, H, n, D]`` (tokens from ``start`` on,
        ``start`` a multiple of the merge block) into the pages."""
        n = xs.shape[-2]
        real = torch.ones(1, n, dtype=torch.bool, device=xs.device)
        before = torch.tensor([start], device=xs.device)
        stored: dict[str, dict[str, torch.Tensor]] = {}
        kept: dict[str, RetainedBlock] = {}
        comps: dict[str, ComponentStore] = {}
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name].fresh()
            comp.residual = [xs[c, m].unsqueeze(0) for m in range(self.members)]
            comp.merge(count, self.block_size, real, before)
            stored[name] = {f: s.dense[0] for f, s in comp.fields.items()}  # [H, count, w]
            kept[name] = RetainedBlock(comp.retained_index, comp.retained_value)
            comps[name] = comp
        pages = self.store.blocks()
        bs = self.block_size
        sink_tokens = {name: self.template.components[name].settings.sink_tokens for name in COMPONENTS}
        for j in range(count // bs):
            lo, hi = j * bs, (j + 1) * bs
            fields = {name: {f: x[:, lo:hi] for f, x in stored[name].items()} for name in COMPONENTS}
            retained, sinks = {}, {}
            for name in COMPONENTS:
                idx, val = kept[name].index, kept[name].value
                inside = (idx[:, 2] >= lo) & (idx[:, 2] < hi)
                local = idx[inside].clone()
                local[:, 2] -= lo
                retained[name] = RetainedBlock(local, val[inside])
                sinks[name] = (idx[inside][:, 2] + start) < sink_tokens[name]
            room = self.layout.retained_capacity
            unmarked = None
            if sum(r.index.shape[0] for r in retained.values()) > room:
                unmarked = self._unmarked(xs, lo, hi)
            dropped = self.layout.write(self._merge_block(pages, table, (start + lo) // bs), fields, retained,
                                        unmarked, sinks)
            if dropped:
                self.dropped += dropped
                logger.info("minicache_vllm: layers %s: a merge block retained %d entries more than its room (%d); "
                            "%d left out so far", list(self.layers), dropped, room, self.dropped)

    def _unmarked(self, xs: torch.Tensor, lo: int, hi: int) -> dict[str, dict[str, torch.Tensor]]:
        """The block's stored fields without retention flags (to restore entries a full block leaves out)."""
        out = {}
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name]
            members = [xs[c, m, :, lo:hi].unsqueeze(0) for m in range(self.members)]
            encoded = comp.method.encode(comp.params, members, comp.tensors_on_device())
            dtype = xs.dtype
            out[name] = {f.name: encoded.fields[f.name][0].to(f.storage_dtype(dtype)) for f in comp.method.fields}
        return out


# -- the members' attention -----------------------------------------------------------------------
class MergedAttention(torch.nn.Module):
    """Attention of one member of a merged group (replaces vLLM's ``Attention`` there; no pages of its own).

    ``forward(q, k, v)`` takes and returns what vLLM's ``Attention`` does: ``q`` ``[T, Hq·D]``,
    ``k``/``v`` ``[T, H·D]``, output ``[T, Hq·D]``.
    """

    def __init__(self, group: GroupRuntime, member: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float):
        super().__init__()
        self.group = group
        self.member = member
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(q)
        context = get_forward_context()
        metadata = context.attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.group.store.layer_name)
        if metadata is None:  # vLLM's warm-up and profile runs
            return out
        g = self.group
        if self.member == 0:
            g.pool.next_step()
            g._stash = {}
            g._slots = {}
        T = metadata.num_actual_tokens
        H, D = self.num_kv_heads, self.head_dim
        q = q[:T].view(T, self.num_heads, D)
        k = k[:T].view(T, H, D)
        v = v[:T].view(T, H, D)
        starts = metadata.query_start_loc.tolist()
        lengths = metadata.seq_lens.tolist()
        stash = g._stash.setdefault(self.member, [])
        for r in range(len(lengths)):
            lo, hi = starts[r], starts[r + 1]
            if hi <= lo:
                continue
            total, new = lengths[r], hi - lo
            before = total - new
            table = metadata.block_table[r]
            if self.member == 0:
                g._slots[r] = g.pool.slot(int(table[0]), before)
            slot = g._slots[r]
            merged = merged_length(before, g.residual_length, g.block_size)
            window = g.pool.read(slot)[:, self.member]  # [2, H, before - merged, D]
            step = torch.stack([k[lo:hi], v[lo:hi]]).transpose(1, 2)  # [2, H, new, D]
            stash.append(step)
            keys, values = g.restored(self.member, table, merged, torch.cat([window, step], dim=-2))
            query = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, Hq, new, D]
            # Causal: query i (position before + i) sees keys 0 .. before + i.
            mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=before)
            att = F.scaled_dot_product_attention(query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True)
            out[lo:hi] = att[0].transpose(0, 1).reshape(new, -1).to(out.dtype)
        if self.member == g.members - 1:
            self._merge_and_slide(metadata)
        return out

    def _merge_and_slide(self, metadata: StoreMetadata) -> None:
        """After the last member: merge whole blocks that left every window, keep the rest exact."""
        g = self.group
        starts = metadata.query_start_loc.tolist()
        lengths = metadata.seq_lens.tolist()
        rows = [r for r in range(len(lengths)) if starts[r + 1] > starts[r]]
        for i, r in enumerate(rows):
            total = lengths[r]
            new = starts[r + 1] - starts[r]
            slot = g._slots[r]
            before = total - new
            merged_before = merged_length(before, g.residual_length, g.block_size)
            merged_after = merged_length(total, g.residual_length, g.block_size)
            steps = torch.stack([g._stash[m][i] for m in range(g.members)], dim=1)  # [2, k, H, new, D]
            xs = torch.cat([g.pool.read(slot), steps], dim=-2)  # tokens merged_before .. total
            count = merged_after - merged_before
            if count:
                g.merge(metadata.block_table[r], merged_before, xs, count)
            g.pool.write(slot, xs[..., count:, :].clone())
        g._stash = {}
