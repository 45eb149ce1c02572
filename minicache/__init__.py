"""minicache: calibrated cross-layer KV cache merging (MiniCache, arXiv 2405.14366) for transformers."""

from minicache.profile import MergeProfile
from minicache.runtime.cache import MiniCache

__version__ = "0.1.0"
__all__ = ["MergeProfile", "MiniCache", "__version__"]
