"""The runtime: the `MiniCache` cache (stores, layers, views), its attention paths, and (optionally) GPU kernels.

Modules, in the order data flows through them: :mod:`~minicache.runtime.store` (one store per merged
group), :mod:`~minicache.runtime.layers` (what transformers' `Cache` holds per layer),
:mod:`~minicache.runtime.cache` (the `MiniCache` facade), :mod:`~minicache.runtime.views` (the
snapshot contract attention paths read), :mod:`~minicache.runtime.attention` and
:mod:`~minicache.runtime.blockwise` (attention paths), :mod:`~minicache.runtime.kernels` (Triton),
:mod:`~minicache.runtime.memory` (bytes held, for every kind of cache).
"""

from minicache.runtime.cache import MiniCache, install_padding_hook
from minicache.runtime.retention import retention_mask
from minicache.runtime.views import MergedKVView

__all__ = ["MergedKVView", "MiniCache", "install_padding_hook", "retention_mask"]
