"""transformers integration: route decode attention over merged layers to the fused kernel.

transformers 5.x models look their attention function up by ``config._attn_implementation`` in
``ALL_ATTENTION_FUNCTIONS`` and call it with what ``cache.update`` returned. We register an
implementation named ``"minicache"`` whose mask function is sdpa's. During a forward pass of a
model switched on with :func:`enable_fused_attention`, merged layers of a `MiniCache` return
:class:`~minicache.runtime.cache.MergedKVView` snapshots on single-token steps; the ``"minicache"``
function runs the fused kernel on those and hands everything else (prefill, plain layers, another
cache) to transformers' sdpa attention unchanged.

``backend="torch"`` registers ``"minicache_torch"`` instead, which needs neither triton nor CUDA: it
attends on the same snapshots with :func:`~minicache.runtime.blockwise.blockwise_decode_attention`,
restoring (and dequantizing) one block of merged tokens at a time instead of a whole layer.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from minicache.runtime.cache import MergedKVView, MiniCache, install_padding_hook
from minicache.runtime.kernels import interpreter_enabled, why_unusable

logger = logging.getLogger(__name__)

ATTENTION_NAME = "minicache"
ATTENTION_NAME_TORCH = "minicache_torch"
BACKENDS = ("triton", "torch")
# Keyword arguments some models pass that the fused kernel does not implement.
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux")
_WARNED: set[str] = set()


def _fused_blocker(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: MergedKVView,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
    *,
    check_device: bool = True,
) -> str | None:
    """Why this call cannot use the fused kernel (or, without ``check_device``, the torch
    blockwise path, which supports the same calls on any device), or None."""
    if query.shape[2] != 1:
        return f"{query.shape[2]} query tokens"
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
    return why_unusable(query.device, allow_interpreter=True) if check_device else None


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
    kernel: bool,
) -> tuple[torch.Tensor, None]:
    """Views to the Triton kernel (``kernel``) or the blockwise torch path; everything else, and
    calls neither supports, to transformers' sdpa (views restored first)."""
    if isinstance(key, MergedKVView):
        blocker = _fused_blocker(module, query, key, attention_mask, dropout, kwargs, check_device=kernel)
        if blocker is None:
            if kernel:
                from minicache.runtime.kernels.decode import fused_decode_attention as attend
            else:
                from minicache.runtime.blockwise import blockwise_decode_attention as attend
            return attend(query, key, value, attention_mask, scaling), None
        if blocker not in _WARNED:  # once per reason, not once per layer and step
            _WARNED.add(blocker)
            what = "fused" if kernel else "blockwise"
            logger.warning("minicache: %s decode attention not used (%s); restoring the cache", what, blocker)
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
        ``[B, H, T, D]`` tensors, or snapshots of a merged store (single-token steps only).
    attention_mask : torch.Tensor, optional
        sdpa-style ``[B, 1, q, T]`` boolean mask (or None).

    Returns
    -------
    tuple
        Attention output ``[B, q, Hq, D]`` and None (no weights).
    """
    return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, kernel=True)


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
    :func:`~minicache.runtime.blockwise.blockwise_decode_attention` in place of the Triton kernel."""
    return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, kwargs, kernel=False)


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


def _find_cache(args: tuple, kwargs: dict) -> MiniCache | None:
    # transformers 5.x renamed ``past_key_values`` to ``cache``; accept either spelling.
    for name in ("cache", "past_key_values"):
        if isinstance(kwargs.get(name), MiniCache):
            return kwargs[name]
    return next((a for a in args if isinstance(a, MiniCache)), None)


def enable_fused_attention(
    model: torch.nn.Module, *, merge_kernel: bool = True, force: bool = False, backend: str = "triton"
) -> bool:
    """Use the Triton kernels for `MiniCache` merged layers of ``model`` (decode attention, merging).

    Decode steps (one query token) of merged layers then run the fused kernel over the merged
    store; prefill, unmerged layers and other caches keep running transformers' sdpa attention.
    Without triton or CUDA, ``backend="triton"`` changes nothing and logs why; ``backend="torch"`` works anywhere.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose attention layers use transformers' attention interface (Llama, Mistral,
        Qwen2, ...). Its attention implementation becomes ``"minicache"`` (sdpa for everything
        the kernel does not handle; an ``"eager"`` model therefore falls back to sdpa too).
    merge_kernel : bool
        Also merge blocks with the Triton merge kernel.
    force : bool
        Allow CPU tensors when ``TRITON_INTERPRET=1`` (slow; for tests).
    backend : str
        ``"triton"``: the fused kernels (CUDA). ``"torch"``: no kernels, any device; decode steps
        of merged and quantized layers attend a block of restored tokens at a time
        (:func:`~minicache.runtime.blockwise.blockwise_decode_attention`) instead of restoring the
        whole layer; merging keeps the torch reference.

    Returns
    -------
    bool
        True when the kernels were switched on.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    name = ATTENTION_NAME if backend == "triton" else ATTENTION_NAME_TORCH
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
        if state["backend"] == backend:
            return True
        disable_fused_attention(model)
    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        logger.warning("minicache: %s cannot change its attention implementation", type(model).__name__)
        return False
    install_padding_hook(model)
    flagged: weakref.WeakSet = weakref.WeakSet()

    def before(module, args, kwargs):
        cache = _find_cache(args, kwargs)
        if cache is not None:
            # Switched on for this forward pass only, so that the cache never hands views to
            # another model's attention function.
            cache.use_kernels(merge=merge_kernel or None, fused_decode=True)
            flagged.add(cache)

    def after(module, args, kwargs, output):
        cache = _find_cache(args, kwargs)
        if cache is not None:
            cache.use_kernels(fused_decode=False)

    handles = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    )
    model._minicache_fused = {"previous": previous, "handles": handles, "flagged": flagged, "backend": backend}
    return True


def disable_fused_attention(model: torch.nn.Module) -> None:
    """Undo :func:`enable_fused_attention` (the previous attention implementation comes back)."""
    state = getattr(model, "_minicache_fused", None)
    if state is None:
        return
    for handle in state["handles"]:
        handle.remove()
    for cache in list(state["flagged"]):
        cache.use_kernels(merge=False, fused_decode=False)
    model.set_attn_implementation(state["previous"])
    model._minicache_fused = None
