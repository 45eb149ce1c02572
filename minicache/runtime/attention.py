"""Attention paths over a `MiniCache`: which code attends merged and quantized layers, decided once.

transformers 5.x models look their attention function up by ``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS`` and call it with what ``cache.update`` returned.
:func:`enable_fused_attention` switches a model to one of minicache's attention functions and
records an *attention plan* on it; every `MiniCache` used with the model binds to that plan once
(when built with the model, or on its first forward) and from then on its merged and quantized
layers hand :class:`~minicache.runtime.views.MergedKVView` snapshots to attention on every step.

Backends (:data:`BACKENDS`):

``"triton"``
    The fused Triton decode kernel (:mod:`minicache.runtime.kernels.decode`) for decode steps of
    layers it can read: merge methods with the ``"direction_magnitude"`` layout (SLERP, averaging)
    and unmerged quantized layers, packed by a quantizer with the ``"uniform_groups"`` layout (KIVI)
    at one width. Merging uses the methods' fused merge kernels. CUDA (or the interpreter).
``"torch"``
    :func:`~minicache.runtime.blockwise.blockwise_decode_attention` for decode steps of every layer:
    one block of merged tokens restored (and dequantized) at a time, any merge method, any device.

Layers the triton backend does not read fall back to the blockwise path; calls neither supports
(prefill, ``output_attentions``, softcapping, ...) restore the views and run transformers' sdpa.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from minicache.runtime import blockwise
from minicache.runtime.cache import ATTENTION_PLAN_ATTRIBUTE, MiniCache, install_padding_hook
from minicache.runtime.kernels import interpreter_enabled, why_unusable
from minicache.runtime.kernels.support import in_packing_frame, packing_unsupported
from minicache.runtime.rows import RowKV
from minicache.runtime.views import MergedKVView

__all__ = [
    "BACKENDS",
    "decode_views",
    "disable_fused_attention",
    "enable_fused_attention",
    "minicache_attention_forward",
    "minicache_torch_attention_forward",
    "triton_unsupported",
]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "minicache"
ATTENTION_NAME_TORCH = "minicache_torch"
#: Backend -> name of its attention function in transformers' registry.
BACKENDS = {"triton": ATTENTION_NAME, "torch": ATTENTION_NAME_TORCH}
#: Stored layouts and packings the Triton decode kernel reads.
TRITON_LAYOUTS = ("direction_magnitude", "vectors")
TRITON_PACKINGS = ("uniform_groups",)
# Keyword arguments some models pass that neither decode path implements.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux")
_WARNED: set[str] = set()


def _warn_once(message: str, *args: Any) -> None:
    key = message % args
    if key not in _WARNED:  # once per reason, not once per layer and step
        _WARNED.add(key)
        logger.warning(message, *args)


def _call_blocker(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: MergedKVView,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> str | None:
    """Why this call cannot attend the views directly (both decode paths support the same calls), or None."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions needs the attention weights"
    if dropout and module.training:
        return "attention dropout in training mode"
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if attention_mask.dim() != 4 or shape[1:3] != (1, 1) or shape[-1] != key.shape[-2]:
            return f"attention mask of shape {shape}"
    return None


def triton_unsupported(keys: MergedKVView, values: MergedKVView, device: torch.device) -> str | None:
    """Why the Triton decode kernel does not read this layer's views (they go to the blockwise path), or None."""
    for view, role in ((keys, "keys"), (values, "values")):
        if view.layout not in TRITON_LAYOUTS:
            return f"the kernel does not read the {view.method.name!r} method's stored layout"
        packing = None if view.quantizer is None else view.quantizer.kernel_layout
        if view.quantizer is not None and packing not in TRITON_PACKINGS:
            return f"the kernel does not read the {view.quantizer.name!r} packing"
        reason = packing_unsupported(view, role)
        if reason:
            return reason
    return why_unusable(device, allow_interpreter=True)


def decode_views(query: torch.Tensor, keys: MergedKVView, values: MergedKVView, attention_mask: torch.Tensor | None,
                 scaling: float | None, *, fused: bool) -> torch.Tensor:
    """Decode attention (one query token) read from stored views, never restoring them whole.

    ``fused``: through the fused Triton decode kernel where it reads the views and runs on their device
    (:func:`triton_unsupported`); elsewhere, and without ``fused``, the blockwise torch path, the reason
    logged once. Shapes as :func:`~minicache.runtime.kernels.decode.fused_decode_attention`: ``query``
    ``[B, Hq, 1, D]``, output ``[B, 1, Hq, D]``. A merged group packed rotated is read in the packing's frame
    on both paths (:func:`~minicache.runtime.kernels.support.in_packing_frame`).
    """
    keys, values = in_packing_frame(keys), in_packing_frame(values)
    if fused:
        reason = triton_unsupported(keys, values, query.device)
        if reason is None:
            from minicache.runtime.kernels.decode import fused_decode_attention

            return fused_decode_attention(query, keys, values, attention_mask, scaling)
        _warn_once("minicache: fused decode attention not used (%s); blockwise torch path", reason)
    return blockwise.blockwise_decode_attention(query, keys, values, attention_mask, scaling)


def _attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | MergedKVView,
    value: torch.Tensor | MergedKVView,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
    *,
    backend: str,
) -> tuple[torch.Tensor, None]:
    """Views of decode steps to the backend (or, for layers it cannot read, the blockwise path);
    everything else to transformers' sdpa (views restored first). A padded batch stored per sequence
    decodes one sequence at a time, each over its real tokens only."""
    if isinstance(key, RowKV):
        if query.shape[2] == 1 and all(row is not None for row in key.rows):
            outputs = [
                _attention_forward(module, query[i : i + 1], key.rows[i], value.rows[i], key.mask_of(attention_mask, i),
                                   dropout, scaling, kwargs, backend=backend)[0]
                for i in range(len(key.rows))
            ]
            return torch.cat(outputs, dim=0), None
        key, value = key.materialize(), value.materialize()
    if isinstance(key, MergedKVView):
        blocker = None if query.shape[2] == 1 else "prefill"
        blocker = blocker or _call_blocker(module, query, key, attention_mask, dropout, kwargs)
        if blocker is None:
            return decode_views(query, key, value, attention_mask, scaling, fused=backend == "triton"), None
        if blocker != "prefill":
            _warn_once("minicache: %s decode attention not used (%s); restoring the cache",
                       "fused" if backend == "triton" else "blockwise", blocker)
        key, value = key.materialize(), value.materialize()
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def minicache_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | MergedKVView,
    value: torch.Tensor | MergedKVView,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"minicache"`` (transformers' attention-interface signature).

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer.
    query : torch.Tensor
        ``[B, Hq, q, D]``.
    key, value : torch.Tensor or MergedKVView
        ``[B, H, T, D]`` tensors, or snapshots of a merged (or quantized) layer.
    attention_mask : torch.Tensor, optional
        sdpa-style ``[B, 1, q, T]`` boolean mask (or None).

    Returns
    -------
    tuple
        Attention output ``[B, q, Hq, D]`` and None (no weights).
    """
    return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, backend="triton")


def minicache_torch_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | MergedKVView,
    value: torch.Tensor | MergedKVView,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"minicache_torch"``: like ``"minicache"`` with
    :func:`~minicache.runtime.blockwise.blockwise_decode_attention` for every decode step."""
    return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, backend="torch")


def register_attention() -> None:
    """Register ``"minicache"`` and ``"minicache_torch"`` with transformers' attention and mask
    interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, minicache_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    AttentionInterface.register(ATTENTION_NAME_TORCH, minicache_torch_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME_TORCH, sdpa_mask)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def enable_fused_attention(
    model: torch.nn.Module, *, merge_kernel: bool = True, force: bool = False, backend: str = "triton"
) -> bool:
    """Attend `MiniCache` merged and quantized layers of ``model`` without restoring them.

    Decode steps (one query token) then run the backend over the stores directly; prefill, other
    layers and other caches keep running transformers' sdpa attention. The plan is recorded on the
    model: every `MiniCache` used with it binds to the plan once (when built with the model, or on
    its first forward) and keeps it; build caches after this call to be sure they use it.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention layers use transformers' attention interface (Llama, Mistral,
        Qwen2, ...). Its attention implementation becomes ``"minicache"`` / ``"minicache_torch"``
        (sdpa for everything the decode paths do not handle; an ``"eager"`` model therefore falls
        back to sdpa too).
    merge_kernel : bool
        Also merge blocks with the methods' fused Triton kernels (triton backend only).
    force : bool
        Allow CPU tensors when ``TRITON_INTERPRET=1`` (slow; for tests).
    backend : str
        ``"triton"``: the fused kernels (CUDA). ``"torch"``: no kernels, any device; decode steps
        attend a block of restored tokens at a time
        (:func:`~minicache.runtime.blockwise.blockwise_decode_attention`) instead of restoring the
        whole layer; merging keeps the torch reference.

    Returns
    -------
    bool
        True when the plan was switched on; False (with a logged reason) when the triton backend
        cannot run here, and nothing changed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    name = BACKENDS[backend]
    if backend == "triton":
        reason = why_unusable(_model_device(model), allow_interpreter=force)
        if reason is not None:
            hint = " (pass force=True to run on CPU through the interpreter)" if interpreter_enabled() else ""
            hint += "; backend='torch' attends block by block without triton"
            logger.warning("minicache: fused attention not enabled: %s%s; the torch path runs", reason, hint)
            return False
    else:
        merge_kernel = False
    state = getattr(model, "_minicache_fused", None)
    if state is not None:
        if state["plan"]["backend"] == backend and state["plan"]["merge_kernel"] == merge_kernel:
            return True
        disable_fused_attention(model)
    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        logger.warning("minicache: %s cannot change its attention implementation", type(model).__name__)
        return False
    install_padding_hook(model)
    plan = {"backend": backend, "merge_kernel": bool(merge_kernel), "caches": weakref.WeakSet()}
    setattr(model, ATTENTION_PLAN_ATTRIBUTE, plan)
    model._minicache_fused = {"previous": previous, "plan": plan}
    return True


def disable_fused_attention(model: torch.nn.Module) -> None:
    """Undo :func:`enable_fused_attention`: the previous attention implementation comes back, and
    caches bound to the plan go back to handing restored tensors to attention."""
    state = getattr(model, "_minicache_fused", None)
    if state is None:
        return
    for cache in list(state["plan"]["caches"]):
        cache.bind(None)
    setattr(model, ATTENTION_PLAN_ATTRIBUTE, None)
    model.set_attn_implementation(state["previous"])
    model._minicache_fused = None


def bound_caches(model: torch.nn.Module) -> list[MiniCache]:
    """The caches bound to ``model``'s current attention plan (for tests and diagnostics)."""
    plan = getattr(model, ATTENTION_PLAN_ATTRIBUTE, None)
    return [] if plan is None else list(plan["caches"])
