"""Each request's exact recent window of a merged group, held outside vLLM's pages.

A merged group keeps its most recent tokens exact (at most ``residual_length + block_size − 1`` of
them between steps, every member's keys and values), as the transformers runtime does. vLLM's pages
hold a fixed number of bytes per token, and an exact token of ``k`` layers needs more than a merged
one, so the windows live in a pool of ``max_num_seqs`` slots allocated once; the plugin takes the
pool's bytes off vLLM's KV cache budget (``minicache_vllm.models``), so the same memory holds both.

vLLM does not tell an attention layer which request a batch row is. A running request's first
block id is its own (prefix caching, which would share blocks, is refused), so it keys the slot: a
request starting at position 0 takes a slot, a later step finds it again, and a slot whose key did
not appear in the last step it was needed is free for the next request.

An unmerged quantized layer whose profile stores its window coded (``quantization.window_bits``: 8 bits,
or 6 bits in the rotated frame) gets a pool of such windows: codes and their scales, about half the
bytes or less, as the runtime holds them.

Nothing here imports vLLM.
"""

from __future__ import annotations

import torch

from minicache.quant import QuantizedTensor
from minicache.quant.packed import scale_dtype
from minicache.runtime.layers import window_rotation

__all__ = ["WindowPool", "merged_length"]


def merged_length(tokens: int, residual_length: int, block_size: int) -> int:
    """Tokens of a sequence of ``tokens`` that the transformers runtime has merged after a step.

    It merges whole blocks once the exact window reaches ``residual_length + block_size``, so the
    merged length is ``(tokens − residual_length)`` rounded down to blocks (0 before that).
    """
    return max(0, (tokens - residual_length) // block_size * block_size)


class WindowPool:
    """``slots`` windows of ``capacity`` tokens: ``[slots, 2 (keys, values), k, heads, capacity, D]``.

    Parameters
    ----------
    slots : int
        Requests that can run at once (vLLM's ``max_num_seqs``).
    members, heads, head_dim, capacity : int
    dtype : torch.dtype
        The model's: exact windows hold it; coded ones restore to it.
    device : torch.device or str
    bits : int, optional
        Hold the windows as the runtime's coded windows (``Quantization.window_bits``, 8 or 6): codes per
        token and head (:attr:`data`, uint8, ``head_dim * bits / 8`` bytes; 6-bit codes in the rotated
        frame of :func:`~minicache.runtime.layers.stored_window`) with a scale and zero point each
        (:attr:`scale`, :attr:`zero`), read and written in that form (:meth:`read_stored`,
        :meth:`write_stored`). None: exact.
    """

    def __init__(self, slots: int, members: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", bits: int | None = None):
        if slots < 1 or capacity < 1:
            raise ValueError(f"a window pool needs at least one slot and one token, got {slots} slots x {capacity}")
        if bits not in (None, 6, 8):
            raise ValueError(f"a window pool holds exact, 8-bit or 6-bit windows, got bits={bits}")
        shape = (slots, 2, members, heads, capacity, head_dim)
        self.bits, self.dtype, self.head_dim = bits, dtype, head_dim
        # the rotation of the runtime's 6-bit windows (None: 8 bits and exact windows are not turned)
        self.rotation = None if bits is None else window_rotation(bits, head_dim, device)
        width = head_dim if bits is None else head_dim * bits // 8
        self.data = torch.zeros(*shape[:-1], width, dtype=dtype if bits is None else torch.uint8, device=device)
        self.scale = self.zero = None
        if bits is not None:
            self.scale, self.zero = (torch.zeros(*shape[:-1], 1, dtype=scale_dtype(dtype), device=device)
                                     for _ in range(2))
        self.length = [0] * slots
        self.capacity = capacity
        self._owner: dict[int, int] = {}  # first block id -> slot
        self._seen: list[int] = [-1] * slots  # step a slot was last used
        self._step = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def next_step(self) -> None:
        """Mark the start of an engine step (slots unused during the previous one become free)."""
        self._step += 1

    def slot(self, key: int, start: int) -> int:
        """The slot of the request whose first block is ``key``; ``start``: its tokens before this step.

        A request at ``start == 0`` is new: it gets a free slot (its old one, if its first block is
        reused) with an empty window.
        """
        if start == 0:
            slot = self._owner.pop(key, None)
            if slot is None:
                slot = self._free_slot()
            self._owner[key] = slot
            self.length[slot] = 0
        else:
            slot = self._owner.get(key)
            if slot is None:
                raise RuntimeError(
                    f"minicache_vllm: a request at position {start} has no exact window (first block {key}); "
                    "was it preempted and resumed without recomputation?"
                )
        self._seen[slot] = self._step
        return slot

    def _free_slot(self) -> int:
        taken = set(self._owner.values())
        free = [s for s in range(len(self.length)) if s not in taken]
        if not free:  # owners not seen in this step or the one before have finished
            stale = [(key, s) for key, s in self._owner.items() if self._seen[s] < self._step - 1]
            if not stale:
                raise RuntimeError(f"minicache_vllm: more than {len(self.length)} requests at once need exact windows "
                                   "(raise max_num_seqs)")
            key, slot = min(stale, key=lambda ks: self._seen[ks[1]])
            del self._owner[key]
            return slot
        return free[0]

    def read(self, slot: int) -> torch.Tensor:
        """``[2, k, heads, length, D]`` a slot's window in the model dtype (exact windows: a view)."""
        if self.bits is None:
            return self.data[slot, :, :, :, : self.length[slot]]
        return self.read_stored(slot).dequantize(self.dtype)

    def write(self, slot: int, window: torch.Tensor) -> None:
        """Replace a slot's exact window with ``[2, k, heads, n, D]`` (n ≤ capacity)."""
        if self.bits is not None:  # coding a restored window again would round its tokens twice
            raise TypeError("a coded window pool is written in stored form (write_stored)")
        self.data[slot, :, :, :, : self._room(window.shape[-2])] = window
        self.length[slot] = window.shape[-2]

    def append(self, slot: int, tokens: torch.Tensor) -> None:
        """Add ``tokens`` ``[2, k, heads, n, D]`` after a slot's exact window: writes those ``n`` tokens only
        (a decode step grows every window by one token; :meth:`write` would copy the whole window again)."""
        if self.bits is not None:
            raise TypeError("a coded window pool is appended to in stored form (append_stored)")
        n = self.length[slot]
        end = self._room(n + tokens.shape[-2])
        self.data[slot, :, :, :, n:end] = tokens
        self.length[slot] = end

    def read_padded(self, slots: list[int], member: int, steps: list[torch.Tensor],
                    skip: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Several requests' windows at ``member`` (request ``i``'s from its token ``skip[i]`` on, default 0),
        each followed by its step's token ``[2, heads, 1, D]``, as one padded ``[2, R, heads, max(w_i + 1), D]``
        batch in the model dtype (what lies beyond a row's ``w_i + 1`` tokens is finite and meaningless: readers
        mask it); and each ``w_i + 1``.

        One gather from the pool for the whole batch (a coded pool's codes restored once), rather than a
        copy per request: a decode step reads every running request's window at every layer.
        """
        skip = [0] * len(slots) if skip is None else skip
        lengths = [self.length[slot] - first for slot, first in zip(slots, skip, strict=True)]
        longest = max(lengths)
        index = torch.tensor(slots, device=self.data.device)
        if any(skip):  # token j of row i is the slot's token skip[i] + j
            tokens = torch.tensor(skip, device=index.device)[:, None] + torch.arange(longest, device=index.device)
            tokens = tokens.clamp_max(self.capacity - 1)[:, None, None, :, None]

            def select(t: torch.Tensor) -> torch.Tensor:
                rows = t[index, :, member]  # [R, 2, heads, capacity, width]
                return rows.gather(3, tokens.expand(*rows.shape[:3], longest, rows.shape[-1]))
        else:
            def select(t: torch.Tensor) -> torch.Tensor:
                return t[index, :, member, :, :longest]
        windows = select(self.data)  # [R, 2, heads, w, D]
        if self.bits is not None:
            windows = QuantizedTensor(windows, select(self.scale), select(self.zero), self.bits, self.head_dim,
                                      "channels", self.rotation).dequantize(self.dtype)
        rows, _, heads, _, dim = windows.shape
        out = windows.new_empty(2, rows, heads, longest + 1, dim)
        # Row i's tokens beyond w_i + 1 are left as read: an earlier request's tokens (finite: the pool starts at
        # zeros and only ever holds model keys and values), which every reader masks out. Zeroing them cost
        # 6 % of a 10-request decode step (integrations/vllm/bench/step_profile.py --quantized --requests 10).
        out[..., :longest, :] = windows.transpose(0, 1)
        out[..., longest, :] = 0  # the one column no window fills (allocated, not read from the pool)
        ends = torch.tensor(lengths, device=out.device)
        out[:, torch.arange(rows, device=out.device), :, ends] = torch.stack([step[:, :, 0] for step in steps])
        return out, [n + 1 for n in lengths]

    def read_stored(self, slot: int) -> QuantizedTensor:
        """A coded pool's window of ``slot`` as stored: ``[2, k, heads, length, D]`` codes (views)."""
        n = self.length[slot]
        data, scale, zero = (t[slot, :, :, :, :n] for t in (self.data, self.scale, self.zero))
        return QuantizedTensor(data, scale, zero, self.bits, self.head_dim, "channels", self.rotation)

    def write_stored(self, slot: int, window: QuantizedTensor) -> None:
        """Replace a coded pool's window of ``slot`` with ``window`` ``[2, k, heads, n, D]``, as stored."""
        self._check_stored(window)
        n = self._room(window.length)
        self.data[slot, :, :, :, :n] = window.data
        self.scale[slot, :, :, :, :n] = window.scale
        self.zero[slot, :, :, :, :n] = window.zero
        self.length[slot] = n

    def append_stored(self, slot: int, tokens: QuantizedTensor) -> None:
        """Add ``tokens`` ``[2, k, heads, n, D]``, as stored, after a coded pool's window of ``slot``."""
        self._check_stored(tokens)
        n = self.length[slot]
        end = self._room(n + tokens.length)
        self.data[slot, :, :, :, n:end] = tokens.data
        self.scale[slot, :, :, :, n:end] = tokens.scale
        self.zero[slot, :, :, :, n:end] = tokens.zero
        self.length[slot] = end

    def _check_stored(self, window: QuantizedTensor) -> None:
        if ((window.bits, window.axis, window.group_size) != (self.bits, "channels", self.head_dim)
                or (window.rotation is None) != (self.rotation is None)):
            raise ValueError(f"a {window.bits}-bit window in groups of {window.group_size} {window.axis} does not fit "
                             f"a pool of {self.bits}-bit windows per token and head")

    def _room(self, n: int) -> int:
        if n > self.capacity:
            raise RuntimeError(f"minicache_vllm: a window of {n} tokens exceeds the pool's {self.capacity}")
        return n
