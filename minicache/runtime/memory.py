"""Bytes a cache holds, counted the same way for every cache minicache measures (DESIGN.md §5).

:func:`cache_bytes` is the one place that counts: a :class:`MiniCache` reports its parts
(:meth:`MiniCache.memory_report`); any transformers cache is counted tensor by tensor, everything its
layers hold (a `QuantizedCache`'s packed states, scales and zero points too), against what a
`DynamicCache` of the same dtype would hold for the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from minicache.model_spec import ModelSpec
from minicache.runtime.cache import MiniCache

__all__ = ["cache_bytes", "compression_ratio"]


def cache_bytes(cache: Any, config: Any = None, batch: int | None = None,
                dtype: torch.dtype | None = None, seen: int | None = None) -> tuple[int, int]:
    """``(bytes held, bytes a DynamicCache of the same dtype would hold)`` of a cache after use.

    Parameters
    ----------
    cache : Cache
        A :class:`MiniCache` (reports both itself) or any transformers cache.
    config : PretrainedConfig or ModelSpec, optional
        The model's config; with ``batch`` and ``dtype``, a transformers cache's full-size
        equivalent is computed from its layers' sequence lengths, whatever it stores (quantized
        caches hold less than their full-size keys). Without them a transformers cache is taken to
        hold full-size keys and values.
    batch : int, optional
    dtype : torch.dtype, optional
    seen : int, optional
        Tokens the cache has been given. A transformers cache that evicted some (a kvpress press)
        holds fewer: its full-size equivalent counts ``seen`` tokens in every layer that keeps its
        whole context (sliding-window layers count what they hold, as a `DynamicCache` would).
    """
    if isinstance(cache, MiniCache):
        report = cache.memory_report()
        return int(report["kv_bytes"]), int(report["kv_bytes_full"])
    if config is None or batch is None or dtype is None:
        held = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
        return int(held), int(held)
    spec = ModelSpec.from_config(config)
    item = torch.empty((), dtype=dtype).element_size()
    held = full = 0
    for index, layer in enumerate(cache.layers):
        storages = {}
        for t in _tensors_in(vars(layer), set()):
            storages[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = (
                t.numel() * t.element_size()
            )
        held += sum(storages.values())
        tokens = layer.get_seq_length()
        if seen is not None and not getattr(layer, "is_sliding", False):
            tokens = max(tokens, seen)
        full += batch * tokens * spec.kv_bytes_per_token(min(index, spec.num_layers - 1), item)
    return int(held), int(full)


def compression_ratio(kv_bytes_full: int, kv_bytes: int) -> float:
    """Full-cache bytes ÷ bytes held (1.0 for an empty cache)."""
    return kv_bytes_full / kv_bytes if kv_bytes else 1.0


def _tensors_in(obj: Any, seen: set[int]):
    """Every plain tensor reachable from ``obj`` (tuples, lists, dicts, tensor subclasses, objects)."""
    if id(obj) in seen or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if type(obj) is not torch.Tensor and flatten is not None:  # quanto's QTensor: its parts
            names, _ = flatten()
            for name in names:
                yield from _tensors_in(getattr(obj, name), seen)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for v in vars(obj).values():
            yield from _tensors_in(v, seen)
