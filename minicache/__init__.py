"""minicache: calibrated cross-layer KV cache merging (MiniCache, arXiv 2405.14366) for transformers.

``from minicache import MergeProfile, MiniCache`` (imported on first use, so that command-line tools
start fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["MergeProfile", "MiniCache", "__version__"]

_LAZY = {"MergeProfile": "minicache.profile", "MiniCache": "minicache.runtime.cache"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'minicache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
