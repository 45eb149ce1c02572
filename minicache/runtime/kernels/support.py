"""What the fused decode kernel reads, decided without importing triton (the attention path asks
before choosing a backend; the launcher refuses the same views with the same reasons)."""

from __future__ import annotations

import torch

from minicache.runtime.views import MergedKVView

__all__ = ["packing_unsupported", "rope_unsupported"]


def rope_unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot read keys packed before RoPE at this head size, or None (the maps must fit
    in shared memory beside the tiles: compiled for sm_90 by :mod:`~minicache.runtime.kernels.aot_check`)."""
    limit = 64 if dtype == torch.float32 else 128
    if head_dim > limit:
        return (f"keys packed before RoPE with head_dim {head_dim} > {limit} ({dtype}): the kernel's two "
                "[D, D] maps would not fit in shared memory")
    return None


def packing_unsupported(view: MergedKVView, role: str) -> str | None:
    """Why the kernel cannot read how ``view`` (``role`` ``"keys"`` or ``"values"``) is packed, or None:
    rotated packings and pre-RoPE keys are read for unmerged layers only, pre-RoPE keys up to a head size,
    uneven levels in the packed prefix only."""
    packed = view.qdirection
    if view.retained_q is not None and view.retained_q.levels is not None:
        return "the kernel reads uneven levels (a table) in a layer's packed prefix only, not in retained lists"
    if view.method is not None and packed is not None and packed.rotation is not None:
        return ("the kernel reads rotated packings of unmerged layers only (a merged group's dense tail is not "
                "in the packing's frame)")
    if view.rope is not None:
        if view.method is not None or role != "keys":
            return "the kernel reads keys packed before RoPE of unmerged layers only"
        return rope_unsupported(view.shape[-1], view.dtype)
    return None
