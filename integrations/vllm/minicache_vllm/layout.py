"""The bytes of a merged group's page: what one vLLM block of a merged store holds, and how to read it.

vLLM gives every layer of a KV cache group one page per block of ``block_size`` tokens, a
``[heads, block_size, C]``-byte cell grid that it only counts (``state_content_bytes = C``). A merged
group's store layer uses its page as plain bytes, one *merge block* (the profile's ``block_size``
tokens) after the other, each laid out as:

* every stored field of the group's method, keys then values, ``[heads, tokens, width]`` in its
  storage dtype (SLERP: the shared ``direction`` ``[D]`` in the model dtype and the ``magnitude`` of
  each member ``[k]`` in fp16), exactly what :class:`minicache.runtime.store.ComponentStore` holds;
* the tokens retention keeps exact, pooled over heads and keys/values: a count (int32), then up to
  ``retained_capacity`` entries of ``(component, head, token)`` (int16 each) and the ``k`` members'
  exact vectors ``[k, D]`` in the model dtype.

The transformers runtime keeps as many retained tokens as retention picks; a page has room for a
fixed number per merge block, ``retained_capacity``. A block that retains more keeps the earliest
tokens (the sinks first) and restores the others from the merged form (:meth:`PageLayout.write`
returns how many it dropped, so callers can count them).

Nothing here imports vLLM: the layout is tested in minicache's own environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minicache.methods.base import MergeMethod, MethodParams

__all__ = ["COMPONENTS", "FieldSlot", "PageLayout", "RetainedBlock"]

#: A merged group's two components, in page order (their index is the ``component`` of a retained entry).
COMPONENTS = ("keys", "values")
_ALIGN = 8  # every region starts at a multiple of this many bytes, so it can be viewed as any dtype


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class FieldSlot:
    """Where one stored field of one component lies in a merge block.

    Attributes
    ----------
    component : str
        ``"keys"`` or ``"values"``.
    name : str
        The method's field name (``"direction"``).
    width : int
        Last dimension of the field.
    dtype : torch.dtype
        Its storage dtype.
    offset : int
        Byte offset inside the merge block.
    """

    component: str
    name: str
    width: int
    dtype: torch.dtype
    offset: int

    def nbytes(self, heads: int, tokens: int) -> int:
        return heads * tokens * self.width * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RetainedBlock:
    """The exact tokens of one component of a run of merge blocks, as the runtime's store holds them.

    Attributes
    ----------
    index : torch.Tensor
        ``[nnz, 3]`` int32 ``(batch = 0, head, token)``, tokens counted from the first block read.
    value : torch.Tensor
        ``[nnz, k, D]`` the members' exact vectors, model dtype.
    """

    index: torch.Tensor
    value: torch.Tensor


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of a merged group's store, one merge block at a time (see the module docstring).

    Attributes
    ----------
    members, heads, head_dim : int
        ``k``, KV heads, ``D``.
    block_size : int
        Tokens per merge block (the profile's ``block_size``).
    dtype : torch.dtype
        The model's (cache's) dtype.
    fields : tuple of FieldSlot
    retained_capacity : int
        Exact entries (one component, head and token each) a merge block has room for.
    retained_offset : int
        Byte offset of the retained area (count, entries, vectors) inside the merge block.
    block_bytes : int
        Bytes of one merge block.
    """

    members: int
    heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    fields: tuple[FieldSlot, ...]
    retained_capacity: int
    retained_offset: int
    block_bytes: int

    def __post_init__(self) -> None:
        if self.members < 2 or self.heads < 1 or self.head_dim < 1 or self.block_size < 1:
            raise ValueError(f"page layout needs k >= 2 members, heads, head_dim and block_size >= 1, got {self}")
        if self.retained_capacity < 0 or self.retained_capacity > 32767:
            raise ValueError(f"retained_capacity must be in [0, 32767], got {self.retained_capacity}")

    @classmethod
    def build(cls, methods: dict[str, tuple[MergeMethod, MethodParams]], members: int, heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, retained_capacity: int) -> PageLayout:
        """The layout of a group whose components are merged by ``methods`` (``{"keys": (method, params), ...}``)."""
        slots, offset = [], 0
        for component in COMPONENTS:
            method, params = methods[component]
            for f in method.fields:
                slot = FieldSlot(component, f.name, f.size(members, head_dim, params), f.storage_dtype(dtype), offset)
                slots.append(slot)
                offset = _aligned(offset + slot.nbytes(heads, block_size))
        retained_offset = offset
        item = torch.empty((), dtype=dtype).element_size()
        entries = _aligned(4 + retained_capacity * 3 * 2)
        block_bytes = _aligned(retained_offset + entries + retained_capacity * members * head_dim * item)
        return cls(members, heads, head_dim, block_size, dtype, tuple(slots), retained_capacity, retained_offset,
                   block_bytes)

    # -- sizes ----------------------------------------------------------------------------------
    def merge_blocks_per_page(self, page_tokens: int) -> int:
        if page_tokens % self.block_size:
            raise ValueError(
                f"vLLM's block size ({page_tokens} tokens) must be a multiple of the profile's merge block "
                f"({self.block_size} tokens): pass block_size={self.block_size} (or a multiple) to vLLM"
            )
        return page_tokens // self.block_size

    def content_bytes(self, page_tokens: int) -> int:
        """vLLM's ``state_content_bytes``: bytes per (KV head, token) cell of a page of ``page_tokens`` tokens."""
        page = self.merge_blocks_per_page(page_tokens) * self.block_bytes
        return _aligned(math.ceil(page / (self.heads * page_tokens)))

    def bytes_per_token(self) -> float:
        """Bytes the merged store takes per token (all heads), retained room included."""
        return self.block_bytes / self.block_size

    # -- writing --------------------------------------------------------------------------------
    def _region(self, block: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return block[offset : offset + nbytes].view(dtype)

    def write(self, block: torch.Tensor, fields: dict[str, dict[str, torch.Tensor]],
              retained: dict[str, RetainedBlock], unmarked: dict[str, dict[str, torch.Tensor]] | None = None) -> int:
        """Write one merge block.

        Parameters
        ----------
        block : torch.Tensor
            ``[block_bytes]`` uint8, a view into the page.
        fields : dict
            ``{component: {field: [heads, block_size, width]}}`` in storage dtype, retained tokens
            flagged as the method flags them (:meth:`MergeMethod.mark_retained`).
        retained : dict
            ``{component: RetainedBlock}``, tokens counted from the block's first.
        unmarked : dict, optional
            The same fields without the retention flags; needed only when a block retains more than
            ``retained_capacity``: the tokens left out are restored from these.

        Returns
        -------
        int
            Entries left out (0 unless the block retained more than its capacity).
        """
        for slot in self.fields:
            x = fields[slot.component][slot.name]
            n = slot.nbytes(self.heads, self.block_size)
            self._region(block, slot.offset, n, slot.dtype).copy_(x.reshape(-1))
        rows = []  # (component, head, token, values)
        for c, component in enumerate(COMPONENTS):
            entry = retained[component]
            for i in range(entry.index.shape[0]):
                rows.append((c, int(entry.index[i, 1]), int(entry.index[i, 2]), entry.value[i]))
        rows.sort(key=lambda r: (r[2], r[0], r[1]))  # the earliest tokens first: sinks are the first of all
        kept, dropped = rows[: self.retained_capacity], rows[self.retained_capacity :]
        if dropped:
            if unmarked is None:
                raise ValueError(f"a merge block retained {len(rows)} entries, more than its room "
                                 f"({self.retained_capacity}), and no unmarked fields were given to restore the rest")
            for c, head, token, _ in dropped:
                for slot in self.fields:
                    if slot.component == COMPONENTS[c]:
                        n = slot.nbytes(self.heads, self.block_size)
                        region = self._region(block, slot.offset, n, slot.dtype).view(self.heads, self.block_size, -1)
                        region[head, token] = unmarked[slot.component][slot.name][head, token]
        count = self._region(block, self.retained_offset, 4, torch.int32)
        count[0] = len(kept)
        if kept:
            index = torch.tensor([[c, h, n] for c, h, n, _ in kept], dtype=torch.int16)
            self._region(block, self.retained_offset + 4, index.numel() * 2, torch.int16).copy_(index.reshape(-1))
            values = torch.stack([v for *_, v in kept]).to(self.dtype)
            item = values.element_size()
            start = self._values_offset()
            self._region(block, start, values.numel() * item, self.dtype).copy_(values.reshape(-1))
        return len(dropped)

    def _values_offset(self) -> int:
        return self.retained_offset + _aligned(4 + self.retained_capacity * 3 * 2)

    # -- reading --------------------------------------------------------------------------------
    def read(self, blocks: torch.Tensor) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, RetainedBlock]]:
        """Read ``n`` consecutive merge blocks (``[n, block_bytes]`` uint8).

        Returns
        -------
        fields : dict
            ``{component: {field: [1, heads, n * block_size, width]}}``, as the runtime's store holds them.
        retained : dict
            ``{component: RetainedBlock}`` with tokens counted from the first block read.
        """
        n = blocks.shape[0]
        fields: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
        for slot in self.fields:
            nbytes = slot.nbytes(self.heads, self.block_size)
            x = blocks[:, slot.offset : slot.offset + nbytes].contiguous().view(slot.dtype)
            x = x.view(n, self.heads, self.block_size, slot.width).permute(1, 0, 2, 3)
            fields[slot.component][slot.name] = x.reshape(1, self.heads, n * self.block_size, slot.width)
        counts = blocks[:, self.retained_offset : self.retained_offset + 4].contiguous().view(torch.int32).view(n)
        index_bytes = self.retained_capacity * 3 * 2
        start = self.retained_offset + 4
        index = blocks[:, start : start + index_bytes].contiguous().view(torch.int16).view(n, -1, 3)
        item = torch.empty((), dtype=self.dtype).element_size()
        vstart = self._values_offset()
        vbytes = self.retained_capacity * self.members * self.head_dim * item
        values = blocks[:, vstart : vstart + vbytes].contiguous().view(self.dtype)
        values = values.view(n, -1, self.members, self.head_dim)
        valid = torch.arange(self.retained_capacity).unsqueeze(0) < counts.unsqueeze(1)  # [n, cap]
        block_of = torch.arange(n).unsqueeze(1).expand_as(valid)
        retained = {}
        for c, component in enumerate(COMPONENTS):
            mask = valid & (index[..., 0] == c)
            idx = index[mask].to(torch.int32)  # [nnz, 3] (component, head, token)
            token = idx[:, 2] + block_of[mask].to(torch.int32) * self.block_size
            order = torch.argsort(token * self.heads + idx[:, 1], stable=True)  # the runtime's (h, n) order per block
            rows = torch.stack([torch.zeros_like(token), idx[:, 1], token], dim=1)[order]
            retained[component] = RetainedBlock(rows, values[mask][order])
        return fields, retained
