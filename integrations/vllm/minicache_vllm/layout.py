"""The bytes of a store layer's page: what one vLLM block holds, and how to read it back.

vLLM gives every layer of a KV cache group one page per block of ``block_size`` tokens, a
``[heads, block_size, C]``-byte cell grid that it only counts (``state_content_bytes = C``). Our store
layers use their pages as plain bytes, one *unit* of tokens after the other:

* a merged group's unit is the profile's merge block (``block_size`` tokens), or, in a quantized
  profile, the least multiple of it that also holds whole packing chunks of every field (KIVI packs a
  key field's ``group_size`` tokens together). A unit holds (:class:`PageLayout`):

  - every stored field of the group's method, keys then values, ``[heads, tokens, width]``, exactly
    what :class:`minicache.runtime.store.ComponentStore` holds: in its storage dtype (SLERP: the shared
    ``direction`` ``[D]`` in the model dtype and the ``magnitude`` of each member ``[k]`` in fp16), or
    packed by the profile's quantizer (codes, scales and zero points) where the method marks it
    quantizable;
  - the tokens retention keeps exact, pooled over heads and keys/values: a count (int32), then up to
    ``retained_capacity`` entries of ``(component, head, token)`` (int16 each) and the ``k`` members'
    exact vectors ``[k, D]``, in the model dtype or packed per row as the runtime packs them;

* an unmerged layer of a quantized profile stores a unit of one packing chunk: its keys and values
  packed exactly as :class:`minicache.runtime.layers.QuantizedLayer` packs them
  (:func:`quantized_layer_layout`).

The transformers runtime keeps as many retained tokens as retention picks; a page has room for a
fixed number per unit, ``retained_capacity``. A unit that retains more keeps the earliest tokens
(the sinks first) and restores the others from the merged form (:meth:`PageLayout.write` returns how
many it dropped, so callers can count them).

Nothing here imports vLLM: the layout is tested in minicache's own environment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minicache.quant import QuantizedTensor

__all__ = ["COMPONENTS", "Codec", "FieldSlot", "PageLayout", "RetainedBlock", "UnitLayout", "page_unit",
           "prefix_window_mask", "quantized_layer_layout", "select_rows"]

#: A merged group's two components, in page order (their index is the ``component`` of a retained entry).
COMPONENTS = ("keys", "values")
_ALIGN = 8  # every region starts at a multiple of this many bytes


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


Stored = torch.Tensor | QuantizedTensor


@dataclass(frozen=True)
class Codec:
    """How one kind of stored tensor turns into bytes and back: a dense tensor, or a
    :class:`~minicache.quant.QuantizedTensor`'s codes, scales and zero points, one after the other.

    Attributes
    ----------
    shapes : tuple of tuple of int
        Shape of each part without the leading dimension (one part when dense, three when packed).
    dtypes : tuple of torch.dtype
    template : QuantizedTensor or None
        What the packed parts are (bits, group size, axis, rotation); None: dense.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    template: QuantizedTensor | None = None

    @classmethod
    def of(cls, sample: Stored) -> Codec:
        """The codec of tensors shaped like ``sample`` (its leading dimension is the one that varies)."""
        parts = _parts(sample)
        return cls(tuple(tuple(p.shape[1:]) for p in parts), tuple(p.dtype for p in parts),
                   sample if isinstance(sample, QuantizedTensor) else None)

    @property
    def part_bytes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(self.shapes, self.dtypes,
                                                                                              strict=True))

    @property
    def nbytes(self) -> int:
        """Bytes per item of the leading dimension."""
        return sum(self.part_bytes)

    def encode(self, x: Stored) -> torch.Tensor:
        """``[lead, nbytes]`` uint8: each item's parts, one after the other."""
        parts = _parts(x)
        lead = parts[0].shape[0]
        return torch.cat([p.contiguous().view(torch.uint8).reshape(lead, nbytes)
                          for p, nbytes in zip(parts, self.part_bytes, strict=True)], dim=1)

    def decode(self, raw: torch.Tensor) -> list[torch.Tensor]:
        """The parts ``[m, *shape]`` of ``raw`` ``[m, nbytes]`` uint8."""
        out, start = [], 0
        for shape, dtype, nbytes in zip(self.shapes, self.dtypes, self.part_bytes, strict=True):
            out.append(raw[:, start : start + nbytes].contiguous().view(dtype).view(raw.shape[0], *shape))
            start += nbytes
        return out

    def whole(self, parts: list[torch.Tensor]) -> Stored:
        """A tensor (dense) or a QuantizedTensor of the packed parts."""
        if self.template is None:
            return parts[0]
        data, scale, zero = parts
        return dataclasses.replace(self.template, data=data, scale=scale, zero=zero)


def _parts(x: Stored) -> list[torch.Tensor]:
    return [x.data, x.scale, x.zero] if isinstance(x, QuantizedTensor) else [x]


def select_rows(x: Stored, index: torch.Tensor) -> Stored:
    """Rows ``index`` (leading dimension) of a dense tensor or a QuantizedTensor."""
    return x.index_select(0, index) if isinstance(x, QuantizedTensor) else x[index]


@dataclass(frozen=True)
class FieldSlot:
    """Where one stored tensor of one component lies in a unit, ``[1, heads, unit tokens, width]``.

    Attributes
    ----------
    component : str
        ``"keys"`` or ``"values"``.
    name : str
        The method's field name (``"direction"``), or ``"vectors"`` for an unmerged layer.
    codec : Codec
        Its bytes (dense in its storage dtype, or packed).
    offset : int
        Byte offset inside the unit.
    """

    component: str
    name: str
    codec: Codec
    offset: int

    @property
    def packed(self) -> bool:
        return self.codec.template is not None


@dataclass(frozen=True)
class RetainedBlock:
    """The exact tokens of one component of a run of units, as the runtime's store holds them.

    Attributes
    ----------
    index : torch.Tensor
        ``[nnz, 3]`` int32 ``(batch = 0, head, token)``, tokens counted from the first unit read.
    value : torch.Tensor or QuantizedTensor
        ``[nnz, k, D]`` the members' exact vectors, model dtype, or packed per row.
    """

    index: torch.Tensor
    value: Stored


@dataclass(frozen=True)
class UnitLayout:
    """Byte layout of a store's page, one unit of ``unit_tokens`` tokens at a time.

    Attributes
    ----------
    heads, head_dim : int
        KV heads, ``D``.
    dtype : torch.dtype
        The model's (cache's) dtype.
    unit_tokens : int
        Tokens per unit; vLLM's block size must be a multiple.
    fields : tuple of FieldSlot
    unit_bytes : int
        Bytes of one unit.
    """

    heads: int
    head_dim: int
    dtype: torch.dtype
    unit_tokens: int
    fields: tuple[FieldSlot, ...]
    unit_bytes: int

    # -- sizes ----------------------------------------------------------------------------------
    def units_per_page(self, page_tokens: int) -> int:
        if page_tokens % self.unit_tokens:
            raise ValueError(
                f"vLLM's block size ({page_tokens} tokens) must be a multiple of the profile's page unit "
                f"({self.unit_tokens} tokens: the merge block, or the quantizer's packing chunk): pass "
                f"block_size={self.unit_tokens} (or a multiple) to vLLM (vllm serve: --block-size {self.unit_tokens})"
            )
        return page_tokens // self.unit_tokens

    def content_bytes(self, page_tokens: int) -> int:
        """vLLM's ``state_content_bytes``: bytes per (KV head, token) cell of a page of ``page_tokens`` tokens."""
        page = self.units_per_page(page_tokens) * self.unit_bytes
        return _aligned(math.ceil(page / (self.heads * page_tokens)))

    def bytes_per_token(self) -> float:
        """Bytes the store takes per token (all heads), retained room included."""
        return self.unit_bytes / self.unit_tokens

    # -- units in pages ---------------------------------------------------------------------------
    def unit(self, pages: torch.Tensor, table: torch.Tensor, index: int, units_per_page: int) -> torch.Tensor:
        """Unit ``index`` of a request (``table``: its block ids) as a ``[unit_bytes]`` view into ``pages``
        ``[num_blocks, page bytes]``."""
        page = int(table[index // units_per_page])
        start = (index % units_per_page) * self.unit_bytes
        return pages[page, start : start + self.unit_bytes]

    def units(self, pages: torch.Tensor, table: torch.Tensor, count: int, units_per_page: int) -> torch.Tensor:
        """A request's first ``count`` units, ``[count, unit_bytes]`` (one gather of its pages)."""
        rows = pages.index_select(0, table[: -(-count // units_per_page)].to(torch.long))
        return rows[:, : units_per_page * self.unit_bytes].reshape(-1, self.unit_bytes)[:count]

    def padded_units(self, pages: torch.Tensor, tables: list[torch.Tensor], counts: list[int],
                     units_per_page: int) -> torch.Tensor:
        """Several requests' first ``counts[i]`` units, each padded to the most with the longest request's
        units (a valid stored form that readers decode to finite numbers and a mask then drops):
        ``[R · max(counts), unit_bytes]``, request after request, for :meth:`read_fields` with ``batch=R``."""
        most = max(counts)
        longest = self.units(pages, tables[counts.index(most)], most, units_per_page)
        grid = []
        for table, count in zip(tables, counts, strict=True):
            grid.append(self.units(pages, table, count, units_per_page) if count else longest[:0])
            grid.append(longest[count:])
        return torch.cat(grid)

    # -- fields ---------------------------------------------------------------------------------
    def write_fields(self, block: torch.Tensor, fields: dict[str, dict[str, Stored]]) -> None:
        """Write ``{component: {field: [1, heads, unit_tokens, width]}}`` into one unit ``[unit_bytes]``."""
        for slot in self.fields:
            raw = slot.codec.encode(fields[slot.component][slot.name])[0]
            block[slot.offset : slot.offset + raw.numel()] = raw

    def read_fields(self, blocks: torch.Tensor, batch: int = 1) -> dict[str, dict[str, Stored]]:
        """``{component: {field: [batch, heads, n / batch * unit_tokens, width]}}`` of ``n`` units
        ``[n, unit_bytes]``: sequence after sequence, ``n / batch`` units each."""
        n = blocks.shape[0]
        if n % batch:
            raise ValueError(f"{n} units do not split into {batch} sequences of equal length")
        per = n // batch
        out: dict[str, dict[str, Stored]] = {c: {} for c in COMPONENTS}
        for slot in self.fields:
            parts = slot.codec.decode(blocks[:, slot.offset : slot.offset + slot.codec.nbytes])
            # [n, heads, t, w] -> [batch, heads, per * t, w]: a sequence's units follow each other along tokens
            joined = [p.view(batch, per, *p.shape[1:]).transpose(1, 2).reshape(batch, p.shape[1], per * p.shape[2],
                                                                              p.shape[3]) for p in parts]
            out[slot.component][slot.name] = slot.codec.whole(joined)
        return out


def prefix_window_mask(prefix: list[int], window: list[int], device: torch.device,
                       tail: list[int] | None = None) -> torch.Tensor:
    """``[R, max(prefix) + max(tail) + max(window)]`` bool, True where request ``i``'s own tokens are in a
    padded batch that holds its ``prefix[i]`` stored tokens from 0, its ``tail[i]`` further stored tokens
    from ``max(prefix)`` (none by default), and its ``window[i]`` exact ones after the longest tail."""
    tail = [0] * len(prefix) if tail is None else tail
    longest, most = max(prefix), max(tail)
    positions = torch.arange(longest + most + max(window), device=device)

    def within(start: int, lengths: list[int]) -> torch.Tensor:
        return (positions >= start) & (positions < start + torch.tensor(lengths, device=device).unsqueeze(1))

    return within(0, prefix) | within(longest, tail) | within(longest + most, window)


def _field_slots(samples: list[tuple[str, str, Stored]], offset: int = 0) -> tuple[tuple[FieldSlot, ...], int]:
    """Consecutive slots for ``(component, name, sample [1, heads, unit tokens, width])``."""
    slots = []
    for component, name, sample in samples:
        slot = FieldSlot(component, name, Codec.of(sample), offset)
        slots.append(slot)
        offset = _aligned(offset + slot.codec.nbytes)
    return tuple(slots), offset


def quantized_layer_layout(layer, heads: int, head_dim: int, dtype: torch.dtype) -> UnitLayout:
    """The page of an unmerged layer of a quantized profile (``layer``: its
    :class:`~minicache.runtime.layers.QuantizedLayer`): one packing chunk of keys then values."""
    spec, chunk = layer.spec, layer.chunk
    sample = torch.zeros(1, heads, chunk, head_dim, dtype=dtype)
    slots, size = _field_slots([("keys", "vectors", spec.pack(sample, "keys", layer.bits)),
                                ("values", "vectors", spec.pack(sample, "values", layer.value_bits))])
    return UnitLayout(heads, head_dim, dtype, chunk, slots, _aligned(size))


def page_unit(components: dict, block_size: int) -> int:
    """Tokens per unit of a merged group's pages: the least multiple of the merge block ``block_size``
    that holds whole packing chunks of every quantized field (``components``: its ComponentStores)."""
    unit = block_size
    for name in COMPONENTS:
        comp = components[name]
        for f in comp.method.fields:
            role = f.role(name)
            if comp.quant is not None and role is not None:
                unit = math.lcm(unit, comp.quant.quantizer.chunk_tokens(role, comp.quant.group_size))
    return unit


@dataclass(frozen=True)
class PageLayout(UnitLayout):
    """Byte layout of a merged group's store, one unit at a time (see the module docstring).

    Attributes
    ----------
    members : int
        ``k``.
    retained_capacity : int
        Exact entries (one component, head and token each) a unit has room for.
    retained_offset : int
        Byte offset of the retained area (count, entries, vectors) inside the unit.
    retained : tuple of Codec
        The retained vectors' bytes per entry, keys then values (packed per row in a quantized profile).
    """

    members: int
    retained_capacity: int
    retained_offset: int
    retained: tuple[Codec, ...]

    def __post_init__(self) -> None:
        if self.members < 1 or self.heads < 1 or self.head_dim < 1 or self.unit_tokens < 1:
            raise ValueError(f"page layout needs k >= 1 members, heads, head_dim and unit_tokens >= 1, got {self}")
        if self.retained_capacity < 0 or self.retained_capacity > 32767:
            raise ValueError(f"retained_capacity must be in [0, 32767], got {self.retained_capacity}")

    @classmethod
    def build(cls, components: dict, heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
              retained_capacity: int) -> PageLayout:
        """The layout of a merged group (``components``: its ``{"keys": ComponentStore, "values": ...}``,
        which give the method, its parameters, the quantization and each component's code width).

        ``block_size`` is the profile's merge block; the unit is its least multiple that holds whole
        packing chunks of every quantized field.
        """
        members = components["keys"].members
        unit = page_unit(components, block_size)
        samples, retained = [], []
        for name in COMPONENTS:
            comp = components[name]
            quant = comp.quant
            for f in comp.method.fields:
                role = f.role(name)
                sample = torch.zeros(1, heads, unit, f.size(members, head_dim, comp.params),
                                     dtype=f.storage_dtype(dtype))
                if quant is not None and role is not None:
                    sample = quant.pack(sample, role, comp.bits)
                samples.append((name, f.name, sample))
            vector = torch.zeros(1, members, head_dim, dtype=dtype)  # what ComponentStore.merge packs per row
            if quant is not None:
                vector = quant.pack(vector, "vectors", comp.bits)
            retained.append(Codec.of(vector))
        slots, retained_offset = _field_slots(samples)
        entry = max(c.nbytes for c in retained)
        unit_bytes = _aligned(retained_offset + _aligned(4 + retained_capacity * 3 * 2) + retained_capacity * entry)
        return cls(heads, head_dim, dtype, unit, slots, unit_bytes, members, retained_capacity, retained_offset,
                   tuple(retained))

    @property
    def entry_bytes(self) -> int:
        return max(c.nbytes for c in self.retained)

    def _values_offset(self) -> int:
        return self.retained_offset + _aligned(4 + self.retained_capacity * 3 * 2)

    # -- writing --------------------------------------------------------------------------------
    def write(self, block: torch.Tensor, fields: dict[str, dict[str, Stored]],
              retained: dict[str, RetainedBlock], unmarked: dict[str, dict[str, torch.Tensor]] | None = None) -> int:
        """Write one unit.

        Parameters
        ----------
        block : torch.Tensor
            ``[unit_bytes]`` uint8, a view into the page.
        fields : dict
            ``{component: {field: [1, heads, unit_tokens, width]}}`` as the runtime's store holds them
            (storage dtype, or packed), retained tokens flagged as the method flags them
            (:meth:`MergeMethod.mark_retained`).
        retained : dict
            ``{component: RetainedBlock}``, tokens counted from the unit's first.
        unmarked : dict, optional
            The dense fields without the retention flags (``{component: {field: [heads, unit_tokens,
            width]}}``); needed only when a unit retains more than ``retained_capacity``: the tokens
            left out are restored from these. (Methods flag retained tokens only in fields they keep
            unpacked, as SLERP does in its magnitudes, so packed fields need no patch.)

        Returns
        -------
        int
            Entries left out (0 unless the unit retained more than its capacity).
        """
        rows = []  # (token, component, head, row in its component's list)
        for c, component in enumerate(COMPONENTS):
            index = retained[component].index
            for i in range(index.shape[0]):
                rows.append((int(index[i, 2]), c, int(index[i, 1]), i))
        rows.sort()  # the earliest tokens first: sinks are the first of all
        kept, dropped = rows[: self.retained_capacity], rows[self.retained_capacity :]
        if dropped:
            if unmarked is None:
                raise ValueError(f"a unit retained {len(rows)} entries, more than its room "
                                 f"({self.retained_capacity}), and no unmarked fields were given to restore the rest")
            fields = {c: dict(f) for c, f in fields.items()}
            for slot in self.fields:
                if slot.packed:
                    continue
                x = fields[slot.component][slot.name].clone()
                for token, c, head, _ in dropped:
                    if COMPONENTS[c] == slot.component:
                        x[0, head, token] = unmarked[slot.component][slot.name][head, token]
                fields[slot.component][slot.name] = x
        self.write_fields(block, fields)
        start = self.retained_offset
        block[start : start + 4] = torch.tensor([len(kept)], dtype=torch.int32).view(torch.uint8)
        if kept:
            index = torch.tensor([[c, h, n] for n, c, h, _ in kept], dtype=torch.int16)
            raw = index.view(torch.uint8).reshape(-1)
            block[start + 4 : start + 4 + raw.numel()] = raw
            encoded = [codec.encode(retained[name].value) for codec, name in zip(self.retained, COMPONENTS,
                                                                                  strict=True)]
            entries = torch.zeros(len(kept), self.entry_bytes, dtype=torch.uint8)
            for e, (_, c, _, i) in enumerate(kept):
                entries[e, : encoded[c].shape[1]] = encoded[c][i]
            vstart = self._values_offset()
            block[vstart : vstart + entries.numel()] = entries.reshape(-1)
        return len(dropped)

    # -- reading --------------------------------------------------------------------------------
    def read(self, blocks: torch.Tensor, batch: int = 1,
             ) -> tuple[dict[str, dict[str, Stored]], dict[str, RetainedBlock]]:
        """Read ``n`` units (``[n, unit_bytes]`` uint8): ``batch`` sequences of ``n / batch`` consecutive units.

        Returns
        -------
        fields : dict
            ``{component: {field: [batch, heads, n / batch * unit_tokens, width]}}``, as the runtime's store
            holds them.
        retained : dict
            ``{component: RetainedBlock}``, rows ``(sequence, head, token)`` with tokens counted from the
            sequence's first unit, in the runtime's order.
        """
        n = blocks.shape[0]
        fields = self.read_fields(blocks, batch)
        per = n // batch
        counts = blocks[:, self.retained_offset : self.retained_offset + 4].contiguous().view(torch.int32).view(n)
        start = self.retained_offset + 4
        index = blocks[:, start : start + self.retained_capacity * 3 * 2].contiguous().view(torch.int16)
        index = index.view(n, -1, 3)
        vstart = self._values_offset()
        entries = blocks[:, vstart : vstart + self.retained_capacity * self.entry_bytes]
        entries = entries.reshape(n, self.retained_capacity, self.entry_bytes)
        slots = torch.arange(self.retained_capacity, device=blocks.device)
        valid = slots.unsqueeze(0) < counts.unsqueeze(1)  # [n, cap]
        block_of = torch.arange(n, device=blocks.device).unsqueeze(1).expand_as(valid)
        retained = {}
        for c, (component, codec) in enumerate(zip(COMPONENTS, self.retained, strict=True)):
            mask = valid & (index[..., 0] == c)
            idx = index[mask].to(torch.int32)  # [nnz, 3] (component, head, token)
            unit = block_of[mask].to(torch.int32)
            token = idx[:, 2] + unit % per * self.unit_tokens
            # the runtime's order: sequence, then (h, n) per block
            order = torch.argsort((unit * self.unit_tokens + idx[:, 2]) * self.heads + idx[:, 1], stable=True)
            rows = torch.stack([unit // per, idx[:, 1], token], dim=1)[order]
            value = codec.whole(codec.decode(entries[mask][:, : codec.nbytes]))
            retained[component] = RetainedBlock(rows, select_rows(value, order))
        return fields, retained
