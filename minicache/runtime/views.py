"""The kernel view contract: a read-only snapshot of one layer's keys (or values) as the cache stores them.

Attention paths that read the store directly (the blockwise torch path, the Triton decode kernel)
receive a :class:`MergedKVView` per layer, keys and values, instead of restored ``[B, H, T, D]``
tensors. A view stands for the tensor ``[B, H, M + r, D]``: a merged prefix of ``M`` tokens in a merge
method's stored form (each field packed by a quantizer, a dense tail, or both), the exact vectors of
retained tokens, then the exact residual window of ``r`` tokens. It knows nothing of the cache that
made it; a merge replaces the store's tensors (it never writes into them), so a view keeps describing
the state it was taken in.

* Any view: :meth:`MergedKVView.restored_block` restores (and dequantizes) one block of the prefix,
  :meth:`~MergedKVView.materialize` the whole tensor, :attr:`~MergedKVView.frame` says in which
  per-head frame the prefix is cheaper to attend.
* Views of the ``"direction_magnitude"`` layout (SLERP, averaging) and of unmerged quantized layers
  (``"vectors"``) also expose the tensors the Triton kernel reads: ``direction``/``qdirection``,
  ``magnitude``, ``rotation``, and the retained lists grouped by (sequence, head) (:class:`RetainedCSR`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from minicache.methods.base import Frame, MergeMethod, MethodParams
from minicache.quant.base import Quantizer
from minicache.quant.packed import QuantizedTensor
from minicache.runtime.rope import RopeAngles

__all__ = ["FieldSnapshot", "MergedKVView", "RetainedCSR", "decode_mask_bias", "decode_mask_row", "retained_csr_pair",
           "sink_index"]


@dataclass(frozen=True)
class FieldSnapshot:
    """One stored field of a merged prefix, ``[B, H, M, width]``: the oldest ``Mq`` tokens packed,
    the newest ``M - Mq`` dense (a quantized field's tail that does not fill a whole chunk yet, or the
    whole field when it is not quantized).

    Attributes
    ----------
    packed : QuantizedTensor or None
    dense : torch.Tensor or None
    """

    packed: QuantizedTensor | None = None
    dense: torch.Tensor | None = None

    @property
    def packed_length(self) -> int:
        return 0 if self.packed is None else self.packed.length

    @property
    def length(self) -> int:
        return self.packed_length + (0 if self.dense is None else self.dense.shape[-2])

    @property
    def alignment(self) -> int:
        """Blocks must start at multiples of this (a packed per-channel group cannot be split)."""
        return self.packed.group_size if self.packed is not None and self.packed.axis == "tokens" else 1

    def block(self, start: int, end: int, dtype: torch.dtype, *, rotated: bool = False) -> torch.Tensor:
        """Tokens ``[start, end)``: the packed part dequantized to ``dtype``, the dense part as stored.

        ``rotated``: in the packing's rotated frame (``x R``, :attr:`QuantizedTensor.rotation`) instead:
        the packed part is not rotated back and the dense tail is rotated in (it is shorter than a chunk).
        """
        mq = self.packed_length
        rotation = self.packed.rotation if rotated and self.packed is not None else None
        parts = []
        if start < mq:
            parts.append(self.packed.slice_tokens(start, min(end, mq)).dequantize(dtype, unrotate=rotation is None))
        if end > mq:
            dense = self.dense[..., max(start, mq) - mq : end - mq, :]
            if rotation is not None:
                dense = (dense.float() @ rotation.to(dense.device)).to(dtype)
            parts.append(dense)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def tensors(self):
        if self.packed is not None:
            yield from self.packed.tensors()
        if self.dense is not None:
            yield self.dense


@dataclass(frozen=True)
class RetainedCSR:
    """Retained tokens of one component grouped by (sequence, KV head), for kernels.

    Attributes
    ----------
    offsets : torch.Tensor
        ``[B*H + 1]`` int32; the entries of row ``b*H + h`` are ``offsets[bh]:offsets[bh+1]``.
    pos : torch.Tensor
        ``[nnz]`` int32 token index in the merged prefix, ascending within a row.
    row : torch.Tensor
        ``[nnz]`` int32 row of the component's retained vectors (kept in store order: no copy).
    cross : torch.Tensor
        ``[nnz]`` int32 row of the same (b, h, token) in the *other* component's retained vectors,
        or -1 when the other component merged that token.
    max_count : int
        Largest number of retained tokens of one row.
    """

    offsets: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor
    cross: torch.Tensor
    max_count: int


@functools.lru_cache(maxsize=64)
def sink_index(batch: int, heads: int, sinks: int, device: torch.device) -> torch.Tensor:
    """``[B·H·S, 3]`` int32 COO ``(b, h, n)`` of every row's first ``S`` tokens, in (b, h, n) order: an
    unmerged layer's exact sinks as retained entries (one tensor per shape, not one per layer and step)."""
    grid = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.int32) for n in (batch, heads, sinks)),
                          indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def retained_csr_pair(
    keys_index: torch.Tensor | None, values_index: torch.Tensor | None, batch: int, heads: int
) -> tuple[RetainedCSR, RetainedCSR]:
    """Build the CSR lists of retained keys and values (see :class:`RetainedCSR`).

    Parameters
    ----------
    keys_index, values_index : torch.Tensor or None
        ``[nnz, 3]`` int32 COO ``(b, h, n)`` of a store's retained keys / values, in store order.
    batch, heads : int
        ``B`` and ``H`` of the store.
    """

    def grouped(index: torch.Tensor | None):
        device = None if index is None else index.device
        if index is None or index.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, empty, torch.zeros(batch * heads, dtype=torch.long, device=device)
        index = index.long()
        bh = index[:, 0] * heads + index[:, 1]
        # One sortable key per (b, h, n); n < 2**32 always holds for a KV cache.
        key = bh * (1 << 32) + index[:, 2]
        order = torch.argsort(key)
        return key[order], order, index[order, 2], torch.bincount(bh, minlength=batch * heads)

    def cross(key: torch.Tensor, other_key: torch.Tensor, other_order: torch.Tensor) -> torch.Tensor:
        if other_key.numel() == 0:
            return torch.full_like(key, -1, dtype=torch.int32)
        at = torch.searchsorted(other_key, key).clamp_max(other_key.numel() - 1)
        found = other_key[at] == key
        return torch.where(found, other_order[at], -1).to(torch.int32)

    k_key, k_order, k_pos, k_count = grouped(keys_index)
    v_key, v_order, v_pos, v_count = grouped(values_index)
    out = []
    for key, order, pos, count, other_key, other_order in (
        (k_key, k_order, k_pos, k_count, v_key, v_order),
        (v_key, v_order, v_pos, v_count, k_key, k_order),
    ):
        offsets = torch.zeros(batch * heads + 1, dtype=torch.int32, device=count.device)
        offsets[1:] = count.cumsum(0)
        out.append(
            RetainedCSR(
                offsets=offsets,
                pos=pos.to(torch.int32),
                row=order.to(torch.int32),
                cross=cross(key, other_key, other_order),
                max_count=int(count.max()) if count.numel() else 0,
            )
        )
    return out[0], out[1]


@dataclass(frozen=True)
class MergedKVView:
    """Read-only snapshot of one layer's keys (or values): merged prefix, retained tokens, exact window.

    Attributes
    ----------
    member : int
        Which layer of the group (0 = the shallowest).
    residual : torch.Tensor
        ``[B, H, r, D]`` window (model dtype): exact, or a coded window's tokens as stored (the step's
        own new tokens exact).
    stored : mapping of str to FieldSnapshot
        The merged prefix in the method's stored form (``{}`` when nothing is merged yet). For an
        unmerged quantized layer (``method`` None), one field ``"vectors"`` holding the keys or
        values themselves.
    method : MergeMethod or None
        Restores members from the stored form; None: the prefix holds the vectors.
    params : MethodParams or None
    tensors : mapping of str to torch.Tensor
        The method's tensors for this group (e.g. ``rotation`` ``[k, H, D, D]``), on the data's device.
    frame : Frame or None
        The per-head frame this member's prefix lives in (``method.frame``), or None.
    retained_value : torch.Tensor or None
        ``[nnz, k, D]`` exact vectors of retained tokens, in store order (None when packed).
    retained_q : QuantizedTensor or None
        ``[nnz, k, D]`` packed retained vectors (per token).
    retained_index : torch.Tensor or None
        ``[nnz, 3]`` int32 COO ``(b, h, n)`` of the retained tokens, in store order.
    retained : RetainedCSR or None
        The same entries grouped by (b, h), for the Triton kernel (built only for its views).
    quantizer : Quantizer or None
        The scheme that packed the packed parts (None: nothing is packed).
    bits : int
        Their code width (0: nothing is packed).
    rope : RopeAngles or None
        Keys stored before RoPE (an unmerged layer's packing, or a merged group's ``pre_rope`` keys):
        restoring puts it back at the prefix's indices. Such a prefix has no :attr:`frame` and is not
        :attr:`factored`: it is restored a block at a time.
    """

    member: int
    residual: torch.Tensor
    stored: Mapping[str, FieldSnapshot] = field(default_factory=dict)
    method: MergeMethod | None = None
    params: MethodParams | None = None
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    frame: Frame | None = None
    retained_value: torch.Tensor | None = None
    retained_q: QuantizedTensor | None = None
    retained_index: torch.Tensor | None = None
    retained: RetainedCSR | None = None
    quantizer: Quantizer | None = None
    bits: int = 0
    rope: RopeAngles | None = None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def of_quantized_layer(
        cls, residual: torch.Tensor, packed: QuantizedTensor | None, quantizer: Quantizer | None = None,
        sinks: torch.Tensor | None = None, rope: RopeAngles | None = None,
    ) -> MergedKVView:
        """An unmerged quantized layer's keys or values: packed prefix + exact window, no method.

        A rotated packing (:attr:`QuantizedTensor.rotation`) is the prefix's :attr:`frame`: the blockwise
        path rotates the query and the output once per step instead of every packed token back.
        ``sinks`` ``[B, H, S, D]``: the prefix's first ``S`` tokens exact, as retained entries (the
        packed rows there hold a stand-in). ``rope``: the prefix was packed before RoPE (keys); restoring a
        block puts RoPE back at its indices, so it is not attended in the packing's frame.
        """
        if packed is None:
            return cls(member=0, residual=residual, quantizer=quantizer)
        frame = None
        if packed.rotation is not None and rope is None:
            h, d = residual.shape[1], packed.rotation.shape[-1]
            frame = Frame(packed.rotation.to(residual.device).expand(h, d, d))
        retained_value = retained_index = None
        if sinks is not None and sinks.shape[-2]:
            b, h, s, d = sinks.shape
            retained_index = sink_index(b, h, s, sinks.device)
            retained_value = sinks.reshape(b * h * s, 1, d)
        return cls(member=0, residual=residual, stored={"vectors": FieldSnapshot(packed=packed)},
                   quantizer=quantizer, bits=packed.bits, frame=frame, retained_value=retained_value,
                   retained_index=retained_index, rope=rope)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def merged_length(self) -> int:
        """``M``: tokens in the merged prefix."""
        return max((f.length for f in self.stored.values()), default=0)

    @property
    def shape(self) -> torch.Size:
        b, h, r, d = self.residual.shape
        return torch.Size((b, h, self.merged_length + r, d))

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype

    @property
    def device(self) -> torch.device:
        return self.residual.device

    @property
    def layout(self) -> str | None:
        """``"direction_magnitude"``, ``"vectors"`` (unmerged quantized layer), another method's
        ``kernel_layout``, or None (only the blockwise torch path reads it)."""
        return "vectors" if self.method is None else self.method.kernel_layout

    @property
    def block_alignment(self) -> int:
        """Blocks of the merged prefix must start at multiples of this (a packed key group)."""
        return max((f.alignment for f in self.stored.values()), default=1)

    @property
    def sink_count(self) -> int:
        """``S`` when the retained entries are an unmerged layer's exact sinks (the first ``S`` tokens of
        every row and head, indexed by the shared :func:`sink_index`), else 0."""
        if self.method is not None or self.retained_index is None:
            return 0
        b, h = self.residual.shape[:2]
        sinks = self.retained_count // (b * h)
        return sinks if sinks and self.retained_index is sink_index(b, h, sinks, self.retained_index.device) else 0

    @property
    def retained_count(self) -> int:
        if self.retained_index is not None:
            return int(self.retained_index.shape[0])
        return 0 if self.retained is None else int(self.retained.pos.numel())

    # -- what the Triton kernel reads (direction_magnitude and vectors layouts) ----------------
    def _prefix_field(self) -> FieldSnapshot | None:
        return self.stored.get("direction", self.stored.get("vectors"))

    @property
    def direction(self) -> torch.Tensor | None:
        """``[B, H, Md, D]`` dense tail of the directions (the whole prefix when nothing is packed)."""
        f = self._prefix_field()
        return None if f is None else f.dense

    @property
    def qdirection(self) -> QuantizedTensor | None:
        """``[B, H, Mq, D]`` packed directions (keys per channel, values per token)."""
        f = self._prefix_field()
        return None if f is None else f.packed

    @property
    def packed_length(self) -> int:
        f = self._prefix_field()
        return 0 if f is None else f.packed_length

    @property
    def magnitude(self) -> torch.Tensor | None:
        """``[B, H, M, k]`` every member's norms (retained tokens flagged negative), or None."""
        f = self.stored.get("magnitude")
        return None if f is None else f.dense

    @property
    def rotation(self) -> torch.Tensor | None:
        """``[H, D, D]`` this member's frame ``R`` (vectors are ``m · e Rᵀ``), or None."""
        return None if self.frame is None else self.frame.rotation

    def full_direction(self) -> torch.Tensor | None:
        """``[B, H, M, D]`` stored directions in the model dtype (packed part dequantized), or None."""
        f = self._prefix_field()
        if f is None or f.length == 0:
            return None
        return f.block(0, f.length, self.dtype)

    # -- restoring -----------------------------------------------------------------------------
    @functools.cached_property
    def _retained_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, h, pos, row)`` long tensors of every retained entry, computed once per snapshot
        (a view is one layer's state for one step; attention reads it a block at a time)."""
        if self.retained_index is not None:
            index = self.retained_index.long()
            rows = torch.arange(index.shape[0], device=index.device)
            return index[:, 0], index[:, 1], index[:, 2], rows
        csr = self.retained
        h = self.residual.shape[1]
        counts = (csr.offsets[1:] - csr.offsets[:-1]).long()
        bh = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return bh // h, bh % h, csr.pos.long(), csr.row.long()

    def restored_block(self, start: int, end: int, *, in_frame: bool = False,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """Merged tokens ``[start, end)`` restored, ``[B, H, end - start, D]`` in the model dtype.

        Only this block is dequantized and restored, and only the retained vectors inside it are
        read, so attention can walk the prefix a block at a time. ``start`` must be a multiple of
        :attr:`block_alignment`. ``in_frame``: leave the vectors in :attr:`frame` (no per-token map
        back; retained vectors are mapped into it), for callers that map the query (keys) or the
        output (values) instead. ``dtype``: restore in this dtype instead of the model's (attention
        computing in float32 asks for float32: no round trip through the model dtype).
        """
        dtype = self.dtype if dtype is None else dtype
        if self.method is None:  # an unmerged layer: the prefix holds the vectors (a rotated packing: its frame)
            rotated = in_frame and self.frame is not None
            if self.rope is None:
                dense = self.stored["vectors"].block(start, end, dtype, rotated=rotated)
            else:  # unrotated in the model dtype (its products are fast), turned by RoPE in float32
                dense = self.rope.apply(self.stored["vectors"].block(start, end, self.dtype), start).to(dtype)
            return self.with_retained(dense, start, end, in_frame=in_frame)  # exact sinks
        block = {name: f.block(start, end, dtype) for name, f in self.stored.items()}
        if self.rope is not None:  # restored before RoPE in float32, then turned at the block's indices
            dense = self.method.decode(self.params, block, self.member, self.tensors, torch.float32)
            return self.with_retained(self.rope.apply(dense, start).to(dtype), start, end)
        dense = self.method.decode(self.params, block, self.member, self.tensors, dtype, in_frame=in_frame)
        return self.with_retained(dense, start, end, in_frame=in_frame)

    def with_retained(self, dense: torch.Tensor, start: int, end: int, *, in_frame: bool = False) -> torch.Tensor:
        """``dense`` (merged tokens ``[start, end)`` as the method restores them) with the retained
        tokens inside written over, exact (in place; returned)."""
        sinks = self.sink_count
        if sinks:  # the first S rows of every (b, h): slices, no index search
            if start >= sinks:
                return dense
            stop = min(sinks, end)
            exact = self.retained_value.reshape(*dense.shape[:2], sinks, -1)[:, :, start:stop]
            if in_frame and self.frame is not None:
                exact = self.frame.into(exact).to(dense.dtype)
            dense[:, :, : stop - start] = exact
            return dense
        retained = self._retained_in(start, end)
        if retained is not None:
            b_idx, h_idx, pos, exact = retained
            if in_frame and self.frame is not None:  # x R, each row with its head's R
                exact = self.frame.rows(exact, h_idx).to(dense.dtype)
            dense[b_idx, h_idx, pos] = exact
        return dense

    def chain_block(self, start: int, end: int, below: torch.Tensor | None = None,
                    block: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A closed-loop method's restore of merged tokens ``[start, end)``, float32 and before retained
        tokens are written over (:meth:`~minicache.methods.base.MergeMethod.restore_chain`), and the
        dequantized fields it read. ``below``: the member below's restore, which saves restoring the
        chain under this member again; ``block``: those fields, already dequantized for it."""
        if block is None:
            block = {name: f.block(start, end, self.dtype) for name, f in self.stored.items()}
        return self.method.restore_chain(self.params, block, self.member, self.tensors, below=below), block

    @property
    def factored(self) -> bool:
        """Attention can score and sum this prefix from its stored form (:meth:`scores_block`) without restoring."""
        return self.method is not None and self.method.factored and self.rope is None

    def _retained_in(self, start: int, end: int):
        """Retained entries inside ``[start, end)``: ``(b, h, pos - start, exact [n, D])`` or None."""
        if not self.retained_count:
            return None
        b_idx, h_idx, pos, rows = self._retained_entries
        inside = (pos >= start) & (pos < end)
        if not inside.any():
            return None
        b_idx, h_idx, pos, rows = b_idx[inside], h_idx[inside], pos[inside] - start, rows[inside]
        if self.retained_q is not None:
            exact = self.retained_q.index_select(0, rows).dequantize(self.dtype)[:, self.member]
        else:
            exact = self.retained_value[rows, self.member]
        return b_idx, h_idx, pos, exact

    def scores_block(self, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits ``[B, H, G, end - start]`` float32 of ``q`` ``[B, H, G, D]`` (scaled, in :attr:`frame`)
        against merged tokens ``[start, end)``: from the stored form for :attr:`factored` methods
        (retained tokens exact), else against the restored block."""
        if not self.factored:
            restored = self.restored_block(start, end, in_frame=True, dtype=torch.float32)
            return torch.einsum("bhgd,bhnd->bhgn", q, restored)
        block = {name: f.block(start, end, self.dtype) for name, f in self.stored.items()}
        logits = self.method.factored_scores(self.params, q, block, self.member, self.tensors)
        retained = self._retained_in(start, end)
        if retained is not None:
            b_idx, h_idx, pos, exact = retained
            logits[b_idx, h_idx, :, pos] = torch.einsum("ngd,nd->ng", q[b_idx, h_idx], self._in_frame(exact, h_idx))
        return logits

    def _in_frame(self, exact: torch.Tensor, h_idx: torch.Tensor) -> torch.Tensor:
        """Exact vectors ``[n, D]`` (heads ``h_idx``) in :attr:`frame`, float32."""
        return exact.float() if self.frame is None else self.frame.rows(exact, h_idx).float()

    def values_block(self, probs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``Σ_n probs · v_n`` ``[B, H, G, D]`` float32 over merged tokens ``[start, end)`` (in
        :attr:`frame`): from the stored form for :attr:`factored` methods (retained tokens exact),
        else from the restored block."""
        if not self.factored:
            return torch.einsum("bhgn,bhnd->bhgd", probs,
                                self.restored_block(start, end, in_frame=True, dtype=torch.float32))
        block = {name: f.block(start, end, self.dtype) for name, f in self.stored.items()}
        out = self.method.factored_values(self.params, probs, block, self.member, self.tensors)
        retained = self._retained_in(start, end)
        if retained is not None:  # swap the restored vector of each retained token for its exact one
            b_idx, h_idx, pos, exact = retained
            rows = {name: t[b_idx, :, pos].unsqueeze(2) for name, t in block.items()}  # [n, H, 1, w]
            restored = self.method.decode(self.params, rows, self.member, self.tensors, self.dtype, in_frame=True)
            restored = restored[torch.arange(pos.numel(), device=pos.device), h_idx, 0]
            weight = probs[b_idx, h_idx, :, pos]  # [n, G]
            correction = self._in_frame(exact, h_idx) - restored.float()
            out.index_put_((b_idx, h_idx), weight.unsqueeze(-1) * correction.unsqueeze(1), accumulate=True)
        return out

    def materialize(self) -> torch.Tensor:
        """The restored ``[B, H, M + r, D]`` tensor (what the default torch path returns)."""
        m = self.merged_length
        if m == 0:
            return self.residual
        return torch.cat([self.restored_block(0, m), self.residual], dim=-2)


def decode_mask_row(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The query row of a decode-step attention mask, as ``[B, T]``.

    Parameters
    ----------
    attention_mask : torch.Tensor or None
        ``[B or 1, 1, 1, T]`` boolean (True = attend) or additive float mask, as transformers builds
        it for one query token, or a ``[B, T]`` row already; None when every position is attended.
    batch, length : int
        ``B`` and the key length ``T`` the mask must cover.

    Returns
    -------
    torch.Tensor or None
        ``[B, T]`` view (bool or float), or None.
    """
    if attention_mask is None:
        return None
    row = attention_mask
    if row.dim() == 4:
        if row.shape[1] != 1 or row.shape[2] != 1:
            raise ValueError(f"expected a [B, 1, 1, T] decode mask, got {tuple(row.shape)}")
        row = row[:, 0, 0, :]
    if row.dim() != 2 or row.shape[-1] != length:
        raise ValueError(f"mask of shape {tuple(attention_mask.shape)} does not cover {length} key positions")
    return row.expand(batch, length)


def decode_mask_bias(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The decode mask as an additive float32 bias ``[B, T]`` (0 / -inf for boolean masks), or None."""
    row = decode_mask_row(attention_mask, batch, length)
    if row is None:
        return None
    return torch.where(row, 0.0, -torch.inf) if row.dtype == torch.bool else row.float()
