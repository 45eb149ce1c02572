"""A merged group's store in pages: merge whole units into them, restore a member from them.

This is the part of the vLLM plugin that does not need vLLM: the pages are any ``[num_blocks, bytes]``
uint8 tensor and a request's blocks a row of block ids, so minicache's own tests check it against
the transformers runtime (:class:`minicache.runtime.store.GroupStore`) step by step.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable

import torch

from minicache.quant import QuantizedTensor, append
from minicache.runtime.kernels import kernels_usable
from minicache.runtime.store import ComponentStore, GroupStore, TokenSeries
from minicache.runtime.views import MergedKVView
from minicache_vllm.layout import COMPONENTS, PageLayout, RetainedBlock, Stored, prefix_window_mask, select_rows
from minicache_vllm.windows import WindowPool, merged_length

logger = logging.getLogger("vllm.minicache_vllm")

__all__ = ["DECODE_PATHS", "PagedGroup", "decode_path", "reads_blockwise", "reads_fused", "unservable_groups"]

Stores = dict[str, ComponentStore]  # a request's (or a stacked batch's) store of each component

#: How a decode step attends a stored prefix (``MINICACHE_VLLM_DECODE``), with what each means. On CPU
#: ``auto`` is ``blockwise``, the faster path for merged groups (nothing restored) and, since packed groups
#: and layers stack a step's decode rows, for packed layers too (``benchmarks/results/vllm-cpu/decode-paths.txt``).
DECODE_PATHS = {
    "auto": "every store a block at a time: the fused Triton kernel where it reads the store and a GPU runs it, "
            "else PyTorch",
    "blockwise": "every store a block at a time, PyTorch",
    "fused": "every store a block at a time through the fused Triton decode kernel where it reads the store "
             "(CPU only under TRITON_INTERPRET=1), else PyTorch",
    "restore": "the whole prefix restored",
}


def unservable_groups(cache) -> str | None:
    """What in a :class:`~minicache.runtime.cache.MiniCache`'s merged groups the paged stores cannot serve yet,
    or None."""
    for template in cache.stores:
        for name, component in template.components.items():
            if component.method.closed_loop:
                return (f"group {list(template.layers)}: {name} are merged by {component.method.name!r}, which "
                        "restores each layer from the one below; not served yet")
            if component.rope is not None:  # the paged merge encodes a unit apart from its cache index
                return f"group {list(template.layers)}: {name} are stored before RoPE (pre_rope); not served yet"
    return None


class PagedGroup:
    """One merged group: its settings (from minicache's own store), pages, windows and step state.

    The pages hold a request's merged tokens in whole units (:class:`~minicache_vllm.layout.PageLayout`:
    the merge block, or in a quantized profile the least multiple of it that packs whole chunks). Merged
    tokens that do not fill a unit yet stay exact in the window pool, and each step merges them again
    (the same ``ComponentStore.merge`` call on the same tokens, so the same stored form the runtime holds
    as the dense tail of a packed field).

    Parameters
    ----------
    template : GroupStore
        The group's store as :class:`minicache.MiniCache` builds it from the profile (settings, the
        method's sidecar tensors, the quantization; it never holds tokens here).
    layout : PageLayout
    pool : WindowPool
        Room for ``residual_length + layout.unit_tokens`` exact tokens per request.
    page_tokens : int
        Tokens per page (vLLM's block size; a multiple of the unit).
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
        self.unit = layout.unit_tokens
        self.pool = pool
        self.pages = pages
        self.layer_name = layer_name
        self.units_per_page = layout.units_per_page(page_tokens)
        self._stash: dict[int, dict[int, torch.Tensor]] = {}  # member -> batch row -> [2, H, n, D], this step
        self._slots: dict[int, int] = {}  # batch row -> window slot, this step
        self._states: dict[tuple[int, int], dict[str, ComponentStore]] = {}  # (first block, tokens) -> stores
        self._stacked: dict[tuple[tuple[int, int], ...], tuple[list[int], dict[str, ComponentStore]]] = {}
        self.dropped = 0  # retained entries left out because a unit had no room (logged)

    @property
    def nbytes(self) -> int:
        """Bytes held outside the pages (the exact windows)."""
        return self.pool.nbytes

    def paged_length(self, tokens: int) -> int:
        """Tokens of a sequence of ``tokens`` whose stored form is in the pages: the merged ones in whole units."""
        return merged_length(tokens, self.residual_length, self.block_size) // self.unit * self.unit

    # -- pages ------------------------------------------------------------------------------------
    def _state(self, table: torch.Tensor, before: int, window: torch.Tensor) -> dict[str, ComponentStore]:
        """A request's stores as the runtime holds them after its previous step, read once per step for
        all members (merging waits for the last one): the paged units, then the merged tokens that do
        not fill a unit, merged again from ``window`` ``[2, k, H, n, D]`` (tokens from the paged length on)."""
        key = (int(table[0]), before)
        if key in self._states:
            return self._states[key]
        paged = self.paged_length(before)
        merged = merged_length(before, self.residual_length, self.block_size)
        if paged:
            fields, retained = self.layout.read(
                self.layout.units(self.pages(), table, paged // self.unit, self.units_per_page))
        state = {}
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name].fresh()
            if paged:
                _hold(comp, fields[name], retained[name], paged)
            self._merge_from(comp, window[c], paged, merged - paged)
            state[name] = comp
        self._states[key] = state
        return state

    def _merge_from(self, comp: ComponentStore, window: torch.Tensor, start: int, count: int) -> None:
        """Give ``comp`` the exact ``window`` ``[k, H, n, D]`` (tokens from ``start`` on) and merge its first
        ``count`` tokens as the runtime merges them (the rest is the retention look-ahead and the window)."""
        comp.residual = [window[m].unsqueeze(0) for m in range(self.members)]
        if count:
            real = torch.ones(1, window.shape[-2], dtype=torch.bool, device=window.device)
            comp.merge(count, self.block_size, real, torch.tensor([start], device=window.device))

    def merge(self, table: torch.Tensor, start: int, xs: torch.Tensor, count: int) -> None:
        """Merge the first ``count`` tokens of ``xs`` ``[2, k, H, n, D]`` (tokens from ``start`` on,
        ``start`` and ``count`` multiples of the unit) into the pages."""
        stored: dict[str, dict[str, Stored]] = {}
        kept: dict[str, RetainedBlock] = {}
        for c, name in enumerate(COMPONENTS):
            comp = self.template.components[name].fresh()
            self._merge_from(comp, xs[c], start, count)
            # whole units: a packed field holds every token packed, an unpacked one dense
            stored[name] = {f: s.dense if s.packed is None else s.packed for f, s in comp.fields.items()}
            value = comp.retained_value if comp.retained_q is None else comp.retained_q
            kept[name] = RetainedBlock(comp.retained_index, value)
        pages = self.pages()
        u = self.unit
        for j in range(count // u):
            lo, hi = j * u, (j + 1) * u
            fields = {name: {f: _tokens(x, lo, hi) for f, x in stored[name].items()} for name in COMPONENTS}
            retained = {}
            for name in COMPONENTS:
                idx, val = kept[name].index, kept[name].value
                inside = ((idx[:, 2] >= lo) & (idx[:, 2] < hi)).nonzero().squeeze(1)
                local = idx[inside].clone()
                local[:, 2] -= lo
                retained[name] = RetainedBlock(local, select_rows(val, inside))
            room = self.layout.retained_capacity
            unmarked = None
            if sum(r.index.shape[0] for r in retained.values()) > room:
                unmarked = self._unmarked(xs, lo, hi)
            block = self.layout.unit(pages, table, (start + lo) // u, self.units_per_page)
            dropped = self.layout.write(block, fields, retained, unmarked)
            if dropped:
                self.dropped += dropped
                logger.info("minicache_vllm: layers %s: a unit retained %d entries more than its room (%d); "
                            "%d left out so far", list(self.layers), dropped, room, self.dropped)

    def _unmarked(self, xs: torch.Tensor, lo: int, hi: int) -> dict[str, dict[str, torch.Tensor]]:
        """The unit's stored fields without retention flags (to restore entries a full unit leaves out)."""
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
        self._states = {}
        self._stacked = {}

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
        keys, values = self._member_stores(member, row, table, before, step)
        return keys.restored(member), values.restored(member)

    def member_views(self, member: int, row: int, table: torch.Tensor, before: int,
                     step: torch.Tensor) -> tuple[MergedKVView, MergedKVView]:
        """The same keys and values as :meth:`member_kv`, as views that attention reads a block at a time
        (:func:`~minicache.runtime.blockwise.blockwise_decode_attention`) instead of restoring them whole."""
        keys, values = self._member_stores(member, row, table, before, step)
        return keys.view(member), values.view(member)

    def _member_stores(self, member: int, row: int, table: torch.Tensor, before: int,
                       step: torch.Tensor) -> tuple[ComponentStore, ComponentStore]:
        """The request's key and value stores as member ``member`` sees them this step (its window
        grown by ``step``); the stored form is shared with the other members, not copied."""
        slot = self._take_step(member, row, table, before, step)
        state = self._state(table, before, self.pool.read(slot))
        out = []
        for c, name in enumerate(COMPONENTS):
            comp = copy.copy(state[name])  # shares the stored form; only this member's window grows
            comp.residual = list(comp.residual)
            comp.residual[member] = torch.cat([comp.residual[member], step[c].unsqueeze(0)], dim=-2)
            out.append(comp)
        return out[0], out[1]

    def _take_step(self, member: int, row: int, table: torch.Tensor, before: int, step: torch.Tensor) -> int:
        """Note a request's step at ``member`` for :meth:`end_step` (its window slot, taken at the first
        member; its keys and values ``step``) and return the slot."""
        if member == 0:
            self._slots[row] = self.pool.slot(int(table[0]), before)
        self._stash.setdefault(member, {})[row] = step
        return self._slots[row]

    # -- a step's decode rows, read into one batch ------------------------------------------------------
    #: A restoring decode reads each request's store (merged groups decode blockwise by default).
    restores_decode_rows = False

    @functools.cached_property
    def _dense_units(self) -> bool:
        """Every stored field and retained vector dense and a unit one merge block: a request's merged
        tokens are all in its pages, one grid read of them is the whole prefix (:meth:`_stack_prefix`)."""
        return (self.unit == self.block_size
                and not any(slot.packed for slot in self.layout.fields)
                and not any(codec.template is not None for codec in self.layout.retained))

    @functools.cached_property
    def stacks_decode_rows(self) -> bool:
        """Whether :meth:`stacked_views` can serve this group: a method that restores tokens independently
        (not a closed-loop chain), and either dense units (:meth:`_stack_prefix`) or packed fields whose
        merged tail, the tokens that do not fill a unit yet, is packed alike in every request: never (the
        field's packing chunk is the unit) or wholly (the chunk divides the merge block), so that every
        request's prefix splits into packed and dense tokens at the same place (:meth:`_stack_states`)."""
        if any(c.method.closed_loop for c in self.template.components.values()):
            return False
        if self._dense_units:
            return True
        chunks = [_chunk(series) for comp in self.template.components.values() for series in comp.fields.values()]
        return all(chunk is None or chunk == self.unit or self.block_size % chunk == 0 for chunk in chunks)

    def stacked_views(self, member: int, rows: list[tuple[int, torch.Tensor, int, torch.Tensor]],
                      ) -> tuple[MergedKVView, MergedKVView, torch.Tensor]:
        """The keys and values member ``member`` attends for several requests' decode rows, as one padded
        batch read straight from the pages (:attr:`stacks_decode_rows` must hold).

        The same tokens as :meth:`member_views` of each request, without a per-request store: request
        ``i``'s merged tokens at ``0 .. M_i``, then the longest request's stored tokens as padding up to
        ``M_max`` (a valid stored form, so every method restores it to finite numbers, which the mask
        drops; zeros would give SLERP's ``m/‖e‖`` 0/0), then its exact window and new token from ``M_max``
        on, zeros after. The requests' units are gathered in one grid (the longest request's units
        standing in for the missing ones) and parsed once per step, for every member.

        Parameters
        ----------
        rows : list of (int, torch.Tensor, int, torch.Tensor)
            Per request: its row in the step's batch, block ids, tokens before the step, and ``[2, H, 1, D]``
            its key and value at this member.

        Returns
        -------
        keys, values : MergedKVView
            ``[R, H, M_max + r_max, D]``.
        mask : torch.Tensor
            ``[R, M_max + r_max]`` bool, True where a request's own tokens are.
        """
        if not self.stacks_decode_rows:
            raise ValueError(f"layers {list(self.layers)}: this store's decode rows cannot be read as one batch "
                             "(a closed-loop method, or packed fields whose merged tails differ in packing)")
        slots = [self._take_step(member, *row) for row in rows]
        steps = [step for *_, step in rows]
        key = tuple((int(table[0]), before) for _, table, before, _ in rows)
        if self._dense_units:
            if key not in self._stacked:
                self._stacked[key] = self._stack_prefix([(table, before) for _, table, before, _ in rows])
            lengths, stores = self._stacked[key]
            residual, sizes = self.pool.read_padded(slots, member, steps)  # [2, R, H, r_max, D]
            mask = prefix_window_mask(lengths, sizes, residual.device)
        else:
            if key not in self._stacked:
                self._stacked[key] = self._stack_states(rows, slots)
            (paged, tails), stores = self._stacked[key]
            # a window holds the tokens from the paged ones on: the merged tail's are skipped
            residual, sizes = self.pool.read_padded(slots, member, steps, skip=tails)  # [2, R, H, r_max, D]
            mask = prefix_window_mask(paged, sizes, residual.device, tails)
        views = []
        for c, name in enumerate(COMPONENTS):
            comp = copy.copy(stores[name])  # shares the stacked prefix with the other members
            comp.residual = [None] * self.members
            comp.residual[member] = residual[c]
            views.append(comp.view(member))
        return views[0], views[1], mask

    def _stack_prefix(self, requests: list[tuple[torch.Tensor, int]]) -> tuple[list[int], dict[str, ComponentStore]]:
        """The requests' merged tokens, ``(tokens each, {component: store of R sequences padded to the
        longest})``: one gather of their units and one parse."""
        lengths = [self.paged_length(before) for _, before in requests]
        m_max = max(lengths)
        stores = {name: self.template.components[name].fresh() for name in COMPONENTS}
        if m_max == 0:
            return lengths, stores
        grid = self.layout.padded_units(self.pages(), [table for table, _ in requests],
                                        [m // self.unit for m in lengths], self.units_per_page)
        fields, retained = self.layout.read(grid, batch=len(requests))  # [R, H, M_max, w] each
        for name, comp in stores.items():
            _hold(comp, fields[name], retained[name], m_max)
        return lengths, stores

    def _stack_states(self, rows: list[tuple[int, torch.Tensor, int, torch.Tensor]], slots: list[int],
                      ) -> tuple[tuple[list[int], list[int]], Stores]:
        """Packed units: every request's store as :meth:`member_views` reads it (:meth:`_state`: its units,
        its merged tail merged again), as one padded batch for every member of the step.

        Request ``i``'s paged tokens lie at ``0 .. P_i``, the request with the most paged tokens' standing in
        up to ``P_max`` (one gather of every request's units, one parse, as :meth:`_stack_prefix`); its
        merged tail at ``P_max .. P_max + T_i``, the longest tail's standing in up to ``P_max + T_max``
        (valid stored forms: the mask drops them). Retained entries move with their tokens.

        Returns
        -------
        (paged, tails) : (list of int, list of int)
            ``P_i`` and ``T_i``.
        stores : dict
            ``{component: ComponentStore of R sequences}``, no window.
        """
        tables = [table for _, table, _, _ in rows]
        paged = [self.paged_length(before) for _, _, before, _ in rows]
        tails = [merged_length(before, self.residual_length, self.block_size) - p
                 for (_, _, before, _), p in zip(rows, paged, strict=True)]
        p_max, t_max = max(paged), max(tails)
        stores = {name: self.template.components[name].fresh() for name in COMPONENTS}
        if p_max:
            grid = self.layout.padded_units(self.pages(), tables, [p // self.unit for p in paged], self.units_per_page)
            fields, retained = self.layout.read(grid, batch=len(rows))  # [R, H, P_max, w] each
            for name, comp in stores.items():
                _hold(comp, fields[name], retained[name], p_max)
        if not t_max:
            return (paged, tails), stores
        # each request's tail merged again from its window, as _state merges it (a fresh store: tokens from 0)
        own = []
        for slot, p, t in zip(slots, paged, tails, strict=True):
            window = self.pool.read(slot)  # tokens from P_i on
            own.append({name: self.template.components[name].fresh() for name in COMPONENTS})
            for c, name in enumerate(COMPONENTS):
                self._merge_from(own[-1][name], window[c], p, t)
        longest = tails.index(t_max)
        runs = [[(i, 0, tails[i]), (longest, tails[i], t_max)] for i in range(len(rows))]
        for name, comp in stores.items():
            for field, series in comp.fields.items():
                # a tail is packed wholly where its field's chunk divides the merge block, else not at all
                chunk = _chunk(series)
                packed_tail = chunk is not None and self.block_size % chunk == 0
                packed, dense = _stacked_field([o[name].fields[field] for o in own], runs,
                                               t_max if packed_tail else 0)
                if packed is not None:
                    series.packed = append(series.packed, packed)
                if dense is not None:
                    series.dense = dense if series.dense is None else torch.cat([series.dense, dense], dim=-2)
            comp.length = p_max + t_max
            _stack_retained(comp, [o[name] for o in own], p_max)
        return (paged, tails), stores

    def end_step(self, rows: list[tuple[int, torch.Tensor, int, int]]) -> None:
        """After the last member: merge the whole units that left every window, keep the rest exact.

        ``rows``: ``(row, block ids, tokens before the step, tokens after)`` of each request in the step.
        """
        for row, table, before, total in rows:
            slot = self._slots[row]
            paged_before, paged_after = self.paged_length(before), self.paged_length(total)
            steps = torch.stack([self._stash[m][row] for m in range(self.members)], dim=1)  # [2, k, H, n, D]
            count = paged_after - paged_before
            if not count:  # most steps: the window grows by the step's tokens, nothing else is written
                self.pool.append(slot, steps)
                continue
            xs = torch.cat([self.pool.read(slot), steps], dim=-2)  # tokens paged_before .. total
            self.merge(table, paged_before, xs, count)
            self.pool.write(slot, xs[..., count:, :].clone())
        self._stash = {}
        self._states = {}
        self._stacked = {}


def _hold(comp: ComponentStore, fields: dict[str, Stored], retained: RetainedBlock, length: int) -> None:
    """Give an empty store ``comp`` units read from the pages: ``length`` tokens of ``fields`` (packed ones as
    packed, the others dense) and their retained entries."""
    for field, x in fields.items():
        if isinstance(x, QuantizedTensor):
            comp.fields[field].packed = x
        else:
            comp.fields[field].dense = x
    comp.length = length
    comp.retained_index = retained.index
    if isinstance(retained.value, QuantizedTensor):
        comp.retained_q = retained.value
    else:
        comp.retained_value = retained.value


def _tokens(x: Stored, start: int, end: int) -> Stored:
    """Tokens ``[start, end)`` of a ``[1, H, N, w]`` field, dense or packed."""
    return x.slice_tokens(start, end) if isinstance(x, QuantizedTensor) else x[:, :, start:end]


def _chunk(series: TokenSeries) -> int | None:
    """Tokens a field's quantizer packs together (:meth:`~minicache.quant.Quantizer.chunk_tokens`), None unpacked."""
    return None if series.quant is None else series.quant.quantizer.chunk_tokens(series.role, series.quant.group_size)


def _stacked_field(own: list[TokenSeries], runs: list[list[tuple[int, int, int]]], split: int,
                   ) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
    """One field of several requests' stores (``own``: their series) as one batch laid out by ``runs``
    (:meth:`PagedGroup._stack_states`): ``(packed, dense)``, the stacked tokens before ``split`` packed."""

    def take(series: TokenSeries, start: int, end: int) -> Stored:
        first = 0 if series.packed is None else series.packed.length
        return _tokens(series.packed, start, end) if end <= first else _tokens(series.dense, start - first, end - first)

    packed_rows, dense_rows = [], []
    for row in runs:
        parts, edge = ([], []), 0
        for i, start, end in row:
            if end > start:
                parts[0 if edge < split else 1].append(take(own[i], start, end))
            edge += end - start
        if parts[0]:
            packed_rows.append(functools.reduce(lambda a, b: a.cat(b), parts[0]))
        if parts[1]:
            dense_rows.append(torch.cat(parts[1], dim=-2))
    packed = functools.reduce(lambda a, b: a.cat(b, dim=0), packed_rows) if packed_rows else None
    return packed, (torch.cat(dense_rows) if dense_rows else None)


def _stack_retained(comp: ComponentStore, own: list[ComponentStore], offset: int) -> None:
    """Add to ``comp``'s retained entries those of every request's tail store ``own[i]`` (tokens from 0), as
    sequence ``i``, its tokens from ``offset`` on."""
    index = [] if comp.retained_index is None else [comp.retained_index]
    values = [v for v in (comp.retained_value, comp.retained_q) if v is not None]
    for i, store in enumerate(own):
        if store.retained_index is None or not store.retained_index.shape[0]:
            continue
        rows = store.retained_index.clone()
        rows[:, 0] = i
        rows[:, 2] += offset
        index.append(rows)
        values.append(store.retained_value if store.retained_q is None else store.retained_q)
    if not values:
        return
    comp.retained_index = torch.cat(index)
    if isinstance(values[0], QuantizedTensor):
        comp.retained_q = functools.reduce(lambda a, b: a.cat(b, dim=0), values)
    else:
        comp.retained_value = torch.cat(values)


def decode_path(value: str) -> str:
    """``value`` (``MINICACHE_VLLM_DECODE``) when it names one of :data:`DECODE_PATHS`; else a ValueError that
    lists them, with what each does."""
    if value not in DECODE_PATHS:
        choices = "; ".join(f"{name}: {what}" for name, what in DECODE_PATHS.items())
        raise ValueError(f"MINICACHE_VLLM_DECODE={value!r} is not a decode path ({choices})")
    return value


def reads_blockwise(decode: str) -> bool:
    """Whether decode steps under ``decode`` (one of :data:`DECODE_PATHS`) read the stored views a block at a
    time, rather than restoring them."""
    return decode != "restore"


def reads_fused(decode: str, device: torch.device) -> bool:
    """Whether decode steps under ``decode`` hand the views to the fused Triton decode kernel (which still
    falls back to PyTorch, logged, for views it does not read): ``fused`` always, ``auto`` where the kernels
    run on ``device`` without the interpreter."""
    return decode == "fused" or (decode == "auto" and kernels_usable(device, allow_interpreter=False))
