"""The runtime: merge math (torch reference), the `MiniCache` cache, and (optionally) GPU kernels."""

from minicache.runtime.cache import MergedLayer, MergedPairStore, MiniCache, install_padding_hook
from minicache.runtime.merge import PairMerge, restore, retention_mask, slerp_pair

__all__ = [
    "MergedLayer",
    "MergedPairStore",
    "MiniCache",
    "PairMerge",
    "install_padding_hook",
    "restore",
    "retention_mask",
    "slerp_pair",
]
