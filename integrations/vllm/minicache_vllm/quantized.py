"""An unmerged layer of a quantized profile in pages: packed chunks in vLLM's pages, the rest exact.

The transformers runtime stores such a layer as a :class:`~minicache.runtime.layers.QuantizedLayer`:
a packed prefix of whole chunks (KIVI: ``group_size`` tokens), an exact window of the most recent
tokens and, with ``sink_tokens``, the first tokens exact. Here the chunks live in the pages
(:func:`~minicache_vllm.layout.quantized_layer_layout`), the window and the sinks in a pool of
``max_num_seqs`` slots (taken off vLLM's KV budget like a merged group's windows), and every step runs
the runtime's own ``QuantizedLayer.update`` on a layer rebuilt from them: the same packing, the same
restore, the same tokens.

Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minicache.quant import QuantizedTensor
from minicache.runtime.layers import QuantizedLayer, stored_window
from minicache.runtime.views import MergedKVView
from minicache_vllm.layout import UnitLayout, prefix_window_mask
from minicache_vllm.windows import WindowPool

__all__ = ["PagedQuantizedLayer"]


class PagedQuantizedLayer:
    """One unmerged quantized layer, with the step interface of :class:`~minicache_vllm.paged.PagedGroup`
    (one member).

    Parameters
    ----------
    template : QuantizedLayer
        The layer as :class:`minicache.MiniCache` builds it from the profile (scheme, widths, RoPE).
    layout : UnitLayout
        One chunk of packed keys and values per unit.
    pool : WindowPool
        One member, room for ``residual_length + chunk`` exact tokens per request.
    page_tokens : int
        vLLM's block size (a multiple of the chunk).
    pages : callable
        Returns the pages, ``[num_blocks, page bytes]`` uint8.
    layer_name : str
        The store layer's name.
    """

    members = 1
    #: A block-at-a-time decode reads every request's chunks at once, as views (:meth:`stacked_views`).
    stacks_decode_rows = True
    #: A restoring decode reads every request's chunks at once (:meth:`restored_rows`).
    restores_decode_rows = True

    def __init__(self, template: QuantizedLayer, layout: UnitLayout, pool: WindowPool, page_tokens: int,
                 pages: Callable[[], torch.Tensor], layer_name: str = ""):
        if layout.unit_tokens != template.chunk:
            raise ValueError(f"a quantized layer's unit must be its chunk ({template.chunk} tokens), "
                             f"got {layout.unit_tokens}")
        self.template = template
        self.layout = layout
        self.unit = layout.unit_tokens
        self.units_per_page = layout.units_per_page(page_tokens)
        self.pool = pool
        self.pages = pages
        self.layer_name = layer_name
        if pool.bits != template.spec.window_bits:
            raise ValueError(f"the layer stores its window at {template.spec.window_bits or 'full'} bits, the pool at "
                             f"{pool.bits or 'full'}")
        sinks = template.spec.sink_tokens
        slots, _, _, heads, _, _ = pool.data.shape  # its last: the codes' bytes in a coded pool
        head_dim = pool.head_dim
        # [slots, keys/values, H, S, D]: the first tokens, exact (their packed rows hold a stand-in)
        self.sinks = (torch.zeros(slots, 2, heads, sinks, head_dim, dtype=pool.dtype, device=pool.data.device)
                      if sinks else None)

    @property
    def nbytes(self) -> int:
        """Bytes held outside the pages (windows and sinks)."""
        sinks = 0 if self.sinks is None else self.sinks.numel() * self.sinks.element_size()
        return self.pool.nbytes + sinks

    def begin_step(self) -> None:
        self.pool.next_step()

    def member_kv(self, member: int, row: int, table: torch.Tensor, before: int,
                  step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[1, H, before + n, D]`` the layer attends for one request (``step``:
        ``[2, H, n, D]``, its new tokens); packs what leaves the window into the pages, as the runtime does."""
        return self._update(table, before, step, views=False)

    def member_views(self, member: int, row: int, table: torch.Tensor, before: int,
                     step: torch.Tensor) -> tuple[MergedKVView, MergedKVView]:
        """The same as :meth:`member_kv`, as views that attention reads a block at a time, packed."""
        return self._update(table, before, step, views=True)

    def _window(self, table: torch.Tensor, before: int) -> tuple[int, torch.Tensor]:
        """A request's window slot and its tokens ``[2, H, w, D]`` (those after its packed ones) as the
        runtime's layer reads them (a coded window: restored, with the exact sinks over its first rows
        until they are packed)."""
        slot = self.pool.slot(int(table[0]), before)
        window = self.pool.read(slot)[:, 0]
        known = self._sinks_over_window(before, before - window.shape[-2])
        if known:
            window[:, :, :known] = self.sinks[slot][:, :, :known]
        return slot, window

    def _sinks_over_window(self, before: int, packed: int) -> int:
        """Exact sinks written over the first rows of a request's restored window: a coded window's, while
        nothing is packed (after that the sinks belong to the packed prefix)."""
        return self._sinks_held(before, packed) if self.pool.bits is not None and not packed else 0

    def _sinks_held(self, before: int, packed: int) -> int:
        """Exact sinks :attr:`sinks` holds for a request: all of them once a chunk is packed; a coded
        window's, from their arrival (the runtime keeps them as they come, see ``QuantizedLayer``)."""
        sinks = self.template.spec.sink_tokens
        if not sinks:
            return 0
        return sinks if packed else (min(before, sinks) if self.pool.bits is not None else 0)

    def _update(self, table: torch.Tensor, before: int, step: torch.Tensor, *, views: bool):
        slot, window = self._window(table, before)
        packed = before - window.shape[-2]
        t = self.template
        layer = QuantizedLayer(t.spec, t.bits, t.value_bits, t.rope, t.key_weights)
        layer.views = views
        layer.lazy_initialization(step[0].unsqueeze(0), step[1].unsqueeze(0))
        if self.pool.bits is None:
            layer.keys, layer.values = window[0].unsqueeze(0), window[1].unsqueeze(0)
        else:  # as stored: the layer restores them itself, and packs from its codes
            stored = self.pool.read_stored(slot)  # [2, 1, H, w, D]
            layer.keys, layer.values = stored.pick(0), stored.pick(1)
        known = self._sinks_held(before, packed)
        if known:
            layer.sink_keys, layer.sink_values = (s[:, :known].unsqueeze(0) for s in self.sinks[slot])
        pages = self.pages()
        if packed:
            fields = self.layout.read_fields(self.layout.units(pages, table, packed // self.unit, self.units_per_page))
            layer.qkeys, layer.qvalues = fields["keys"]["vectors"], fields["values"]["vectors"]
        keys, values = layer.update(step[0].unsqueeze(0), step[1].unsqueeze(0))
        for j in range(packed // self.unit, layer.quantized_length // self.unit):
            lo, hi = j * self.unit, (j + 1) * self.unit
            self.layout.write_fields(self.layout.unit(pages, table, j, self.units_per_page), {
                "keys": {"vectors": layer.qkeys.slice_tokens(lo, hi)},
                "values": {"vectors": layer.qvalues.slice_tokens(lo, hi)},
            })
        if packed == 0 and layer.sink_keys is not None:
            held = layer.sink_keys.shape[-2]
            self.sinks[slot][:, :, :held] = torch.stack([layer.sink_keys[0], layer.sink_values[0]])
        if self.pool.bits is None:
            self.pool.write(slot, torch.stack([layer.keys[0], layer.values[0]]).unsqueeze(1))
        else:
            self.pool.write_stored(slot, QuantizedTensor.stack([layer.keys, layer.values]))
        return keys, values

    def stacked_views(self, member: int, rows: list[tuple[int, torch.Tensor, int, torch.Tensor]],
                      ) -> tuple[MergedKVView, MergedKVView, torch.Tensor]:
        """The keys and values of :meth:`restored_rows` as views that attention reads a block at a time
        (packed), not restored; the mask is always given. Each request's step is stored the same way."""
        keys, values, packed, sizes = self._batch(rows)
        return keys, values, prefix_window_mask(packed, sizes, keys.device)

    def restored_rows(self, member: int, rows: list[tuple[int, torch.Tensor, int, torch.Tensor]],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values several requests' decode rows attend, restored as one padded batch; then each
        request's step is stored as :meth:`member_kv` stores it.

        The runtime restores before it packs (``QuantizedLayer.update``), so a step attends the packed prefix
        as it was before the step, its exact window and the new token, whatever leaves the window after.
        That restore runs here once for the batch: every request's chunks gathered in one grid (the longest
        request's chunks standing in for missing ones), parsed once, dequantized and put back into RoPE
        once (a packed prefix starts at position 0 in every request). Requests whose window fills a chunk
        in this step then pack it through the runtime's own layer (:meth:`member_kv`'s path); the others
        only grow their window.

        Parameters
        ----------
        rows : list of (int, torch.Tensor, int, torch.Tensor)
            Per request: its row in the step's batch, block ids, tokens before the step, ``[2, H, 1, D]`` its
            new key and value.

        Returns
        -------
        keys, values : torch.Tensor
            ``[R, H, N_max + r_max, D]``: request ``i``'s packed prefix at ``0 .. N_i``, its window and new
            token from ``N_max`` on.
        mask : torch.Tensor or None
            ``[R, N_max + r_max]`` bool, True where a request's own tokens are (None: nothing padded).
        """
        keys, values, packed, sizes = self._batch(rows)
        keys, values = keys.materialize(), values.materialize()
        padded = min(packed) < max(packed) or min(sizes) < max(sizes)
        return keys, values, prefix_window_mask(packed, sizes, keys.device) if padded else None

    def _batch(self, rows: list[tuple[int, torch.Tensor, int, torch.Tensor]],
               ) -> tuple[MergedKVView, MergedKVView, list[int], list[int]]:
        """Views of several requests' packed prefixes and windows as one padded batch (:meth:`restored_rows`),
        each request's packed and window tokens; then each request's step stored."""
        slots = [self.pool.slot(int(table[0]), before) for _, table, before, _ in rows]
        lengths = [self.pool.length[slot] for slot in slots]
        packed = [before - n for (_, _, before, _), n in zip(rows, lengths, strict=True)]
        residual, sizes = self.pool.read_padded(slots, 0, [step for *_, step in rows])  # [2, R, H, r_max, D]
        for i, ((_, _, before, _), slot) in enumerate(zip(rows, slots, strict=True)):
            known = self._sinks_over_window(before, packed[i])  # as _window reads them
            if known:
                residual[:, i, :, :known] = self.sinks[slot][:, :, :known]
        t = self.template
        fields = {"keys": {"vectors": None}, "values": {"vectors": None}}
        exact = [None, None]  # the sinks of keys and values
        if max(packed):
            grid = self.layout.padded_units(self.pages(), [table for _, table, _, _ in rows],
                                            [n // self.unit for n in packed], self.units_per_page)
            fields = self.layout.read_fields(grid, batch=len(rows))
            if self.sinks is not None:
                exact = self.sinks[torch.tensor(slots, device=self.sinks.device)].unbind(1)  # [R, H, S, D]
        keys = MergedKVView.of_quantized_layer(residual[0], fields["keys"]["vectors"], t.quantizer, exact[0], t.rope)
        values = MergedKVView.of_quantized_layer(residual[1], fields["values"]["vectors"], t.quantizer, exact[1])
        chunk, window = self.template.chunk, self.template.spec.residual_length
        bits, sinks = self.pool.bits, self.template.spec.sink_tokens
        for (_, table, before, step), slot, length in zip(rows, slots, lengths, strict=True):
            if (length + 1 - window) // chunk > 0 or (bits is not None and before < sinks):
                self._update(table, before, step, views=True)  # a chunk leaves the window (or a sink arrives)
            elif bits is None:
                self.pool.append(slot, step.unsqueeze(1))
            else:  # the new token coded once, as the runtime codes it; the stored ones as they are
                self.pool.append_stored(slot, stored_window(step.unsqueeze(1), bits))
        return keys, values, packed, sizes

    def end_step(self, rows) -> None:
        """Nothing left to do: each call packs its own layer."""
