"""A merged group's store in pages: merge whole blocks into them, restore a member from them.

This is the part of the vLLM plugin that does not need vLLM: the pages are any ``[num_blocks, bytes]``
uint8 tensor and a request's blocks a row of block ids, so minicache's own tests check it against
the transformers runtime (:class:`minicache.runtime.store.GroupStore`) step by step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from minicache.runtime.store import GroupStore
from minicache_vllm.layout import COMPONENTS, PageLayout, RetainedBlock
from minicache_vllm.windows import WindowPool, merged_length

logger = logging.getLogger("vllm.minicache_vllm")

__all__ = ["PagedGroup"]


class PagedGroup:
    """One merged group: its settings (from minicache's own store), pages, windows and step state.

    Parameters
    ----------
    template : GroupStore
        The group's store as :class:`minicache.MiniCache` builds it from the profile (settings and
        the method's sidecar tensors; it never holds tokens here).
    layout : PageLayout
    pool : WindowPool
    page_tokens : int
        Tokens per page (vLLM's block size; a multiple of the merge block).
    pages : callable
        Returns the pages, ``[num_blocks, page bytes]`` uint8 (vLLM binds them after the model is built).
    layer_name : str
        The store layer's name (its metadata's key in vLLM's forward context).
    """

    def __init__(self, template: GroupStore, layout: PageLayout, pool: WindowPool, page_tokens: int,
                 pages: Callable[[], torch.Tensor], layer_name: str = ""):
        self.template = template
        self.layers = template.layers
        self.members = len(template.layers)
        self.residual_length = template.residual_length
        self.block_size = template.block_size
        self.layout = layout
        self.pool = pool
        self.pages = pages
        self.layer_name = layer_name
        self.blocks_per_page = layout.merge_blocks_per_page(page_tokens)
        self._stash: dict[int, dict[int, torch.Tensor]] = {}  # member -> batch row -> [2, H, n, D], this step
        self._slots: dict[int, int] = {}  # batch row -> window slot, this step
        self._reads: dict[tuple[int, int], tuple] = {}  # (first block, merged) -> layout.read, this step
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
        fields, retained = self._read(table, merged) if merged else ({}, {})
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

    def _read(self, table: torch.Tensor, merged: int):
        """The stored form of a request's first ``merged`` tokens, read once per step for all members
        (merging happens after the last member, so they all read the same pages)."""
        key = (int(table[0]), merged)
        if key not in self._reads:
            pages = self.pages()
            blocks = torch.stack([self._merge_block(pages, table, j) for j in range(merged // self.block_size)])
            self._reads[key] = self.layout.read(blocks)
        return self._reads[key]

    def merge(self, table: torch.Tensor, start: int, xs: torch.Tensor, count: int) -> None:
        """Merge the first ``count`` tokens of ``xs`` ``[2, k, H, n, D]`` (tokens from ``start`` on,
        ``start`` a multiple of the merge block) into the pages."""
        n = xs.shape[-2]
        real = torch.ones(1, n, dtype=torch.bool, device=xs.device)
        before = torch.tensor([start], device=xs.device)
        stored: dict[str, dict[str, torch.Tensor]] = {}
        kept: dict[str, RetainedBlock] = {}
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name].fresh()
            comp.residual = [xs[c, m].unsqueeze(0) for m in range(self.members)]
            comp.merge(count, self.block_size, real, before)
            stored[name] = {f: s.dense[0] for f, s in comp.fields.items()}  # [H, count, w]
            kept[name] = RetainedBlock(comp.retained_index, comp.retained_value)
        pages = self.pages()
        bs = self.block_size
        for j in range(count // bs):
            lo, hi = j * bs, (j + 1) * bs
            fields = {name: {f: x[:, lo:hi] for f, x in stored[name].items()} for name in COMPONENTS}
            retained = {}
            for name in COMPONENTS:
                idx, val = kept[name].index, kept[name].value
                inside = (idx[:, 2] >= lo) & (idx[:, 2] < hi)
                local = idx[inside].clone()
                local[:, 2] -= lo
                retained[name] = RetainedBlock(local, val[inside])
            room = self.layout.retained_capacity
            unmarked = None
            if sum(r.index.shape[0] for r in retained.values()) > room:
                unmarked = self._unmarked(xs, lo, hi)
            dropped = self.layout.write(self._merge_block(pages, table, (start + lo) // bs), fields, retained,
                                        unmarked)
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

    # -- a step ---------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Before the first member of an engine step."""
        self.pool.next_step()
        self._stash = {}
        self._slots = {}
        self._reads = {}

    def member_kv(self, member: int, row: int, table: torch.Tensor, before: int,
                  step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[1, H, before + n, D]`` member ``member`` attends for one request.

        Parameters
        ----------
        row : int
            The request's row in the step's batch.
        table : torch.Tensor
            Its block ids (the first one keys its window).
        before : int
            Its tokens before this step.
        step : torch.Tensor
            ``[2, H, n, D]``: this step's keys and values of the request at this member.
        """
        if member == 0:
            self._slots[row] = self.pool.slot(int(table[0]), before)
        slot = self._slots[row]
        self._stash.setdefault(member, {})[row] = step
        merged = merged_length(before, self.residual_length, self.block_size)
        window = self.pool.read(slot)[:, member]  # [2, H, before - merged, D]
        return self.restored(member, table, merged, torch.cat([window, step], dim=-2))

    def end_step(self, rows: list[tuple[int, torch.Tensor, int, int]]) -> None:
        """After the last member: merge the whole blocks that left every window, keep the rest exact.

        ``rows``: ``(row, block ids, tokens before the step, tokens after)`` of each request in the step.
        """
        for row, table, before, total in rows:
            slot = self._slots[row]
            merged_before = merged_length(before, self.residual_length, self.block_size)
            merged_after = merged_length(total, self.residual_length, self.block_size)
            steps = torch.stack([self._stash[m][row] for m in range(self.members)], dim=1)  # [2, k, H, n, D]
            xs = torch.cat([self.pool.read(slot), steps], dim=-2)  # tokens merged_before .. total
            count = merged_after - merged_before
            if count:
                self.merge(table, merged_before, xs, count)
            self.pool.write(slot, xs[..., count:, :].clone())
        self._stash = {}
        self._reads = {}
