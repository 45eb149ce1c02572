"""`MiniCache`: a transformers `Cache` that stores merged layer pairs once.

Layout (DESIGN.md §2–3). Each merged group owns ONE :class:`MergedPairStore`; the model sees one
:class:`MergedLayer` per member layer, a thin view that forwards to the shared store. Layers that
no group names use transformers' own dynamic layers, so they behave exactly like `DynamicCache`.

A store keeps, for keys and for values separately:

* an exact **residual window** per member layer, ``[B, H, r, D]`` in the model dtype: the most
  recent tokens, not merged yet (prefill attention therefore runs on exact KV);
* the merged prefix of ``M`` tokens: one shared **direction** ``[B, H, M, D]`` (model dtype) and
  per-layer **magnitudes** ``[B, H, M, 2]``;
* **retained** tokens that are too different to merge, as a sparse list: their positions
  ``[nnz, 3]`` (batch, head, token; int32) and both layers' exact vectors ``[nnz, 2, D]``.

When the residual window holds at least ``residual_length + block_size`` tokens, the oldest whole
blocks are merged. Retention is decided per token from the range of angular distances over a
forward window of the sequence's own next ``block_size`` tokens, which are still exact at merge
time; that keeps the decision independent of the other sequences in the batch, of left padding
and of how tokens were chunked.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from minicache.profile import PROFILE_FILENAME, MergeGroup, MergeProfile, MergeSettings
from minicache.runtime.merge import restore, retention_mask, slerp_pair

_COMPONENTS = ("keys", "values")
#: Magnitude stored for retained tokens (norms are never negative).
RETAINED_MAGNITUDE = -1.0


def _magnitude_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms need more range than precision: fp16 holds them to 0.05 % for half-precision models;
    # bf16's 3 significant digits would not. Full-precision models keep fp32.
    return torch.float32 if dtype.itemsize >= 4 else torch.float16


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
    """Keys or values of one merged pair (see module docstring for shapes)."""

    def __init__(self, settings: MergeSettings):
        self.settings = settings
        self.residual: list[torch.Tensor | None] = [None, None]
        self.direction: torch.Tensor | None = None
        self.magnitude: torch.Tensor | None = None
        self.retained_index: torch.Tensor | None = None
        self.retained_value: torch.Tensor | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        for t in (*self.residual, self.direction, self.magnitude, self.retained_index, self.retained_value):
            if t is not None:
                yield t

    def append(self, member: int, states: torch.Tensor) -> None:
        old = self.residual[member]
        self.residual[member] = states if old is None else torch.cat([old, states], dim=-2)

    def restored(self, member: int) -> torch.Tensor:
        """Full ``[B, H, M + r, D]`` tensor for one member: restored merged prefix + exact window."""
        window = self.residual[member]
        if self.direction is None:
            return window
        dense = restore(self.direction, self.magnitude[..., member], window.dtype)
        if self.retained_index is not None and self.retained_index.shape[0]:
            b, h, n = self.retained_index.long().unbind(-1)
            dense[b, h, n] = self.retained_value[:, member]
        return torch.cat([dense, window], dim=-2)

    def merge(self, count: int, window: int, real: torch.Tensor, real_before: torch.Tensor) -> None:
        """Merge the oldest ``count`` tokens of the residual window into the shared store.

        ``real`` ``[B, r]`` flags real tokens of the whole window (the part beyond ``count`` is
        the retention look-ahead); ``real_before`` ``[B]`` counts real tokens already merged.
        """
        x_a, x_b = self.residual
        merged_before = 0 if self.direction is None else self.direction.shape[-2]
        pair = slerp_pair(x_a, x_b, self.settings.t)
        exclusive_rank = real_before.unsqueeze(1) + real.long().cumsum(dim=1) - real.long()
        sink = real & (exclusive_rank < self.settings.sink_tokens)
        keep = retention_mask(
            pair.distance,
            self.settings.gamma,
            self.settings.retention,
            valid=real,
            sink=sink,
            window=window,
            count=count,
        )
        dtype = x_a.dtype
        direction = pair.direction[..., :count, :].to(dtype)
        # A retained token's magnitudes are never used (its exact vectors are stored aside), so
        # they carry the flag RETAINED_MAGNITUDE instead: a fused attention kernel streaming the
        # dense store can then skip these tokens without reading the sparse list.
        magnitude = pair.magnitudes[..., :count, :].masked_fill(keep.unsqueeze(-1), RETAINED_MAGNITUDE)
        magnitude = magnitude.to(_magnitude_dtype(dtype))
        self.direction = direction if self.direction is None else torch.cat([self.direction, direction], dim=-2)
        self.magnitude = magnitude if self.magnitude is None else torch.cat([self.magnitude, magnitude], dim=-2)

        index = keep.nonzero()  # [nnz, 3] (b, h, n within this block)
        if index.shape[0] or self.retained_index is None:
            b, h, n = index.unbind(-1)
            value = torch.stack([x_a[b, h, n], x_b[b, h, n]], dim=1)
            index = index.clone()
            index[:, 2] += merged_before
            index = index.to(torch.int32)
            if self.retained_index is None:
                self.retained_index, self.retained_value = index, value
            else:
                self.retained_index = torch.cat([self.retained_index, index])
                self.retained_value = torch.cat([self.retained_value, value])
        # Clone so that the old window's storage is freed, not kept alive by a view.
        self.residual = [r[..., count:, :].clone() for r in self.residual]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences: new sequence ``i`` is old sequence ``index[i]``."""
        self.residual = [None if r is None else r.index_select(0, index.to(r.device)) for r in self.residual]
        if self.direction is None:
            return
        index = index.to(self.direction.device)
        self.direction = self.direction.index_select(0, index)
        self.magnitude = self.magnitude.index_select(0, index)
        old_batch = self.retained_index[:, 0].long()
        new_b, entry = (old_batch.unsqueeze(0) == index.unsqueeze(1)).nonzero().unbind(-1)
        retained_index = self.retained_index[entry].clone()
        retained_index[:, 0] = new_b.to(torch.int32)
        self.retained_index = retained_index
        self.retained_value = self.retained_value[entry]

    def crop(self, count: int) -> None:
        self.residual = [None if r is None else r[..., : r.shape[-2] - count, :].clone() for r in self.residual]


class MergedPairStore:
    """The single shared store of one merged pair of layers.

    Parameters
    ----------
    group : MergeGroup
        Two adjacent layers and their keys/values settings.
    residual_length : int
        Minimum number of most recent tokens kept exact.
    block_size : int
        Tokens are merged in multiples of this many; also the retention look-ahead window.
    padding : PaddingInfo
        Shared with the owning cache, which updates it from the model's attention mask.
    """

    def __init__(self, group: MergeGroup, residual_length: int, block_size: int, padding: PaddingInfo):
        if len(group.layers) != 2:
            raise ValueError(
                f"group {list(group.layers)} has {len(group.layers)} layers; this runtime merges pairs of "
                "adjacent layers only (groups of more than two layers are a format feature a later runtime adds)"
            )
        self.layers = tuple(group.layers)
        self.components = {"keys": _ComponentStore(group.keys), "values": _ComponentStore(group.values)}
        self.residual_length = residual_length
        self.block_size = block_size
        self.padding = padding

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def merged_length(self) -> int:
        direction = self.components["keys"].direction
        return 0 if direction is None else direction.shape[-2]

    def residual_length_of(self, member: int) -> int:
        window = self.components["keys"].residual[member]
        return 0 if window is None else window.shape[-2]

    def seen(self, member: int) -> int:
        return self.merged_length + self.residual_length_of(member)

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
            other = comp.residual[1 - member]
            if other is not None and other.device != states.device:
                raise RuntimeError(
                    f"layers {self.layers} of a merged group live on different devices ({other.device} and "
                    f"{states.device}); place both layers of a group on one device"
                )
            comp.append(member, states)
        out = keys.restored(member), values.restored(member)
        # The deeper layer's update completes a step: both windows now hold the same tokens.
        # Merge after computing `out`, so this step's attention still saw exact keys/values.
        if member == len(self.layers) - 1:
            self._maybe_merge()
        return out

    def _maybe_merge(self) -> None:
        window = min(self.residual_length_of(0), self.residual_length_of(1))
        count = (window - self.residual_length) // self.block_size * self.block_size
        if count <= 0:
            return
        start = self.merged_length
        sample = self.components["keys"].residual[0]
        real, before = self.padding.window(start, start + window, sample.shape[0], sample.device)
        for component in self.components.values():
            component.merge(count, self.block_size, real, before)

    def select_batch(self, index: torch.Tensor) -> None:
        for component in self.components.values():
            component.select_batch(index)

    def crop(self, count: int) -> None:
        window = min(self.residual_length_of(0), self.residual_length_of(1))
        if count > window:
            raise ValueError(
                f"cannot crop {count} tokens from merged layers {list(self.layers)}: only the exact residual "
                f"window ({window} tokens) can be cropped; merged tokens cannot be un-merged"
            )
        for component in self.components.values():
            component.crop(count)

    def reset(self) -> None:
        for name in _COMPONENTS:
            self.components[name] = _ComponentStore(self.components[name].settings)

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
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
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
            store = MergedPairStore(
                group, profile.defaults.residual_length, profile.defaults.block_size, self.padding
            )
            self.stores.append(store)
            for member, layer in enumerate(group.layers):
                members[layer] = MergedLayer(store, member)
        for idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            if idx in members:
                layers.append(members[idx])
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
            window = min(store.residual_length_of(0), store.residual_length_of(1))
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
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    yield t

    def memory_report(self) -> dict:
        """Bytes held vs what a `DynamicCache` of the same dtype would hold for the same tokens.

        Returns
        -------
        dict
            ``kv_bytes`` (everything held: directions, magnitudes, retained tokens and their
            indices, residual windows, plain layers), ``kv_bytes_full``, ``compression_ratio``
            (``kv_bytes_full / kv_bytes``), ``seq_length``, ``merged_tokens`` per group,
            ``retained_tokens`` per group and component, and a per-part breakdown.
        """
        parts = {"plain_layers": 0, "directions": 0, "magnitudes": 0, "retained": 0, "residual": 0}
        full = 0
        for layer in self._unmerged():
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
                ):
                    parts[name] += sum(t.numel() * t.element_size() for t in tensors if t is not None)
                for member in range(2):
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
        cache = bound.get("past_key_values")
        if isinstance(cache, MiniCache):
            cache.observe_attention_mask(bound.get("attention_mask"))

    model._minicache_padding_hook = model.register_forward_pre_hook(observe, with_kwargs=True)
