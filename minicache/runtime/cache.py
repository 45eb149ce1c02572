"""`MiniCache`: a transformers `Cache` that applies a merge profile and stores merged groups once.

The facade over the runtime's parts (DESIGN.md §2–3):

* one :class:`~minicache.runtime.store.GroupStore` per merged group of adjacent layers (residual
  window, block schedule, retained tokens; encoding and restoring are the group's merge methods',
  packing the profile's quantizer's), and one :class:`~minicache.runtime.layers.MergedLayer` per
  member layer, forwarding to it;
* unmerged full-attention layers of a quantized profile as
  :class:`~minicache.runtime.layers.QuantizedLayer`; every other layer is transformers' own;
* the padding seen by the model (a forward pre-hook): a batch padded from its first token is stored
  one sequence at a time (:mod:`~minicache.runtime.rows`), so that a sequence stores the same
  tokens, at the same steps, in any batch as alone;
* the attention path, decided once per cache when it is bound to a model: restored tensors for any
  attention function, or :class:`~minicache.runtime.views.MergedKVView` snapshots for the attention
  functions of :func:`minicache.runtime.attention.enable_fused_attention`;
* :meth:`MiniCache.memory_report`, the sum of what every store and layer reports holding.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin

from minicache.model_spec import ModelSpec
from minicache.profile import KEY_WEIGHTS_TENSOR, PROFILE_FILENAME, MergeProfile
from minicache.quant.packed import QuantizedTensor
from minicache.runtime.layers import MergedLayer, QuantizedLayer, plain_layer_bytes
from minicache.runtime.rope import RopeAngles
from minicache.runtime.rows import RowBatch, RowLayer
from minicache.runtime.store import GroupStore, PaddingInfo
from minicache.runtime.views import MergedKVView
from minicache.validation import ProfileError

__all__ = ["ATTENTION_PLAN_ATTRIBUTE", "MiniCache", "install_padding_hook"]

#: Attribute of a model that :func:`~minicache.runtime.attention.enable_fused_attention` sets to its
#: plan (``{"backend": ..., "merge_kernel": ...}``); caches bind to it on the model's first forward.
ATTENTION_PLAN_ATTRIBUTE = "_minicache_attention_plan"


class MiniCache(Cache):
    """A transformers `Cache` that applies a :class:`MergeProfile` and stores merged groups once.

    Parameters
    ----------
    profile : MergeProfile
        Which adjacent layers to merge and how.
    config_or_model : PretrainedConfig or PreTrainedModel
        The model's config. Passing the model itself also installs a forward pre-hook that tells
        the cache which positions are padding (from the ``attention_mask`` the model receives): a
        batch with padding in its first forward is then stored one sequence at a time, each
        exactly as alone (see :attr:`rows`). Without it every position counts as a real token.
    allow_model_mismatch : bool
        Accept a profile whose model fingerprint differs from this model (a warning instead).
    rope : RopeAngles, optional
        The model's RoPE, for ``quantization.pre_rope_keys`` (default: found on the model, or built
        from its config).

    Examples
    --------
    >>> cache = MiniCache(MergeProfile.preset("paper", model.config), model)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
    >>> cache.memory_report()["compression_ratio"]
    """

    def __init__(self, profile: MergeProfile, config_or_model, allow_model_mismatch: bool = False, *,
                 rope: RopeAngles | None = None):
        model = config_or_model if isinstance(config_or_model, torch.nn.Module) else None
        spec = ModelSpec.from_config(config_or_model)
        self._config = model.config if model is not None else config_or_model
        self.rows: RowBatch | None = None  # a padded batch, one cache per sequence
        self._plan: dict | None = None  # the attention plan bound to (rows bind to it too)
        self._padded_layers: list[CacheLayerMixin] | None = None
        profile.check_model(spec, allow_mismatch=allow_model_mismatch)
        self.profile = profile
        self.spec = spec
        self.padding = PaddingInfo()
        self.stores: list[GroupStore] = []
        self._bound = False
        self._merge_kernel: bool | None = None  # use_kernels' choice, which binding keeps
        members: dict[int, MergedLayer] = {}
        quant = profile.quantization
        pre_rope = [f"groups[{i}].keys.pre_rope" for i, g in enumerate(profile.groups) if g.keys.pre_rope]
        if quant is not None and quant.pre_rope_keys:
            pre_rope.append("quantization.pre_rope_keys")
        if pre_rope and rope is None:
            try:
                rope = RopeAngles.of_model(config_or_model)
            except ValueError as err:
                raise ProfileError(str(err), pre_rope[0]) from None
        self._rope = rope if pre_rope else None
        for group in profile.groups:
            for layer in group.layers:
                kind = spec.layers[layer].attention_type
                if kind != "full_attention":
                    raise ValueError(
                        f"group {list(group.layers)}: layer {layer} is a {kind!r} layer; "
                        "MiniCache merges full-attention layers only"
                    )
            tensors = {name: profile.tensors_of(group, name) for name, _ in group.components()}
            store = GroupStore(
                group, profile.defaults.residual_length, profile.defaults.block_size, self.padding, tensors,
                quant=profile.quantization, rope=self._rope,
            )
            self.stores.append(store)
            for member, layer in enumerate(group.layers):
                members[layer] = MergedLayer(store, member)
        layers: list[CacheLayerMixin] = []
        for idx, (layer_spec, kwargs) in enumerate(zip(spec.layers, spec.cache_layer_kwargs, strict=True)):
            if idx in members:
                layers.append(members[idx])
            elif quant is not None and layer_spec.attention_type == "full_attention":
                layers.append(QuantizedLayer(quant, quant.bits_of(idx), quant.bits_of(idx, "values"), rope,
                                             profile.key_weights(idx)))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_spec.attention_type](**kwargs))
        super().__init__(layers=layers)
        # keys rounded for the queries: the profile's weights, which the packed layers' views share
        rounded = quant is not None and quant.key_rounding == "queries"
        packed = any(isinstance(layer, QuantizedLayer) for layer in layers)
        self._key_weights = profile.tensors[KEY_WEIGHTS_TENSOR] if rounded and packed else None
        if model is not None:
            install_padding_hook(model)
            plan = getattr(model, ATTENTION_PLAN_ATTRIBUTE, None)
            if plan is not None:
                self.bind(plan)

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
        """Record which positions are real tokens (``[B, T]`` 2-D mask, 1 for real); an empty cache
        that sees padding switches to one cache per sequence (:attr:`rows`)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.padding.real = attention_mask.bool()
        else:
            self.padding.real = None
        if (
            self.rows is None
            and self.padding.real is not None
            and not bool(self.padding.real.all())
            and not any(layer.is_initialized for layer in self.layers)
        ):
            self._store_per_sequence(self.padding.real.shape[0])

    def _store_per_sequence(self, batch: int) -> None:
        """Keep merged and quantized layers in one batch-1 cache per sequence (:attr:`rows`)."""
        scheduled = [i for i, layer in enumerate(self.layers) if isinstance(layer, MergedLayer | QuantizedLayer)]
        if not scheduled:
            return  # nothing has a schedule: padded plain layers are exactly `DynamicCache`

        def make_row() -> MiniCache:
            # the model was checked once, here; rows reuse its RoPE
            row = MiniCache(self.profile, self._config, allow_model_mismatch=True, rope=self._rope)
            if self._merge_kernel is not None:
                row.use_kernels(self._merge_kernel)
            row.bind(_row_plan(self._plan))
            return row

        tensors = self.profile.tensors
        shared = [tensors[name] for name in tensors.names()] if tensors is not None else []
        self.rows = RowBatch(make_row, batch, len(self.layers), self.padding, shared=shared)
        self._padded_layers = list(self.layers)
        self.layers = [RowLayer(self.rows, i) if i in scheduled else layer for i, layer in enumerate(self.layers)]

    # -- the attention path, decided once --------------------------------------------------------
    @property
    def bound(self) -> bool:
        """Whether the attention path has been decided (see :meth:`bind`)."""
        return self._bound

    def bind(self, plan: dict | None) -> None:
        """Decide how merged and quantized layers hand their keys and values to attention.

        ``plan`` None: restored (dequantized) tensors, which any attention function accepts.
        ``{"backend": ..., "merge_kernel": bool}`` (set on a model by ``enable_fused_attention``):
        :class:`~minicache.runtime.views.MergedKVView` snapshots on every step, which only
        minicache's attention functions accept, and merging with the methods' fused kernels when
        ``merge_kernel``. A cache built with a model binds to its plan at once; otherwise on the
        first forward of a model, through the padding hook. Binding again is for
        ``disable_fused_attention`` only.
        """
        views = plan is not None
        merge_kernel = bool(plan and plan.get("merge_kernel")) if self._merge_kernel is None else self._merge_kernel
        if plan is not None and "caches" in plan:
            plan["caches"].add(self)  # so that disable_fused_attention can unbind it
        self._plan = plan
        for row in self.rows.rows if self.rows is not None else ():
            row.bind(_row_plan(plan))
        for store in self.stores:
            store.views = views
            store.merge_kernel = merge_kernel
        for layer in self.layers:
            if isinstance(layer, QuantizedLayer):
                layer.views = views
        self._bound = True

    def use_kernels(self, merge: bool = True) -> None:
        """Merge blocks with the methods' fused Triton kernels (SLERP pairs) or the torch reference.

        For tests and benchmarks of the merge kernel alone (it stays as set when the cache is
        bound); ``enable_fused_attention`` otherwise decides it with the attention path.
        """
        self._merge_kernel = bool(merge)
        for row in self.rows.rows if self.rows is not None else ():
            row.use_kernels(merge)
        for store in self.stores:
            store.merge_kernel = bool(merge)

    # -- reading ------------------------------------------------------------------------------
    def views(self, layer_idx: int) -> tuple[MergedKVView, MergedKVView]:
        """Snapshots of one merged or quantized layer's keys and values, as attention reads them.

        Raises
        ------
        ValueError
            The layer is one of transformers' own (unmerged, unquantized): it holds plain tensors.
        """
        layer = self.layers[layer_idx]
        if isinstance(layer, RowLayer):
            raise ValueError(
                f"layer {layer_idx}: this padded batch is stored one sequence at a time; read "
                f"cache.rows.rows[i].views({layer_idx}) for sequence i"
            )
        if isinstance(layer, MergedLayer):
            return layer.store.kernel_views(layer.member)
        if isinstance(layer, QuantizedLayer):
            return layer.views_of()
        raise ValueError(f"layer {layer_idx} is a plain {type(layer).__name__}: read its keys and values directly")

    # -- batch operations: once per store, not once per member layer ---------------------------
    def _unmerged(self) -> Iterator[CacheLayerMixin]:
        return (layer for layer in self.layers if not isinstance(layer, MergedLayer | RowLayer))

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows.select(index.long())
        else:
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
        if self.rows is not None:
            self._select_batch(torch.arange(len(self.rows)).repeat_interleave(repeats))
        elif self.stores and self.stores[0].seen(0):
            batch = self.stores[0].batch_size()
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
        if self.rows is not None:
            self.rows.crop(count)
        else:
            for store in self.stores:  # check every store before changing anything
                window = store.window_length()
                if count > window:
                    store.crop(count)  # raises with the explanation
            for store in self.stores:
                store.crop(count)
        for layer in self._unmerged():
            if layer.is_initialized:  # a row's own plain layers are never used
                layer.crop(tokens_to_remove)

    def reset(self) -> None:
        if self._padded_layers is not None:  # back to one batched store for the next batch
            self.layers, self._padded_layers, self.rows = self._padded_layers, None, None
        super().reset()
        self.padding.real = None

    # -- memory ----------------------------------------------------------------------------
    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the cache holds (merged stores and plain layers)."""
        for row in self.rows.rows if self.rows is not None else ():
            yield from row.tensors()
        for store in self.stores if self.rows is None else ():
            yield from store.tensors()
        for layer in self._unmerged():
            if isinstance(layer, QuantizedLayer):
                yield from layer.tensors()
                continue
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    yield t

    def memory_report(self) -> dict:
        """Bytes held vs what a `DynamicCache` of the same dtype would hold for the same tokens.

        The sum of what every part reports: each merged group's store (its methods' stored fields,
        retained tokens, residual windows, the methods' tensors, packed codes and scales),
        quantized unmerged layers, and plain layers.

        Returns
        -------
        dict
            ``kv_bytes`` (everything held), ``kv_bytes_full``, ``compression_ratio``
            (``kv_bytes_full / kv_bytes``), ``seq_length``, ``parts`` (bytes by part:
            ``plain_layers``, ``residual`` (recent windows: exact, or 8-bit codes with their scales),
            ``retained``, ``packed`` (codes), ``scales`` (scales and zero points), and each method's own
            parts, e.g. SLERP's ``directions``, ``magnitudes`` and ``alignment``; with quantization, the method's
            parts count only what is still in the model dtype; a rotated packing adds
            ``rotations``, its matrices, counted once, and uneven levels ``levels``, their tables;
            pre-RoPE keys add ``rope``, the frequencies, and keys rounded for the queries ``key_weights``)
            and per group ``merged_tokens`` and
            ``retained_tokens``. A padded batch stored one sequence at a time (:attr:`rows`) gives
            those two per sequence (lists), and ``per_sequence``: each sequence's bytes in its merged
            and quantized layers, which equal what it stores alone (plain layers are held padded, as
            in `DynamicCache`). ``kv_bytes_full`` is always what a `DynamicCache` would hold for
            the same batch, padding included.
        """
        parts = {"plain_layers": 0, "residual": 0, "retained": 0, "packed": 0, "scales": 0}
        full = 0

        def add(more: dict[str, int]) -> None:
            for part, nbytes in more.items():
                parts[part] = parts.get(part, 0) + nbytes

        for layer in self._unmerged():
            if isinstance(layer, QuantizedLayer):
                add(layer.memory_parts())
                full += layer.full_bytes()
            else:
                nbytes = plain_layer_bytes(layer)
                parts["plain_layers"] += nbytes
                full += nbytes
        groups = []
        for store in self.stores if self.rows is None else ():
            add(store.memory_parts())
            full += store.full_bytes()
            groups.append(
                {
                    "layers": list(store.layers),
                    "merged_tokens": store.merged_length,
                    "retained_tokens": store.retained_count(),
                }
            )
        per_sequence = None
        if self.rows is not None:
            reports = [row.memory_report() for row in self.rows.rows]
            # Every row references the profile's tensors (e.g. alignment): held once, counted once.
            shared = {c.method.tensor_part for store in self.stores for c in store.components.values()}
            for i, report in enumerate(reports):
                add({part: n for part, n in report["parts"].items()
                     if part not in ("rotations", "levels", "rope", "key_weights") and (i == 0 or part not in shared)})
            full += sum(layer.full_bytes() for layer in self.layers if isinstance(layer, RowLayer))
            per_sequence = [report["kv_bytes"] for report in reports]
            groups = [
                {
                    "layers": group["layers"],
                    "merged_tokens": [report["groups"][i]["merged_tokens"] for report in reports],
                    "retained_tokens": [report["groups"][i]["retained_tokens"] for report in reports],
                }
                for i, group in enumerate(reports[0]["groups"])
            ]
        # a packing's scheme constants (rotation matrices, level tables): held once, however many tensors use them
        parts.update({part: n for part, n in _scheme_constant_bytes(self).items() if n})
        if self._rope is not None:  # pre-RoPE keys: the frequencies that put RoPE back, held once
            parts["rope"] = self._rope.inv_freq.numel() * self._rope.inv_freq.element_size()
        if self._key_weights is not None:  # keys rounded for the queries: the weights they are packed by, held once
            parts["key_weights"] = self._key_weights.numel() * self._key_weights.element_size()
        kv_bytes = sum(parts.values())
        report = {
            "kv_bytes": kv_bytes,
            "kv_bytes_full": full,
            "compression_ratio": full / kv_bytes if kv_bytes else 1.0,
            "seq_length": self.get_seq_length(),
            "parts": parts,
            "groups": groups,
        }
        if per_sequence is not None:
            report["per_sequence"] = per_sequence
        return report


def _scheme_constant_bytes(cache: MiniCache) -> dict[str, int]:
    """Bytes of the distinct rotation matrices (``rotations``) and level tables (``levels``) the cache's
    packed tensors reference."""
    seen: set[int] = set()
    found: dict[str, dict[int, int]] = {"rotations": {}, "levels": {}}

    def walk(x) -> None:
        if id(x) in seen or x is None or isinstance(x, (torch.Tensor, torch.nn.Module, type, str, int, float)):
            return
        seen.add(id(x))
        if isinstance(x, QuantizedTensor):
            for part, constant in (("rotations", x.rotation), ("levels", x.levels)):
                if constant is not None:
                    found[part][constant.untyped_storage().data_ptr()] = constant.numel() * constant.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and type(x).__module__.startswith("minicache."):  # our objects only
            for v in vars(x).values():
                walk(v)

    walk(cache.layers)
    walk(cache.stores)
    if cache.rows is not None:
        walk(cache.rows.rows)
    return {part: sum(sizes.values()) for part, sizes in found.items()}


def _row_plan(plan: dict | None) -> dict | None:
    """The plan a sequence's own cache binds to: the batch's, without registering it with the model
    (the batch's cache does that, and unbinds its rows with itself)."""
    return None if plan is None else {key: value for key, value in plan.items() if key != "caches"}


def install_padding_hook(model: torch.nn.Module) -> None:
    """Let every `MiniCache` passed to ``model`` see the model's 2-D ``attention_mask`` (and bind it
    to the model's attention plan on its first forward).

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
            if not cache.bound:
                cache.bind(getattr(module, ATTENTION_PLAN_ATTRIBUTE, None))

    model._minicache_padding_hook = model.register_forward_pre_hook(observe, with_kwargs=True)
