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

Nothing here imports vLLM.
"""

from __future__ import annotations

import torch

__all__ = ["WindowPool", "merged_length", "padded_windows"]


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
    device : torch.device or str
    """

    def __init__(self, slots: int, members: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if slots < 1 or capacity < 1:
            raise ValueError(f"a window pool needs at least one slot and one token, got {slots} slots x {capacity}")
        self.data = torch.zeros(slots, 2, members, heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = [0] * slots
        self.capacity = capacity
        self._owner: dict[int, int] = {}  # first block id -> slot
        self._seen: list[int] = [-1] * slots  # step a slot was last used
        self._step = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

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
        """``[2, k, heads, length, D]`` view of a slot's window."""
        return self.data[slot, :, :, :, : self.length[slot]]

    def write(self, slot: int, window: torch.Tensor) -> None:
        """Replace a slot's window with ``[2, k, heads, n, D]`` (n ≤ capacity)."""
        n = window.shape[-2]
        if n > self.capacity:
            raise RuntimeError(f"minicache_vllm: a window of {n} tokens exceeds the pool's {self.capacity}")
        self.data[slot, :, :, :, :n] = window
        self.length[slot] = n


def padded_windows(windows: list[torch.Tensor], steps: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Requests' exact windows ``[2, H, w_i, D]``, each followed by its step's token ``[2, H, 1, D]``, as one
    zero-padded ``[2, R, H, max(w_i + 1), D]`` batch; and each request's ``w_i + 1``."""
    sizes = [w.shape[-2] + 1 for w in windows]
    _, h, _, d = steps[0].shape
    out = steps[0].new_zeros(2, len(steps), h, max(sizes), d)
    for i, (window, step) in enumerate(zip(windows, steps, strict=True)):
        out[:, i, :, : sizes[i] - 1] = window
        out[:, i, :, sizes[i] - 1] = step[:, :, 0]
    return out, sizes
