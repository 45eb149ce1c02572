"""Model classes that find a minicache profile next to the weights and serve its merged groups."""

from __future__ import annotations

import math
import os
from pathlib import Path

from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM

PROFILE_FILENAME = "minicache_config.yaml"  # minicache.profile.PROFILE_FILENAME, without importing torch code
#: Room for retained tokens per merge block, as a fraction of its (token, KV head, keys/values) entries.
#: SmolLM2's shipped profile retains about 1/35 on average and at most 1/12 per block on 12k tokens of
#: code, release notes and licences; a block that retains more leaves the excess merged (logged).
RETAINED_FRACTION = float(os.environ.get("MINICACHE_VLLM_RETAINED_FRACTION", 1 / 12))

logger = init_logger("vllm.minicache_vllm")


class ProfileNotServableError(RuntimeError):
    """A model directory's profile, or the engine's settings, ask for something this plugin cannot serve."""


def profile_path(model: str | os.PathLike) -> Path | None:
    """The profile in a local model directory, or None (hub ids and directories without one)."""
    path = Path(model) / PROFILE_FILENAME
    return path if path.is_file() else None


def _refuse(path: Path, what: str) -> ProfileNotServableError:
    return ProfileNotServableError(f"minicache_vllm: {path}: {what}")


def check_engine(path: Path, vllm_config) -> None:
    """Refuse engine settings the merged store cannot serve yet, with what to pass instead."""
    from vllm.config import CompilationMode

    if vllm_config.cache_config.enable_prefix_caching:
        raise _refuse(path, "prefix caching shares blocks between requests, and a merged block depends on its "
                            "request's whole window; pass enable_prefix_caching=False")
    if vllm_config.speculative_config is not None:
        raise _refuse(path, "speculative decoding would merge draft tokens before they are accepted")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise _refuse(path, "tensor or pipeline parallelism is not served yet (one process per model)")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise _refuse(path, "the merged attention is plain PyTorch that torch.compile cannot trace; pass "
                            "enforce_eager=True")


def store_layout(template, heads: int, head_dim: int, dtype):
    """The page layout of a merged group (``template``: its :class:`~minicache.runtime.store.GroupStore`).

    Room for retained entries per merge block: the sinks of every head and component, plus
    :data:`RETAINED_FRACTION` of the block's entries when the group retains by distance (gamma > 0).
    """
    from minicache_vllm.layout import COMPONENTS, PageLayout

    settings = {name: template.components[name].settings for name in COMPONENTS}
    entries = template.block_size * heads * len(COMPONENTS)
    room = max(s.sink_tokens for s in settings.values()) * heads * len(COMPONENTS)
    if max(s.gamma for s in settings.values()) > 0:
        room += math.ceil(RETAINED_FRACTION * entries)
    return PageLayout.build({name: (s.merge_method, s.params) for name, s in settings.items()},
                            len(template.layers), heads, head_dim, template.block_size, dtype, min(room, entries))


def install(model, vllm_config, path: Path) -> dict:
    """Replace the merged groups' attention of ``model`` and add their store layers.

    Returns what was installed: ``groups`` (PagedGroup), ``window_bytes`` (the pool, taken off
    vLLM's KV cache budget), ``page_bytes_per_token`` (stores) and ``saved_bytes_per_token``.
    """
    import torch

    from minicache.profile import MergeProfile
    from minicache.runtime.cache import MiniCache
    from minicache_vllm.merged import MergedAttention, StoreLayer
    from minicache_vllm.paged import PagedGroup
    from minicache_vllm.windows import WindowPool

    check_engine(path, vllm_config)
    profile = MergeProfile.load(path.parent)
    hf_config = vllm_config.model_config.hf_config
    profile.check_model(hf_config)  # a profile made for another model fails here, with its own message
    if profile.quantization is not None:
        raise _refuse(path, "quantized profiles are not served yet (merged groups in the model dtype only)")
    cache = MiniCache(profile, hf_config)
    for template in cache.stores:
        for name, component in template.components.items():
            if component.method.closed_loop:
                raise _refuse(path, f"group {list(template.layers)}: {name} are merged by {component.method.name!r}, "
                                    "which restores each layer from the one below; not served yet")
    page_tokens = vllm_config.cache_config.block_size
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    context = vllm_config.compilation_config.static_forward_context
    dtype = vllm_config.model_config.dtype
    groups, stores, window_bytes, page_bytes, saved = [], [], 0, 0.0, 0.0
    for template in cache.stores:
        first = model.model.layers[template.layers[0]].self_attn
        heads, head_dim = first.attn.num_kv_heads, first.attn.head_size
        layout = store_layout(template, heads, head_dim, dtype)
        store = StoreLayer(f"model.layers.{template.layers[0]}.self_attn.minicache_store", layout, page_tokens)
        pool = WindowPool(max_seqs, len(template.layers), heads, head_dim,
                          template.residual_length + template.block_size, dtype)
        group = PagedGroup(template, layout, pool, page_tokens, store.blocks, store.layer_name)
        for member, layer in enumerate(template.layers):
            attn_module = model.model.layers[layer].self_attn
            old = attn_module.attn
            context.pop(old.layer_name, None)  # no pages, no metadata: the store holds this layer's KV
            attn_module.attn = MergedAttention(group, member, old.num_heads, old.num_kv_heads, old.head_size,
                                               old.impl.scale)
        groups.append(group)
        stores.append(store)
        window_bytes += pool.nbytes
        page_bytes += layout.content_bytes(page_tokens) * heads
        item = torch.empty((), dtype=dtype).element_size()
        saved += len(template.layers) * heads * 2 * head_dim * item - layout.content_bytes(page_tokens) * heads
    model.minicache_stores = torch.nn.ModuleList(stores)
    logger.info(
        "minicache_vllm: %s merges layers %s; their pages hold %.0f bytes per token instead of %.0f; exact windows "
        "of %d requests take %.1f MiB off the KV cache budget",
        path, ", ".join(g.template.layers.__repr__() for g in groups), page_bytes, page_bytes + saved, max_seqs,
        window_bytes / 2**20,
    )
    logger.info("minicache_vllm: merged layers attend through the reference path (PyTorch, one request at a time); "
                "the Triton decode kernel is not ported to vLLM's block tables yet")
    return {"groups": groups, "window_bytes": window_bytes, "page_bytes_per_token": page_bytes,
            "saved_bytes_per_token": saved}


class MiniCacheLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama; with a minicache profile next to the weights, its merged groups share pages."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        path = profile_path(vllm_config.model_config.model)
        self.minicache = install(self, vllm_config, path) if path is not None else None
