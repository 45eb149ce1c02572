"""What the fused decode kernel reads, decided without importing triton (the attention path asks
before choosing a backend; the launcher refuses the same views with the same reasons)."""

from __future__ import annotations

import dataclasses

import torch

from minicache.methods.base import Frame
from minicache.runtime.views import MergedKVView

__all__ = ["in_packing_frame", "packing_unsupported", "rope_unsupported"]


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
    pre-RoPE keys are read for unmerged layers only, up to a head size. (A merged group's rotated packing
    and uneven levels in its retained lists are read too: the launcher moves the group's dense tail into
    the packing's frame and restores its few retained vectors first, :func:`in_packing_frame`.)"""
    if view.rope is not None:
        if view.method is not None or role != "keys":
            return "the kernel reads keys packed before RoPE of unmerged layers only"
        return rope_unsupported(view.shape[-1], view.dtype)
    return None


def in_packing_frame(view: MergedKVView) -> MergedKVView:
    """A merged group's member as the kernel reads it: every direction in one frame, retained vectors plain.

    The packed directions hold ``e R`` (``R`` the rotated packing's matrix, :attr:`QuantizedTensor.rotation`),
    the dense tail (tokens merged since the last whole chunk) holds ``e``, in the group's aligned frame
    ``A`` (vectors ``m · e Aᵀ``). The tail is rotated in (``e R``, fewer tokens than a chunk, once per
    step, as the blockwise path does) and the member's frame becomes ``A R``, so the kernel rotates the
    query by it once and the directions' numerators back once per split, as for any aligned group.
    Retained vectors packed with a rotation or uneven levels (``[nnz, k, D]``, a few percent of the
    tokens) are restored to the model dtype: the kernel reads them exact. The blockwise torch path reads
    the result the same way (its frame), instead of rotating every packed block back. Other views (other
    layouts, no rotation or levels) are returned as they are.
    """
    if view.layout != "direction_magnitude":  # unmerged layers are attended in their packing's frame already
        return view
    if view.rope is not None:  # keys stored before RoPE are restored and turned per block, never read in a frame
        return view
    packed = view.qdirection
    retained_q = view.retained_q
    out = view
    if packed is not None and packed.rotation is not None:
        field = out.stored["direction"]
        rotation = packed.rotation.to(device=view.device, dtype=torch.float32)
        dense = field.dense
        if dense is not None:
            dense = (dense.float() @ rotation).to(dense.dtype)
        h, d = view.residual.shape[1], rotation.shape[-1]
        frame = rotation.expand(h, d, d) if view.frame is None else view.frame.rotation.float() @ rotation
        field = dataclasses.replace(field, packed=dataclasses.replace(packed, rotation=None), dense=dense)
        out = dataclasses.replace(out, stored={**out.stored, "direction": field}, frame=Frame(frame.contiguous()))
    if retained_q is not None and (retained_q.rotation is not None or retained_q.levels is not None):
        out = dataclasses.replace(out, retained_q=None, retained_value=retained_q.dequantize(view.dtype))
    return out
