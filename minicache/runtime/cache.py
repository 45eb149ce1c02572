"""`MiniCache`: a transformers `Cache` that stores merged groups of layers once.

Layout (DESIGN.md §2–3). Each merged group of ``k ≥ 2`` adjacent layers owns ONE
:class:`MergedPairStore`; the model sees one :class:`MergedLayer` per member layer, a thin view
that forwards to the shared store. Layers that no group names use transformers' own dynamic
layers, so they behave exactly like `DynamicCache`.

A store keeps, for keys and for values separately:

* an exact **residual window** per member layer, ``[B, H, r, D]`` in the model dtype: the most
  recent tokens, not merged yet (prefill attention therefore runs on exact KV);
* the merged prefix of ``M`` tokens: one shared **direction** ``[B, H, M, D]`` (model dtype) and
  per-layer **magnitudes** ``[B, H, M, k]``;
* **retained** tokens that are too different to merge, as a sparse list: their positions
  ``[nnz, 3]`` (batch, head, token; int32) and every member's exact vectors ``[nnz, k, D]``;
* for aligned components (issue 7), the group's **rotation** ``[k, H, D, D]`` float32 from the
  profile's sidecar: directions live in the aligned frame and member ``i`` is restored through
  ``R_iᵀ``. It is shared by every cache built from the same profile and counted by
  :meth:`MiniCache.memory_report` anyway (conservatively, once per cache).

With a profile's ``quantization`` (issue 6, :mod:`minicache.runtime.quant`) the merged directions
and the retained vectors are stored packed (keys per channel, values and retained vectors per
token), magnitudes stay fp16, and unmerged full-attention layers become
:class:`~minicache.runtime.quant.QuantizedDynamicLayer`. On the torch path a quantized store
dequantizes, then attends; the fused decode kernel reads the packed codes, scales and zero points
directly (merged groups and unmerged quantized layers alike) and dequantizes in registers.

When the residual window holds at least ``residual_length + block_size`` tokens, the oldest whole
blocks are merged. Retention is decided per token from the range of angular distances over a
forward window of the sequence's own next ``block_size`` tokens, which are still exact at merge
time; that keeps the decision independent of the other sequences in the batch, of left padding
and of how tokens were chunked.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from minicache.profile import PROFILE_FILENAME, MergeGroup, MergeProfile, MergeSettings, Quantization
from minicache.runtime.merge import merge_group, restore, retention_mask, rotate
from minicache.runtime.quant import (
    QuantizedDynamicLayer,
    QuantizedTensor,
    append,
    quantize_keys,
    quantize_values,
)

_COMPONENTS = ("keys", "values")
#: Magnitude stored for retained tokens (norms are never negative).
RETAINED_MAGNITUDE = -1.0


def _magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms need more range than precision: fp16 holds them to 0.05 % for half-precision models;
    # bf16's 3 significant digits would not. Full-precision models keep fp32.
    return torch.float32 if dtype.itemsize >= 4 else torch.float16


def stored_prefix(
    qdirection: QuantizedTensor | None, direction: torch.Tensor | None, dtype: torch.dtype, start: int, end: int
) -> torch.Tensor:
    """Merged tokens ``[start, end)`` of a stored prefix, ``[B, H, end - start, D]`` in ``dtype``.

    The prefix is ``qdirection`` (the oldest ``Mq`` tokens, packed; only the requested part is
    dequantized) followed by ``direction`` (the newest tokens, model dtype).
    """
    mq = 0 if qdirection is None else qdirection.length
    parts = []
    if start < mq:
        parts.append(qdirection.slice_tokens(start, min(end, mq)).dequantize(dtype))
    if end > mq:
        parts.append(direction[..., max(start, mq) - mq : end - mq, :])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def merged_bytes_per_token(head_dim: int, dtype: torch.dtype, retained_fraction: float) -> float:
    """Bytes a merged pair holds per (sequence, KV head, token) for keys or for values.

    The layout of :class:`MergedPairStore`: one shared direction ``[D]`` in the model dtype and two
    magnitudes for every merged token, plus, for the retained fraction, both layers' exact vectors
    ``[2, D]`` and a ``[3]`` int32 index. Two unmerged layers hold ``2 * D`` elements instead.
    The calibrator's search uses this to predict what a group saves.
    """
    element = torch.empty((), dtype=dtype).element_size()
    magnitude = torch.empty((), dtype=_magnitude_dtype(dtype)).element_size()
    return head_dim * element + 2 * magnitude + retained_fraction * (2 * head_dim * element + 3 * 4)


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


class _ComponentStore:
    """Keys or values of one merged group (see module docstring for shapes).

    With ``quant`` (issue 6) the merged prefix of ``M`` tokens is split in a packed part
    ``qdirection`` (``[B, H, Mq, D]`` quantized; keys per channel, values per token) and
    ``direction``, the ``M - Mq`` newest merged directions in the model dtype that do not fill a
    whole key group yet (always empty for values); retained tokens' exact vectors are quantized
    per token into ``retained_q`` (``[nnz, k, D]``) and ``retained_value`` stays None. Magnitudes
    are never quantized.
    """

    def __init__(
        self,
        settings: MergeSettings,
        members: int = 2,
        rotation: torch.Tensor | None = None,
        quant: Quantization | None = None,
        name: str = "keys",
    ):
        self.settings = settings
        self.members = members
        self.rotation = rotation  # [k, H, D, D] float32 or None; moved to the data's device on first use
        self.quant = quant
        self.name = name
        self.residual: list[torch.Tensor | None] = [None] * members
        self.length = 0  # merged tokens M
        self.direction: torch.Tensor | None = None
        self.qdirection: QuantizedTensor | None = None
        self.magnitude: torch.Tensor | None = None
        self.retained_index: torch.Tensor | None = None
        self.retained_value: torch.Tensor | None = None
        self.retained_q: QuantizedTensor | None = None

    def quantized_tensors(self) -> Iterator[QuantizedTensor]:
        yield from (q for q in (self.qdirection, self.retained_q) if q is not None)

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (*self.residual, self.direction, self.magnitude, self.retained_index, self.retained_value):
            if t is not None:
                yield t
        for q in self.quantized_tensors():
            yield from q.tensors()
        if self.rotation is not None:
            yield self.rotation

    def full_direction(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[B, H, M, D]`` directions of the merged prefix (dequantized where packed)."""
        if self.length == 0:
            return None
        return stored_prefix(self.qdirection, self.direction, dtype, 0, self.length)

    def retained_values(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[nnz, k, D]`` exact (or dequantized) vectors of the retained tokens."""
        if self.retained_q is not None:
            return self.retained_q.dequantize(dtype)
        return self.retained_value

    def rotation_of(self, member: int) -> torch.Tensor | None:
        """``[H, D, D]`` alignment of one member on the data's device, or None."""
        if self.rotation is None:
            return None
        device = next((r.device for r in self.residual if r is not None), self.rotation.device)
        if self.rotation.device != device:
            self.rotation = self.rotation.to(device)
        return self.rotation[member]

    def append(self, member: int, states: torch.Tensor) -> None:
        old = self.residual[member]
        self.residual[member] = states if old is None else torch.cat([old, states], dim=-2)

    def restored(self, member: int) -> torch.Tensor:
        """Full ``[B, H, M + r, D]`` tensor for one member: restored merged prefix + exact window."""
        window = self.residual[member]
        if self.length == 0:
            return window
        direction = self.full_direction(window.dtype)
        dense = restore(direction, self.magnitude[..., member], window.dtype, self.rotation_of(member))
        if self.retained_index is not None and self.retained_index.shape[0]:
            b, h, n = self.retained_index.long().unbind(-1)
            dense[b, h, n] = self.retained_values(window.dtype)[:, member]
        return torch.cat([dense, window], dim=-2)

    def merge(
        self,
        count: int,
        window: int,
        real: torch.Tensor,
        real_before: torch.Tensor,
        *,
        use_kernel: bool = False,
    ) -> None:
        """Merge the oldest ``count`` tokens of the residual window into the shared store.

        ``real`` ``[B, r]`` flags real tokens of the whole window (the part beyond ``count`` is
        the retention look-ahead); ``real_before`` ``[B]`` counts real tokens already merged.
        ``use_kernel`` computes the same with the Triton merge kernel (CUDA, or CPU under
        ``TRITON_INTERPRET=1``) for SLERP pairs; other groups and the averaging baseline, which
        the kernel does not implement, fall back to the torch reference.
        """
        xs = self.residual
        merged_before = self.length
        exclusive_rank = real_before.unsqueeze(1) + real.long().cumsum(dim=1) - real.long()
        sink = real & (exclusive_rank < self.settings.sink_tokens)
        dtype = xs[0].dtype
        rotations = None
        if self.rotation is not None:
            self.rotation_of(0)  # move to the data's device once
            rotations = self.rotation
        # The merge kernel handles SLERP of pairs; an aligned pair enters it already rotated (one
        # matmul per block). The averaging baseline always takes the torch path below.
        if use_kernel and self.members == 2 and self.settings.method == "slerp":
            from minicache.runtime.kernels.merge import merge_block

            s = self.settings
            k_a, k_b = xs
            if rotations is not None:
                k_a, k_b = rotate(k_a, rotations[0]), rotate(k_b, rotations[1])
            block = merge_block(
                k_a,
                k_b,
                s.t,
                s.gamma,
                s.retention,
                valid=real,
                sink=sink,
                window=window,
                count=count,
                magnitude_dtype=_magnitude_dtype(dtype),
            )
            direction, magnitude, keep = block.direction.to(dtype), block.magnitude, block.keep
        else:
            s = self.settings
            pair = merge_group(xs, s.t, weights=s.weights, rotations=rotations, method=s.method)
            keep = retention_mask(
                pair.distance,
                self.settings.gamma,
                self.settings.retention,
                valid=real,
                sink=sink,
                window=window,
                count=count,
            )
            # A copy, not a view: a view would keep the look-ahead tokens' float32 storage alive.
            direction = pair.direction[..., :count, :].to(dtype, copy=True)
            # A retained token's magnitudes are never used (its exact vectors are stored aside), so
            # they carry the flag RETAINED_MAGNITUDE instead: a fused attention kernel streaming the
            # dense store can then skip these tokens without reading the sparse list.
            magnitude = pair.magnitudes[..., :count, :].masked_fill(keep.unsqueeze(-1), RETAINED_MAGNITUDE)
            magnitude = magnitude.to(_magnitude_dtype(dtype))
        self.direction = direction if self.direction is None else torch.cat([self.direction, direction], dim=-2)
        self.magnitude = magnitude if self.magnitude is None else torch.cat([self.magnitude, magnitude], dim=-2)
        self.length += count
        if self.quant is not None:
            self._quantize_directions()

        index = keep.nonzero()  # [nnz, 3] (b, h, n within this block)
        if index.shape[0] or self.retained_index is None:
            b, h, n = index.unbind(-1)
            value = torch.stack([x[b, h, n] for x in xs], dim=1)
            index = index.clone()
            index[:, 2] += merged_before
            index = index.to(torch.int32)
            if self.quant is not None:
                # A sparse list has no token groups: per-token groups along head_dim, keys too.
                self.retained_q = append(self.retained_q, quantize_values(value, self.quant), dim=0)
                self.retained_index = index if self.retained_index is None else torch.cat([self.retained_index, index])
            elif self.retained_index is None:
                self.retained_index, self.retained_value = index, value
            else:
                self.retained_index = torch.cat([self.retained_index, index])
                self.retained_value = torch.cat([self.retained_value, value])
        # Clone so that the old window's storage is freed, not kept alive by a view.
        self.residual = [r[..., count:, :].clone() for r in self.residual]

    def _quantize_directions(self) -> None:
        """Pack the merged directions: keys whole groups of tokens at a time, values all at once."""
        pending = self.direction
        if self.name == "keys":
            count = pending.shape[-2] // self.quant.group_size * self.quant.group_size
            if count == 0:
                return
            packed = quantize_keys(pending[..., :count, :], self.quant)
            rest = pending[..., count:, :]
            self.direction = rest.clone() if rest.shape[-2] else None
        else:
            packed, self.direction = quantize_values(pending, self.quant), None
        self.qdirection = append(self.qdirection, packed)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences: new sequence ``i`` is old sequence ``index[i]``."""
        self.residual = [None if r is None else r.index_select(0, index.to(r.device)) for r in self.residual]
        if self.length == 0:
            return
        index = index.to(self.magnitude.device)
        if self.direction is not None:
            self.direction = self.direction.index_select(0, index)
        if self.qdirection is not None:
            self.qdirection = self.qdirection.index_select(0, index)
        self.magnitude = self.magnitude.index_select(0, index)
        old_batch = self.retained_index[:, 0].long()
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


class MergedPairStore:
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
    rotations : dict, optional
        ``{"keys": R, "values": R}`` with ``R`` ``[k, H, D, D]`` float32 for aligned components.

    Attributes
    ----------
    merge_kernel : bool
        Merge with the Triton kernel instead of the torch reference (see `MiniCache.use_kernels`).
    fused_decode : bool
        On single-token steps, :meth:`update` returns :class:`MergedKVView` snapshots instead of
        restored tensors, for the fused decode attention kernel (which must then be the model's
        attention function; see ``minicache.runtime.kernels.enable_fused_attention``).
    """

    merge_kernel: bool = False
    fused_decode: bool = False

    def __init__(
        self,
        group: MergeGroup,
        residual_length: int,
        block_size: int,
        padding: PaddingInfo,
        rotations: dict[str, torch.Tensor | None] | None = None,
        quant: Quantization | None = None,
    ):
        self.layers = tuple(group.layers)
        self.quant = quant
        rotations = rotations or {}
        for name in _COMPONENTS:
            rotation = rotations.get(name)
            if getattr(group, name).align and rotation is None:
                raise ValueError(f"group {list(self.layers)}: {name} are aligned but no rotation was given")
            if rotation is not None and (rotation.dim() != 4 or rotation.shape[0] != len(self.layers)):
                raise ValueError(
                    f"group {list(self.layers)}: {name} rotation must be [{len(self.layers)}, H, D, D], "
                    f"got {list(rotation.shape)}"
                )
        k = len(self.layers)
        self.components = {
            name: _ComponentStore(getattr(group, name), k, rotations.get(name), quant, name) for name in _COMPONENTS
        }
        self.residual_length = residual_length
        self.block_size = block_size
        self.padding = padding

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

    def tensors(self) -> Iterator[torch.Tensor]:
        for component in self.components.values():
            yield from component.tensors()

    def retained_count(self) -> dict[str, int]:
        out = {}
        for name, component in self.components.items():
            index = component.retained_index
            out[name] = 0 if index is None else int(index.shape[0])
        return out

    # -- the cache contract ------------------------------------------------------------------
    def update(
        self, member: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.components["keys"], self.components["values"]
        for comp, states in ((keys, key_states), (values, value_states)):
            for other in comp.residual:
                if other is not None and other.device != states.device:
                    raise RuntimeError(
                        f"layers {self.layers} of a merged group live on different devices "
                        f"({other.device} and {states.device}); place all layers of a group on one device"
                    )
            comp.append(member, states)
        if self.fused_decode and key_states.shape[-2] == 1:
            out = self.kernel_views(member)
        else:
            out = keys.restored(member), values.restored(member)
        # The deeper layer's update completes a step: both windows now hold the same tokens.
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
        """Snapshots of one member's keys and values in the layout the fused kernels read.

        The CSR lists of retained tokens are built once per change of the retained lists (a merge
        that retained something, a batch selection) and reused by every decode step in between.

        Returns
        -------
        tuple of MergedKVView
            Keys and values of layer ``self.layers[member]``.
        """
        keys, values = self.components["keys"], self.components["values"]
        cached = getattr(self, "_csr_cache", None)
        if keys.length == 0:
            csr_k = csr_v = None
        elif cached is not None and cached[0] is keys.retained_index and cached[1] is values.retained_index:
            csr_k, csr_v = cached[2]
        else:
            b, h = keys.residual[member].shape[:2]
            csr_k, csr_v = retained_csr_pair(keys.retained_index, values.retained_index, b, h)
            # Holding the index tensors keeps their identity meaningful (no id reuse).
            self._csr_cache = (keys.retained_index, values.retained_index, (csr_k, csr_v))
        return (
            MergedKVView.from_component(keys, member, csr_k),
            MergedKVView.from_component(values, member, csr_v),
        )

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
        for name in _COMPONENTS:
            old = self.components[name]
            self.components[name] = _ComponentStore(old.settings, old.members, old.rotation, old.quant, name)

    def nbytes(self) -> int:
        """Bytes held, computed from shapes (tests check this against the tensors themselves)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class MergedLayer(CacheLayerMixin):
    """One member layer of a merged pair: a view onto the shared :class:`MergedPairStore`.

    Batch operations are applied by :class:`MiniCache` once per store, not per member layer.
    """

    is_compileable = False
    is_croppable = False  # only the residual window can be cropped; see `MiniCache.crop`
    is_sliding = False

    def __init__(self, store: MergedPairStore, member: int):
        super().__init__()
        self.store = store
        self.member = member

    def __repr__(self) -> str:
        return f"MergedLayer(layers={list(self.store.layers)}, member={self.member})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.store.update(self.member, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.store.seen(self.member)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        if self.member == 0:
            self.store.reset()

    def _batch_op_error(self, *args, **kwargs):
        raise RuntimeError("batch operations on a merged layer must go through MiniCache, which owns the store")

    reorder_cache = batch_select_indices = batch_repeat_interleave = crop = offload = prefetch = _batch_op_error


class MiniCache(Cache):
    """A transformers `Cache` that applies a :class:`MergeProfile` and stores merged pairs once.

    Parameters
    ----------
    profile : MergeProfile
        Which adjacent layers to merge and how.
    config_or_model : PretrainedConfig or PreTrainedModel
        The model's config. Passing the model itself also installs a forward pre-hook that tells
        the cache which positions are padding (from the ``attention_mask`` the model receives), so
        that padding never takes part in merge decisions and sink tokens are the first *real*
        tokens of each sequence. Without it every position counts as a real token.
    allow_model_mismatch : bool
        Accept a profile whose model fingerprint differs from this model (a warning instead).

    Examples
    --------
    >>> cache = MiniCache(MergeProfile.preset("paper", model.config), model)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
    >>> cache.memory_report()["compression_ratio"]
    """

    def __init__(self, profile: MergeProfile, config_or_model, allow_model_mismatch: bool = False):
        model = config_or_model if hasattr(config_or_model, "config") else None
        config = model.config if model is not None else config_or_model
        text_config = config.get_text_config(decoder=True)
        profile.check_model(text_config, allow_mismatch=allow_model_mismatch)
        self.profile = profile
        self.padding = PaddingInfo()
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        self.stores: list[MergedPairStore] = []
        layers: list[CacheLayerMixin] = []
        members: dict[int, MergedLayer] = {}
        for group in profile.groups:
            for layer in group.layers:
                if layer_types[layer] != "full_attention":
                    raise ValueError(
                        f"group {list(group.layers)}: layer {layer} is a {layer_types[layer]!r} layer; "
                        "MiniCache merges full-attention layers only"
                    )
            rotations = {name: profile.rotation(group, name) for name in _COMPONENTS}
            store = MergedPairStore(
                group,
                profile.defaults.residual_length,
                profile.defaults.block_size,
                self.padding,
                rotations,
                quant=profile.quantization,
            )
            self.stores.append(store)
            for member, layer in enumerate(group.layers):
                members[layer] = MergedLayer(store, member)
        for idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if idx in members:
                layers.append(members[idx])
            elif profile.quantization is not None and layer_type == "full_attention":
                layers.append(QuantizedDynamicLayer(profile.quantization))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)
        if model is not None:
            install_padding_hook(model)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, config_or_model=None, allow_model_mismatch: bool = False
    ) -> MiniCache:
        """Build the cache from the ``minicache_config.yaml`` shipped next to the weights.

        ``config_or_model`` defaults to the ``config.json`` in the same directory.
        """
        profile = MergeProfile.load(model_dir)
        if config_or_model is None:
            from transformers import AutoConfig

            if not os.path.isdir(model_dir):
                raise ValueError(
                    f"{model_dir} is not a model directory; pass the model or its config to read "
                    f"a bare {PROFILE_FILENAME}"
                )
            config_or_model = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        return cls(profile, config_or_model, allow_model_mismatch=allow_model_mismatch)

    # -- padding -----------------------------------------------------------------------------
    def observe_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Record which positions are real tokens (``[B, T]`` 2-D mask, 1 for real)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.padding.real = attention_mask.bool()
        else:
            self.padding.real = None

    # -- kernels -----------------------------------------------------------------------------
    def use_kernels(self, merge: bool | None = None, fused_decode: bool | None = None) -> None:
        """Switch the Triton kernels on or off (None leaves a switch as is).

        ``merge``: merge blocks with the Triton merge kernel (SLERP pairs; groups of 3+ layers and
        ``method: average`` groups keep the torch reference). ``fused_decode``: single-token steps of
        merged groups and of quantized unmerged layers return :class:`MergedKVView` snapshots
        instead of restored (dequantized) tensors, which only the fused
        attention function understands; prefer ``minicache.runtime.kernels.enable_fused_attention``,
        which sets this switch together with the model's attention function, on CUDA only.
        """
        for store in self.stores:
            if merge is not None:
                store.merge_kernel = bool(merge)
            if fused_decode is not None:
                store.fused_decode = bool(fused_decode)
        if fused_decode is not None:
            for layer in self.layers:
                if isinstance(layer, QuantizedDynamicLayer):
                    layer.fused_decode = bool(fused_decode)

    # -- batch operations: once per store, not once per member layer ---------------------------
    def _unmerged(self) -> Iterator[CacheLayerMixin]:
        return (layer for layer in self.layers if not isinstance(layer, MergedLayer))

    def _select_batch(self, index: torch.Tensor) -> None:
        for store in self.stores:
            store.select_batch(index)
        if self.padding.real is not None:
            self.padding.real = self.padding.real.index_select(0, index.to(self.padding.real.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self._unmerged():
            layer.reorder_cache(beam_idx)
        self._select_batch(beam_idx.long())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self._unmerged():
            layer.batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select_batch(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self._unmerged():
            layer.batch_repeat_interleave(repeats)
        if self.stores and self.stores[0].seen(0):
            batch = self.stores[0].components["keys"].residual[0].shape[0]
            self._select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` tokens from the end (negative count, as transformers does).

        Merged layers can only drop tokens still in their exact residual window.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        count = -tokens_to_remove
        if count == 0:
            return
        for store in self.stores:  # check every store before changing anything
            window = store.window_length()
            if count > window:
                store.crop(count)  # raises with the explanation
        for store in self.stores:
            store.crop(count)
        for layer in self._unmerged():
            layer.crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.padding.real = None

    # -- memory ----------------------------------------------------------------------------
    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache holds (merged stores and plain layers)."""
        for store in self.stores:
            yield from store.tensors()
        for layer in self._unmerged():
            if isinstance(layer, QuantizedDynamicLayer):
                yield from layer.tensors()
                continue
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    yield t

    def memory_report(self) -> dict:
        """Bytes held vs what a `DynamicCache` of the same dtype would hold for the same tokens.

        Returns
        -------
        dict
            ``kv_bytes`` (everything held: directions, magnitudes, retained tokens and their
            indices, residual windows, plain layers, packed codes, scales and zero points),
            ``kv_bytes_full``, ``compression_ratio`` (``kv_bytes_full / kv_bytes``),
            ``seq_length``, ``merged_tokens`` per group, ``retained_tokens`` per group and
            component, and a per-part breakdown. With quantization, ``packed`` counts the codes
            (directions, retained tokens, unmerged layers), ``scales`` their scales and zero
            points, and ``residual`` every exact window; ``directions`` and ``retained`` then
            count only what is still in the model dtype.
        """
        parts = {"plain_layers": 0, "directions": 0, "magnitudes": 0, "retained": 0, "residual": 0}
        parts["alignment"] = 0  # rotations of aligned groups (a fixed cost per group, counted per cache)
        parts["packed"] = parts["scales"] = 0
        full = 0

        def count_quantized(q: QuantizedTensor | None) -> None:
            if q is not None:
                parts["packed"] += q.data.numel() * q.data.element_size()
                parts["scales"] += sum(t.numel() * t.element_size() for t in (q.scale, q.zero))

        for layer in self._unmerged():
            if isinstance(layer, QuantizedDynamicLayer):
                if layer.is_initialized:
                    b, h, _, d = layer.keys.shape
                    full += 2 * b * h * layer.get_seq_length() * d * layer.keys.element_size()
                    parts["residual"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
                    count_quantized(layer.qkeys)
                    count_quantized(layer.qvalues)
                continue
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor) and t.numel():
                    parts["plain_layers"] += t.numel() * t.element_size()
                    full += t.numel() * t.element_size()
        groups = []
        for store in self.stores:
            for comp in store.components.values():
                for name, tensors in (
                    ("directions", [comp.direction]),
                    ("magnitudes", [comp.magnitude]),
                    ("retained", [comp.retained_index, comp.retained_value]),
                    ("residual", comp.residual),
                    ("alignment", [comp.rotation]),
                ):
                    parts[name] += sum(t.numel() * t.element_size() for t in tensors if t is not None)
                for q in comp.quantized_tensors():
                    count_quantized(q)
                for member in range(len(store.layers)):
                    window = comp.residual[member]
                    if window is not None:
                        b, h, _, d = window.shape
                        full += b * h * store.seen(member) * d * window.element_size()
            groups.append(
                {
                    "layers": list(store.layers),
                    "merged_tokens": store.merged_length,
                    "retained_tokens": store.retained_count(),
                }
            )
        kv_bytes = sum(parts.values())
        return {
            "kv_bytes": kv_bytes,
            "kv_bytes_full": full,
            "compression_ratio": full / kv_bytes if kv_bytes else 1.0,
            "seq_length": self.get_seq_length(),
            "parts": parts,
            "groups": groups,
        }


def install_padding_hook(model: torch.nn.Module) -> None:
    """Let every `MiniCache` passed to ``model`` see the model's 2-D ``attention_mask``.

    Idempotent. transformers does not hand the mask to `Cache.update`, but merge decisions must
    ignore left padding (so a sequence is stored the same alone or in a padded batch).
    """
    if getattr(model, "_minicache_padding_hook", None) is not None:
        return
    signature = inspect.signature(model.forward)

    def observe(module, args, kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        extra = bound.get("kwargs") or {}
        # transformers renamed ``past_key_values`` to ``cache`` in 5.x; accept either spelling.
        candidates = (
            bound.get("cache"), bound.get("past_key_values"), extra.get("cache"), extra.get("past_key_values")
        )
        cache = next((c for c in candidates if isinstance(c, MiniCache)), None)
        if cache is not None:
            cache.observe_attention_mask(bound.get("attention_mask"))

    model._minicache_padding_hook = model.register_forward_pre_hook(observe, with_kwargs=True)


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
        ``[nnz]`` int32 row of the component's ``retained_value`` (kept in store order: no copy).
    cross : torch.Tensor
        ``[nnz]`` int32 row of the same (b, h, token) in the *other* component's
        ``retained_value``, or -1 when the other component merged that token.
    max_count : int
        Largest number of retained tokens of one row.
    """

    offsets: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor
    cross: torch.Tensor
    max_count: int


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
    """Read-only snapshot of one member layer's keys (or values) in a merged store.

    Stands in for the ``[B, H, M + r, D]`` tensor that :meth:`_ComponentStore.restored` would
    build (restored merged prefix, retained tokens written back, exact residual window), for
    kernels that read the store's parts directly. It holds references to the store's tensors at
    snapshot time; a merge replaces those tensors (it never writes into them), so the view keeps
    describing the state the snapshot was taken in.

    The merged prefix of ``M = Mq + Md`` tokens is ``qdirection`` (``Mq`` packed tokens, quantized
    stores only) followed by ``direction`` (``Md`` tokens in the model dtype). Without
    ``magnitude`` the prefix holds the vectors themselves: that is how an unmerged quantized layer
    (:class:`~minicache.runtime.quant.QuantizedDynamicLayer`) is described to the same kernel.

    Attributes
    ----------
    member : int
        Which layer of the group (0 = the shallowest).
    residual : torch.Tensor
        ``[B, H, r, D]`` exact window (model dtype).
    direction : torch.Tensor or None
        ``[B, H, Md, D]`` shared directions (model dtype), the newest merged tokens when
        ``qdirection`` holds the older ones; None when there are none.
    magnitude : torch.Tensor or None
        ``[B, H, M, k]`` every member's norms; ``RETAINED_MAGNITUDE`` for retained tokens.
    retained_value : torch.Tensor or None
        ``[nnz, k, D]`` exact vectors of retained tokens, in store order (model dtype; None when
        they are packed in ``retained_q``).
    retained : RetainedCSR or None
        Retained tokens grouped by (b, h).
    rotation : torch.Tensor or None
        ``[H, D, D]`` float32 alignment ``R`` of this member: the directions live in the aligned
        frame and this layer's vectors are ``m · e Rᵀ`` (None: not aligned).
    qdirection : QuantizedTensor or None
        ``[B, H, Mq, D]`` packed directions (keys per channel, values per token).
    retained_q : QuantizedTensor or None
        ``[nnz, k, D]`` packed retained vectors (per token).
    """

    member: int
    residual: torch.Tensor
    direction: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    retained_value: torch.Tensor | None = None
    retained: RetainedCSR | None = None
    rotation: torch.Tensor | None = None
    qdirection: QuantizedTensor | None = None
    retained_q: QuantizedTensor | None = None

    @classmethod
    def from_component(cls, component: _ComponentStore, member: int, csr: RetainedCSR | None) -> MergedKVView:
        return cls(
            member=member,
            residual=component.residual[member],
            direction=component.direction,
            magnitude=component.magnitude,
            retained_value=component.retained_value,
            retained=csr,
            rotation=component.rotation_of(member),
            qdirection=component.qdirection,
            retained_q=component.retained_q,
        )

    @classmethod
    def of_quantized_layer(cls, residual: torch.Tensor, packed: QuantizedTensor) -> MergedKVView:
        """An unmerged quantized layer's keys or values: packed prefix + exact window, no magnitudes."""
        return cls(member=0, residual=residual, qdirection=packed)

    @property
    def packed_length(self) -> int:
        """``Mq``: merged tokens held packed."""
        return 0 if self.qdirection is None else self.qdirection.length

    @property
    def merged_length(self) -> int:
        return self.packed_length + (0 if self.direction is None else self.direction.shape[-2])

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

    def full_direction(self) -> torch.Tensor | None:
        """``[B, H, M, D]`` stored prefix in the model dtype (packed part dequantized), or None."""
        if self.merged_length == 0:
            return None
        return stored_prefix(self.qdirection, self.direction, self.dtype, 0, self.merged_length)

    @functools.cached_property
    def _retained_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, h, pos, row)`` long tensors of every retained entry, computed once per snapshot
        (a view is one layer's state for one step; attention reads it a block at a time)."""
        csr = self.retained
        h = self.residual.shape[1]
        counts = (csr.offsets[1:] - csr.offsets[:-1]).long()
        bh = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return bh // h, bh % h, csr.pos.long(), csr.row.long()

    @property
    def block_alignment(self) -> int:
        """Blocks of the merged prefix must start at multiples of this (a packed key group)."""
        packed = self.qdirection
        return packed.group_size if packed is not None and packed.axis == "tokens" else 1

    def restored_block(self, start: int, end: int, *, aligned_frame: bool = False) -> torch.Tensor:
        """Merged tokens ``[start, end)`` restored, ``[B, H, end - start, D]`` in the model dtype.

        Only this block is dequantized and restored, and only the retained vectors inside it are
        read, so attention can walk the prefix a block at a time. ``start`` must be a multiple of
        :attr:`block_alignment`. ``aligned_frame``: leave an aligned layer's vectors in the
        group's aligned frame (``m · e``, and retained vectors ``x R``), i.e. skip the per-token
        rotation back, for callers that rotate the query (keys) or the output (values) instead.
        """
        dtype = self.dtype
        prefix = stored_prefix(self.qdirection, self.direction, dtype, start, end)
        if self.magnitude is None:  # an unmerged layer: the prefix holds the vectors
            return prefix
        rotation = None if aligned_frame else self.rotation
        dense = restore(prefix, self.magnitude[..., start:end, self.member], dtype, rotation)
        if self.retained is not None and self.retained.pos.numel():
            b_idx, h_idx, pos, rows = self._retained_entries
            inside = (pos >= start) & (pos < end)
            if inside.any():
                b_idx, h_idx, pos, rows = b_idx[inside], h_idx[inside], pos[inside] - start, rows[inside]
                if self.retained_q is not None:
                    exact = self.retained_q.index_select(0, rows).dequantize(dtype)[:, self.member]
                else:
                    exact = self.retained_value[rows, self.member]
                if aligned_frame and self.rotation is not None:  # x R, each row with its head's R
                    r = self.rotation.to(device=exact.device, dtype=torch.float32)[h_idx]
                    exact = torch.einsum("nd,nde->ne", exact.float(), r).to(dtype)
                dense[b_idx, h_idx, pos] = exact
        return dense

    def materialize(self) -> torch.Tensor:
        """The restored ``[B, H, M + r, D]`` tensor (what the torch path returns)."""
        if self.merged_length == 0:
            return self.residual
        return torch.cat([self.restored_block(0, self.merged_length), self.residual], dim=-2)
