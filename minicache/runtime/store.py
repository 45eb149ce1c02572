"""The shared store of one merged group: residual window, block schedule, retained tokens, packing.

Each merged group of ``k ≥ 2`` adjacent layers owns ONE :class:`GroupStore`; the model sees one
:class:`~minicache.runtime.layers.MergedLayer` per member, a thin view that forwards to it. For keys
and for values separately (:class:`ComponentStore`) a store keeps:

* an exact **residual window** per member, ``[B, H, r, D]`` in the model dtype: the most recent
  tokens, not merged yet (prefill attention therefore runs on exact KV);
* the merged prefix of ``M`` tokens in the group's merge method's **stored form** (e.g. SLERP: one
  shared direction ``[B, H, M, D]`` and per-member magnitudes ``[B, H, M, k]``), each field a
  :class:`TokenSeries`, packed by the profile's quantizer where the method marks it quantizable;
* **retained** tokens that are too different to merge, as a sparse list: their positions
  ``[nnz, 3]`` (batch, head, token; int32) and every member's exact vectors ``[nnz, k, D]`` (packed
  per token in a quantized cache);
* the method's **tensors** from the profile's sidecar (e.g. SLERP's alignment), shared by every
  cache built from the same profile and counted by the memory report anyway (once per cache).

Encoding a block and restoring a member are the method's (:mod:`minicache.methods`); packing is the
quantizer's (:mod:`minicache.quant`); everything else here is the same for every method.

When the residual window holds at least ``residual_length + block_size`` tokens, the oldest whole
blocks are merged. Retention is decided per token from the range of the method's distances over a
forward window of the sequence's own next ``block_size`` tokens, which are still exact at merge
time; that keeps the decision independent of the other sequences in the batch, of left padding and
of how tokens were chunked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minicache.methods.base import Field
from minicache.profile import MergeGroup, MergeSettings, Quantization
from minicache.quant import QuantizedTensor, append
from minicache.runtime.retention import retention_mask
from minicache.runtime.rope import RopeAngles
from minicache.runtime.views import FieldSnapshot, MergedKVView, RetainedCSR, retained_csr_pair
from minicache.sidecar import held_copy

__all__ = ["ComponentStore", "GroupStore", "PaddingInfo", "TokenSeries", "tensor_bytes"]

_COMPONENTS = ("keys", "values")


#: Cache dtypes in which a method may hold its tensors (:attr:`MergeMethod.tensors_in_cache_dtype`).
HALF_DTYPES = (torch.bfloat16, torch.float16)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the tensors given (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class PaddingInfo:
    """Which positions of the batch are real tokens, as seen by the model's attention mask.

    Attributes
    ----------
    real : torch.Tensor or None
        ``[B, T]`` bool for all ``T`` positions seen so far; None means every position is real.
    """

    real: torch.Tensor | None = None

    def window(self, start: int, end: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Real-token mask ``[B, end-start]`` and count of real tokens before ``start`` ``[B]``."""
        if self.real is None or self.real.shape[0] != batch or self.real.shape[1] < end:
            real = torch.ones(batch, end - start, dtype=torch.bool, device=device)
            before = torch.full((batch,), start, dtype=torch.long, device=device)
            return real, before
        real_all = self.real.to(device)
        return real_all[:, start:end], real_all[:, :start].sum(dim=1)

    def upto(self, end: int, batch: int, device: torch.device) -> torch.Tensor:
        """``[B, end]`` bool: which of the first ``end`` positions are real tokens of each sequence.

        Positions the mask does not cover (a caller that stopped passing it) count as real.
        """
        known = self.real
        if known is None or known.shape[0] != batch:
            known = torch.ones(batch, 0, dtype=torch.bool, device=device)
        known = known[:, :end].to(device)
        if known.shape[1] < end:
            extra = torch.ones(batch, end - known.shape[1], dtype=torch.bool, device=device)
            known = torch.cat([known, extra], dim=1)
        return known


class TokenSeries:
    """A growing ``[B, H, N, width]`` tensor, packed a whole chunk of tokens at a time when quantized.

    Without a quantizer, appended tokens are concatenated as they are. With one, the oldest whole
    chunks (:meth:`~minicache.quant.Quantizer.chunk_tokens` of ``role``) are packed and never
    re-packed; a shorter tail stays dense until its chunk fills.
    """

    def __init__(self, quant: Quantization | None = None, role: str | None = None, bits: int = 0):
        self.quant = quant if role is not None else None
        self.role, self.bits = role, bits
        self.packed: QuantizedTensor | None = None
        self.dense: torch.Tensor | None = None

    def append(self, x: torch.Tensor) -> None:
        pending = x if self.dense is None else torch.cat([self.dense, x], dim=-2)
        if self.quant is None:
            self.dense = pending
            return
        chunk = self.quant.quantizer.chunk_tokens(self.role, self.quant.group_size)
        count = pending.shape[-2] // chunk * chunk
        if count == 0:
            self.dense = pending
            return
        packed = self.quant.pack(pending[..., :count, :], self.role, self.bits)
        rest = pending[..., count:, :]
        # A clone: a view would keep the whole pending block's storage alive.
        self.dense = rest.clone() if rest.shape[-2] else None
        self.packed = append(self.packed, packed)

    def select_batch(self, index: torch.Tensor) -> None:
        if self.dense is not None:
            self.dense = self.dense.index_select(0, index.to(self.dense.device))
        if self.packed is not None:
            self.packed = self.packed.index_select(0, index)

    def snapshot(self) -> FieldSnapshot:
        return FieldSnapshot(packed=self.packed, dense=self.dense)

    def parts(self, name: str) -> dict[str, int]:
        """Bytes held: the dense part under ``name``, codes under ``packed``, scales under ``scales``."""
        out = {name: tensor_bytes(self.dense), "packed": 0, "scales": 0}
        if self.packed is not None:
            out["packed"] += self.packed.code_bytes
            out["scales"] += self.packed.scale_bytes
        return out

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.dense is not None:
            yield self.dense
        if self.packed is not None:
            yield from self.packed.tensors()


class ComponentStore:
    """Keys or values of one merged group (see the module docstring for shapes).

    Parameters
    ----------
    name : str
        ``"keys"`` or ``"values"`` (the quantizer role of the method's component-like fields).
    settings : MergeSettings
        Method, its parameters, retention.
    members : int
        ``k``.
    tensors : dict of str to torch.Tensor
        The method's sidecar tensors for this component (moved to the data's device on first use).
    quant : Quantization or None
        Integer storage; ``bits`` is this group's width.
    bits : int
        Code width of this group (a profile may give one per layer; a group's members share it).
    rope : RopeAngles, optional
        The model's RoPE, required for keys with ``settings.pre_rope``: the method then sees the keys with
        RoPE removed at their cache indices (which are the positions: a padded batch keeps one cache per
        sequence), and every restore puts it back.
    """

    def __init__(self, name: str, settings: MergeSettings, members: int,
                 tensors: dict[str, torch.Tensor] | None = None, quant: Quantization | None = None, bits: int = 0,
                 rope: RopeAngles | None = None):
        if settings.pre_rope and rope is None:
            raise ValueError(f"{name} stored before RoPE (pre_rope) need the model's RoPE: build the cache with "
                             "the model or its config")
        self.rope = rope if settings.pre_rope else None
        self.name = name
        self.settings = settings
        self.method = settings.merge_method
        self.params = settings.params
        self.members = members
        self.tensors = dict(tensors or {})
        self.quant = quant
        self.bits = bits
        self.fields: dict[str, TokenSeries] = {
            f.name: TokenSeries(quant, f.role(name), bits) for f in self.method.fields
        }
        self.residual: list[torch.Tensor | None] = [None] * members
        self.length = 0  # merged tokens M
        self.retained_index: torch.Tensor | None = None
        self.retained_value: torch.Tensor | None = None
        self.retained_q: QuantizedTensor | None = None
        # (merged length, member, float32 restore, dequantized fields) of a closed-loop method's last
        # restored member
        self._chain: tuple | None = None
        self._separable = False  # a closed-loop method's packing was checked (_check_separable)

    def fresh(self) -> ComponentStore:
        """An empty store with the same settings (``reset``)."""
        return ComponentStore(self.name, self.settings, self.members, self.tensors, self.quant, self.bits, self.rope)

    # -- device ---------------------------------------------------------------------------------
    def _like(self) -> torch.Tensor | None:
        """A tensor of the data (its device and dtype), or None before any."""
        return next((r for r in self.residual if r is not None), None)

    def tensors_on_device(self) -> dict[str, torch.Tensor]:
        """The method's tensors on the data's device, and in its dtype where the method holds them so
        (:attr:`~minicache.methods.base.MergeMethod.tensors_in_cache_dtype`); converted once and
        shared with every store of the same profile (:func:`~minicache.sidecar.held_copy`)."""
        like = self._like()
        if like is not None:
            dtype = like.dtype if self.method.tensors_in_cache_dtype and like.dtype in HALF_DTYPES else None
            for local, t in self.tensors.items():
                self.tensors[local] = held_copy(t, like.device, dtype)
        return self.tensors

    # -- growth -----------------------------------------------------------------------------------
    def append(self, member: int, states: torch.Tensor) -> None:
        old = self.residual[member]
        self.residual[member] = states if old is None else torch.cat([old, states], dim=-2)

    def merge(
        self,
        count: int,
        window: int,
        real: torch.Tensor,
        real_before: torch.Tensor,
        *,
        use_kernel: bool = False,
    ) -> None:
        """Merge the oldest ``count`` tokens of the residual window into the stored form.

        ``real`` ``[B, r]`` flags real tokens of the whole window (the part beyond ``count`` is the
        retention look-ahead); ``real_before`` ``[B]`` counts real tokens already merged.
        ``use_kernel`` uses the method's fused merge kernel where it has one for these parameters
        (SLERP pairs); otherwise, and always for other methods, the torch reference runs.
        """
        xs = self.residual
        s = self.settings
        merged_before = self.length
        exclusive_rank = real_before.unsqueeze(1) + real.long().cumsum(dim=1) - real.long()
        sink = real & (exclusive_rank < s.sink_tokens)
        dtype = xs[0].dtype
        tensors = self.tensors_on_device()
        # before RoPE: the window turned back at its cache indices, float32 (what the method computes in)
        inputs = xs if self.rope is None else [self.rope.remove(x, merged_before) for x in xs]
        fused = self.method.fused_encode(self.params, self.members) if use_kernel and self.rope is None else None
        if fused is not None:
            fields, keep = fused(xs, tensors, s.gamma, s.retention, real, sink, window, count, dtype)
        else:
            if self.method.closed_loop:
                encoded = self.method.encode(self.params, inputs, tensors, roundtrip=self._roundtrip(dtype))
                self._check_separable(encoded, dtype)
            else:
                encoded = self.method.encode(self.params, inputs, tensors)
            if self.method.retains:
                keep = retention_mask(
                    encoded.distance, s.gamma, s.retention, valid=real, sink=sink, window=window, count=count
                )
            else:  # already exact: retaining would store tokens twice
                keep = torch.zeros((*encoded.distance.shape[:2], count), dtype=torch.bool,
                                   device=encoded.distance.device)
            fields = {name: t[..., :count, :] for name, t in encoded.fields.items()}
            fields = self.method.mark_retained(fields, keep)
            # Copies, not views: a view would keep the look-ahead tokens' float32 storage alive.
            fields = {f.name: fields[f.name].to(f.storage_dtype(dtype), copy=True) for f in self.method.fields}
        for name, series in self.fields.items():
            series.append(fields[name])
        self.length += count

        index = keep.nonzero()  # [nnz, 3] (b, h, n within this block)
        if index.shape[0] or self.retained_index is None:
            b, h, n = index.unbind(-1)
            value = torch.stack([x[b, h, n] for x in xs], dim=1)
            index = index.clone()
            index[:, 2] += merged_before
            index = index.to(torch.int32)
            if self.quant is not None:
                # A sparse list has no token order: packed per row ("vectors").
                packed = self.quant.pack(value, "vectors", self.bits)
                self.retained_q = append(self.retained_q, packed, dim=0)
            elif self.retained_value is None:
                self.retained_value = value
            else:
                self.retained_value = torch.cat([self.retained_value, value])
            self.retained_index = index if self.retained_index is None else torch.cat([self.retained_index, index])
        # Clone so that the old window's storage is freed, not kept alive by a view.
        self.residual = [r[..., count:, :].clone() for r in self.residual]

    def _roundtrip(self, dtype: torch.dtype):
        """What storage gives back for a closed-loop method's field (its only one), per member slice."""
        (field,) = self.method.fields
        storage = field.storage_dtype(dtype)
        role = field.role(self.name)
        if self.quant is None or role is None:
            return lambda r: r.to(storage)
        quant, quantizer, bits, group_size = self.quant, self.quant.quantizer, self.bits, self.quant.group_size
        if quantizer.chunk_tokens(role, group_size) != 1:
            raise ValueError(
                f"method {self.method.name!r} encodes against the restored field, which needs per-token packing; "
                f"the {quantizer.name!r} scheme packs {role} {quantizer.chunk_tokens(role, group_size)} tokens together"
            )
        return lambda r: quantizer.dequantize(quant.pack(r.to(storage), role, bits), storage)

    def _check_separable(self, encoded, dtype: torch.dtype) -> None:
        """Once per store: packing the whole field must equal packing each member's columns, or the
        closed loop encoded against something storage does not give back."""
        if self.quant is None or self._separable:
            return
        (field,) = self.method.fields
        value = encoded.fields[field.name][..., :1, :]
        roundtrip = self._roundtrip(dtype)
        try:
            whole = roundtrip(value)
        except ValueError:  # e.g. groups that do not divide k·D: they would mix members too
            whole = None
        parts = torch.cat([roundtrip(part) for part in value.chunk(self.members, dim=-1)], dim=-1)
        if whole is None or not torch.equal(whole, parts):
            raise ValueError(
                f"method {self.method.name!r} needs a packing that keeps each layer's columns apart; "
                f"{self.quant.quantizer.name!r} with group_size {self.quant.group_size} mixes them "
                "(use the kivi scheme with group_size <= head_dim)"
            )
        self._separable = True

    # -- reading --------------------------------------------------------------------------------
    def view(self, member: int, csr: RetainedCSR | None = None) -> MergedKVView:
        """One member's snapshot (see :class:`~minicache.runtime.views.MergedKVView`)."""
        tensors = self.tensors_on_device()
        merged = self.length > 0
        return MergedKVView(
            member=member,
            residual=self.residual[member],
            stored={name: series.snapshot() for name, series in self.fields.items()} if merged else {},
            method=self.method,
            params=self.params,
            tensors=tensors,
            # a frame is a fixed map; RoPE's turns with the position, so a pre-RoPE prefix is restored instead
            frame=self.method.frame(self.params, tensors, member) if self.rope is None else None,
            retained_value=self.retained_value,
            retained_q=self.retained_q,
            retained_index=self.retained_index,
            retained=csr,
            quantizer=None if self.quant is None else self.quant.quantizer,
            bits=self.bits,
            rope=self.rope,
        )

    def restored(self, member: int) -> torch.Tensor:
        """Full ``[B, H, M + r, D]`` tensor for one member: restored merged prefix + exact window."""
        if self.length == 0:
            return self.residual[member]
        view = self.view(member)
        if not self.method.closed_loop:
            return view.materialize()
        # Layers run in order: member j's restore is what member j + 1 predicts from, and the fields
        # it dequantized hold member j + 1's residual too. Both are held until the next member asks
        # and dropped after the last one (transients, like the restore itself).
        memo = self._chain
        below, block = memo[2:] if memo is not None and memo[:2] == (self.length, member - 1) else (None, None)
        chain, block = view.chain_block(0, self.length, below, block)
        self._chain = (self.length, member, chain, block) if member < self.members - 1 else None
        turned = chain if self.rope is None else self.rope.apply(chain, 0)
        dense = view.with_retained(turned.to(view.dtype, copy=True), 0, self.length)  # the memo stays as restored
        return torch.cat([dense, view.residual], dim=-2)

    # -- batch and memory -----------------------------------------------------------------------
    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences: new sequence ``i`` is old sequence ``index[i]``."""
        self.residual = [None if r is None else r.index_select(0, index.to(r.device)) for r in self.residual]
        self._chain = None
        if self.length == 0:
            return
        for series in self.fields.values():
            series.select_batch(index)
        old_batch = self.retained_index[:, 0].long()
        index = index.to(old_batch.device)
        new_b, entry = (old_batch.unsqueeze(0) == index.unsqueeze(1)).nonzero().unbind(-1)
        retained_index = self.retained_index[entry].clone()
        retained_index[:, 0] = new_b.to(torch.int32)
        self.retained_index = retained_index
        if self.retained_q is not None:
            self.retained_q = self.retained_q.index_select(0, entry)
        else:
            self.retained_value = self.retained_value[entry]

    def crop(self, count: int) -> None:
        self.residual = [None if r is None else r[..., : r.shape[-2] - count, :].clone() for r in self.residual]

    def retained_tokens(self) -> int:
        return 0 if self.retained_index is None else int(self.retained_index.shape[0])

    def memory_parts(self) -> dict[str, int]:
        """Bytes held, by part: the method's fields (under their ``part`` names), ``retained``
        (indices and exact vectors), ``residual``, the method's tensors (``tensor_part``), and for
        packed data ``packed`` (codes) and ``scales`` (scales and zero points)."""
        parts = {"residual": tensor_bytes(*self.residual), "retained": tensor_bytes(self.retained_index,
                                                                                    self.retained_value),
                 "packed": 0, "scales": 0, self.method.tensor_part: tensor_bytes(*self.tensors.values())}
        fields: dict[str, Field] = {f.name: f for f in self.method.fields}
        for name, series in self.fields.items():
            for part, nbytes in series.parts(fields[name].part).items():
                parts[part] = parts.get(part, 0) + nbytes
        if self.retained_q is not None:
            parts["packed"] += self.retained_q.code_bytes
            parts["scales"] += self.retained_q.scale_bytes
        return parts

    def tensors_held(self) -> Iterator[torch.Tensor]:
        for t in (*self.residual, self.retained_index, self.retained_value):
            if t is not None:
                yield t
        for series in self.fields.values():
            yield from series.tensors()
        if self.retained_q is not None:
            yield from self.retained_q.tensors()
        yield from self.tensors.values()


class GroupStore:
    """The single shared store of one merged group of layers (a pair, or k > 2 adjacent layers).

    Parameters
    ----------
    group : MergeGroup
        ``k ≥ 2`` adjacent layers and their keys/values settings.
    residual_length : int
        Minimum number of most recent tokens kept exact.
    block_size : int
        Tokens are merged in multiples of this many; also the retention look-ahead window.
    padding : PaddingInfo
        Shared with the owning cache, which updates it from the model's attention mask.
    tensors : dict, optional
        ``{"keys": {local: tensor}, "values": {...}}``: the methods' sidecar tensors.
    quant : Quantization, optional
        Integer storage (the group's width is that of its first layer).
    rope : RopeAngles, optional
        The model's RoPE, for keys stored before it (``pre_rope``).

    Attributes
    ----------
    merge_kernel : bool
        Merge with the method's fused kernel where it has one (set by the cache's attention plan).
    views : bool
        :meth:`update` returns :class:`~minicache.runtime.views.MergedKVView` snapshots instead of
        restored tensors, for the attention functions of ``enable_fused_attention`` (set once, when
        the cache is bound to a model's attention plan).
    """

    merge_kernel: bool = False
    views: bool = False

    def __init__(
        self,
        group: MergeGroup,
        residual_length: int,
        block_size: int,
        padding: PaddingInfo,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        quant: Quantization | None = None,
        rope: RopeAngles | None = None,
    ):
        self.layers = tuple(group.layers)
        self.quant = quant
        tensors = tensors or {}
        k = len(self.layers)
        def bits(name: str) -> int:  # members share a width (checked by the profile)
            return 0 if quant is None else quant.bits_of(self.layers[0], name)

        for name, settings in group.components():
            missing = [local for local in settings.tensor_names if local not in tensors.get(name, {})]
            if missing:
                raise ValueError(f"group {list(self.layers)}: {name} need the tensors {missing}, which were not given")
        self.components = {
            name: ComponentStore(name, settings, k, tensors.get(name), quant, bits(name), rope)
            for name, settings in group.components()
        }
        self.residual_length = residual_length
        self.block_size = block_size
        self.padding = padding
        self._csr_cache: tuple | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def merged_length(self) -> int:
        return self.components["keys"].length

    def residual_length_of(self, member: int) -> int:
        window = self.components["keys"].residual[member]
        return 0 if window is None else window.shape[-2]

    def seen(self, member: int) -> int:
        return self.merged_length + self.residual_length_of(member)

    def window_length(self) -> int:
        """Tokens every member's exact window holds (the members differ only within a step)."""
        return min(self.residual_length_of(m) for m in range(len(self.layers)))

    def batch_size(self) -> int:
        window = self.components["keys"].residual[0]
        return 0 if window is None else window.shape[0]

    def retained_count(self) -> dict[str, int]:
        return {name: component.retained_tokens() for name, component in self.components.items()}

    # -- the cache contract ------------------------------------------------------------------
    def update(self, member: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values = self.components["keys"], self.components["values"]
        for comp, states in ((keys, key_states), (values, value_states)):
            for other in comp.residual:
                if other is not None and other.device != states.device:
                    raise RuntimeError(
                        f"layers {self.layers} of a merged group live on different devices "
                        f"({other.device} and {states.device}); place all layers of a group on one device"
                    )
            comp.append(member, states)
        out = self.kernel_views(member) if self.views else (keys.restored(member), values.restored(member))
        # The deeper layer's update completes a step: every window now holds the same tokens.
        # Merge after computing `out`, so this step's attention still saw exact keys/values.
        if member == len(self.layers) - 1:
            self._maybe_merge()
        return out

    def _maybe_merge(self) -> None:
        window = self.window_length()
        count = (window - self.residual_length) // self.block_size * self.block_size
        if count <= 0:
            return
        start = self.merged_length
        sample = self.components["keys"].residual[0]
        real, before = self.padding.window(start, start + window, sample.shape[0], sample.device)
        for component in self.components.values():
            component.merge(count, self.block_size, real, before, use_kernel=self.merge_kernel)

    def kernel_views(self, member: int) -> tuple[MergedKVView, MergedKVView]:
        """Snapshots of one member's keys and values, with the retained lists grouped for kernels.

        The CSR lists of retained tokens are built once per change of the retained lists (a merge
        that retained something, a batch selection) and reused by every decode step in between.
        """
        keys, values = self.components["keys"], self.components["values"]
        cached = self._csr_cache
        if keys.length == 0:
            csr_k = csr_v = None
        elif cached is not None and cached[0] is keys.retained_index and cached[1] is values.retained_index:
            csr_k, csr_v = cached[2]
        else:
            b, h = keys.residual[member].shape[:2]
            csr_k, csr_v = retained_csr_pair(keys.retained_index, values.retained_index, b, h)
            if self.views:  # kept only where attention reads views every step (and counted: memory_parts)
                # Holding the index tensors keeps their identity meaningful (no id reuse).
                self._csr_cache = (keys.retained_index, values.retained_index, (csr_k, csr_v))
        return keys.view(member, csr_k), values.view(member, csr_v)

    def select_batch(self, index: torch.Tensor) -> None:
        for component in self.components.values():
            component.select_batch(index)

    def crop(self, count: int) -> None:
        window = self.window_length()
        if count > window:
            raise ValueError(
                f"cannot crop {count} tokens from merged layers {list(self.layers)}: only the exact residual "
                f"window ({window} tokens) can be cropped; merged tokens cannot be un-merged"
            )
        for component in self.components.values():
            component.crop(count)

    def reset(self) -> None:
        self.components = {name: c.fresh() for name, c in self.components.items()}
        self._csr_cache = None

    # -- memory ---------------------------------------------------------------------------------
    def memory_parts(self) -> dict[str, int]:
        """Bytes held by part, summed over keys and values (see :meth:`ComponentStore.memory_parts`)."""
        out: dict[str, int] = {}
        for component in self.components.values():
            for part, nbytes in component.memory_parts().items():
                out[part] = out.get(part, 0) + nbytes
        if self._csr_cache is not None:  # the retained lists grouped for the kernels
            csrs = self._csr_cache[2]
            out["retained"] += sum(tensor_bytes(c.offsets, c.pos, c.row, c.cross) for c in csrs if c is not None)
        return out

    def full_bytes(self) -> int:
        """Bytes a `DynamicCache` of the same dtype would hold for these layers' tokens."""
        full = 0
        for component in self.components.values():
            for member, window in enumerate(component.residual):
                if window is not None:
                    b, h, _, d = window.shape
                    full += b * h * self.seen(member) * d * window.element_size()
        return full

    def tensors(self) -> Iterator[torch.Tensor]:
        for component in self.components.values():
            yield from component.tensors_held()
        if self._csr_cache is not None:
            for csr in self._csr_cache[2]:
                if csr is not None:
                    yield from (csr.offsets, csr.pos, csr.row, csr.cross)

    def nbytes(self) -> int:
        """Bytes held, computed from shapes (tests check this against the tensors themselves)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

