"""A padded batch stored one sequence at a time: what a sequence stores, and when, depends on its own tokens.

A merged group's store keeps one dense ``[B, H, M, ...]`` prefix whose block schedule (merge when the
window holds ``residual_length + block_size`` tokens) counts *positions*; a quantized layer packs
whole chunks of positions. In a left-padded batch the positions of a short sequence are partly
padding, so with one schedule for the batch it would merge (or pack) different tokens, at different
steps, than alone — and get different greedy tokens. Once a :class:`~minicache.runtime.cache.MiniCache`
sees padding before its first token, it therefore keeps every sequence in a cache of its own
(:class:`RowBatch`, one batch-1 ``MiniCache`` per sequence) that receives that sequence's real tokens
only: each sequence is stored exactly as if it ran alone, byte for byte.

Only the layers whose storage has a schedule (merged members and quantized unmerged layers) are kept
per sequence, behind one :class:`RowLayer` each; plain layers stay transformers' own, padded, as in
`DynamicCache`. The model still sees padded tensors: a :class:`RowLayer` hands attention each
sequence's keys and values at its real positions and zeros at its padding, which the attention mask
hides; under minicache's attention (``enable_fused_attention``) a decode step instead gets each
sequence's views (:class:`RowKV`) and attends one sequence at a time with the fused paths. The price:
per-sequence work (Python, kernel launches) on every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from minicache.runtime.layers import OwnedLayer
from minicache.runtime.store import PaddingInfo
from minicache.runtime.views import MergedKVView
from minicache.sidecar import held_copies

__all__ = ["RowBatch", "RowKV", "RowLayer"]


@dataclass
class RowKV:
    """Keys or values of one layer of a padded batch stored per sequence, as attention receives them
    when the model's attention is minicache's (views, read by the fused decode paths).

    Attributes
    ----------
    rows : list of MergedKVView or torch.Tensor or None
        Each sequence's keys (or values) over its real tokens only: ``n_i`` tokens (None: none yet).
    positions : list of torch.Tensor
        Each sequence's real positions among the ``length`` positions of the batch, ``[n_i]`` int64.
    length : int
        Positions ``T`` of the padded batch (what the attention mask spans).
    shape : tuple of int
        ``(B, H, T, D)`` of :meth:`materialize`'s result.
    dtype : torch.dtype
    """

    rows: list[MergedKVView | torch.Tensor | None]
    positions: list[torch.Tensor]
    length: int
    shape: tuple[int, int, int, int]
    dtype: torch.dtype

    def materialize(self) -> torch.Tensor:
        """``[B, H, T, D]``: each sequence's restored keys (values) at its real positions, zeros at padding."""
        device = self.positions[0].device
        out = torch.zeros(self.shape, dtype=self.dtype, device=device)
        for i, (row, where) in enumerate(zip(self.rows, self.positions, strict=True)):
            if row is not None:
                out[i, :, where] = (row.materialize() if isinstance(row, MergedKVView) else row)[0].to(self.dtype)
        return out

    def mask_of(self, attention_mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
        """Sequence ``i``'s rows of a 4-D attention mask, over its real positions only."""
        if attention_mask is None:
            return None
        return attention_mask[i : i + 1, ..., self.positions[i].to(attention_mask.device)]


class RowBatch:
    """The sequences of a padded batch, each in a batch-1 cache of its own.

    Parameters
    ----------
    make_row : callable
        Builds one empty batch-1 cache (a ``MiniCache`` of the same profile and model).
    batch : int
        Sequences ``B``.
    num_layers : int
        Layers of the model (positions are counted per layer: within a forward, layers update in turn).
    padding : PaddingInfo
        The owning cache's view of the attention mask: ``real`` ``[B, T]``, 1 for real tokens.
    shared : iterable of torch.Tensor
        Tensors every row references and a copy must not duplicate (the profile's sidecar tensors).
    """

    def __init__(self, make_row: Callable[[], object], batch: int, num_layers: int, padding: PaddingInfo,
                 shared: Iterator[torch.Tensor] = ()):
        self.rows = [make_row() for _ in range(batch)]
        self.positions = [0] * num_layers  # positions (padding included) each layer has seen
        self.padding = padding
        self._shared = list(shared)

    def __len__(self) -> int:
        return len(self.rows)

    def _locate(self, start: int, end: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sequence: its real positions among ``[start, end)`` (the new ones) and among ``[0, end)``."""
        real = self.padding.upto(end, len(self.rows), device)
        return [row[start:end].nonzero().squeeze(-1) for row in real], [row.nonzero().squeeze(-1) for row in real]

    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Give each sequence its real new tokens; return ``[B, H, T, D]`` keys and values, zeros at padding."""
        batch, _, new, _ = key_states.shape
        if batch != len(self.rows):
            raise ValueError(f"a batch of {batch} sequences reached a cache that holds {len(self.rows)}")
        start = self.positions[layer_idx]
        end = start + new
        fresh, positions = self._locate(start, end, key_states.device)
        outputs = []
        for i, row in enumerate(self.rows):
            if fresh[i].numel() == 0 and not row.layers[layer_idx].is_initialized:
                outputs.append((None, None))  # nothing of this sequence yet (a prefill chunk of padding only)
                continue
            outputs.append(
                row.update(key_states[i : i + 1, :, fresh[i]], value_states[i : i + 1, :, fresh[i]], layer_idx)
            )
        self.positions[layer_idx] = end
        keys, values = (
            RowKV([out[c] for out in outputs], positions, end, (batch, states.shape[1], end, states.shape[-1]),
                  states.dtype)
            for c, states in enumerate((key_states, value_states))
        )
        if any(isinstance(out[0], MergedKVView) for out in outputs):
            return keys, values  # minicache's attention reads the rows' views
        return keys.materialize(), values.materialize()

    def select(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences: new sequence ``i`` is old sequence ``index[i]``."""
        # the profile's tensors and the copies caches hold of them (another device or dtype): shared, not copied
        memo = {id(t): t for s in self._shared for t in (s, *held_copies(s))}
        taken: set[int] = set()
        rows = []
        for i in index.tolist():
            # A sequence kept twice (beam search, repeat_interleave) gets an independent copy.
            rows.append(self.rows[i] if i not in taken else copy.deepcopy(self.rows[i], dict(memo)))
            taken.add(i)
        self.rows = rows

    def crop(self, count: int) -> None:
        """Drop the last ``count`` positions, which must be real tokens of every sequence."""
        end = max(self.positions)
        real = self.padding.upto(end, len(self.rows), torch.device("cpu"))
        if count and self.padding.real is not None and not bool(real[:, end - count :].all()):
            raise ValueError(f"cannot crop {count} positions: some of them are padding of a sequence")
        for row in self.rows:
            row.crop(-count)
        self.positions = [max(p - count, 0) for p in self.positions]


class RowLayer(OwnedLayer):
    """One layer of a :class:`RowBatch`: what transformers' `Cache` holds for it in a padded batch."""

    owner = "the rows"

    def __init__(self, rows: RowBatch, layer_idx: int):
        super().__init__()
        self.rows = rows
        self.layer_idx = layer_idx

    def __repr__(self) -> str:
        return f"RowLayer(layer={self.layer_idx}, sequences={len(self.rows)})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Bytes per position of one sequence, as a padded `DynamicCache` layer holds them.
        self._position_bytes = (key_states.shape[1] * key_states.shape[-1] * key_states.element_size()
                                + value_states.shape[1] * value_states.shape[-1] * value_states.element_size())
        self.is_initialized = True

    def full_bytes(self) -> int:
        """Bytes a `DynamicCache` layer would hold for this padded batch (padding included)."""
        return len(self.rows) * self.get_seq_length() * self._position_bytes if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.rows.update(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.rows.positions[self.layer_idx]

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def reset(self) -> None:
        self.is_initialized = False
