"""Model classes that find a minicache profile next to the weights and serve its merged groups."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM

PROFILE_FILENAME = "minicache_config.yaml"  # minicache.profile.PROFILE_FILENAME, without importing torch code
#: Room for retained tokens per merge block, as a fraction of its (token, KV head, keys/values) entries.
#: SmolLM2's shipped profile retains about 1/35 on average and at most 1/12 per block on 12k tokens of
#: code, release notes and licences; a block that retains more leaves the excess merged (logged).
RETAINED_FRACTION = float(os.environ.get("MINICACHE_VLLM_RETAINED_FRACTION", 1 / 12))
#: How decode steps attend the stored layers (:class:`~minicache_vllm.merged.MergedAttention`), one of
#: :data:`~minicache_vllm.paged.DECODE_PATHS`: "auto" (every store a block at a time from its stored form;
#: the fused Triton kernel where a GPU runs it), "blockwise" (PyTorch), "fused" (the Triton kernel, also on
#: CPU under TRITON_INTERPRET=1) or "restore" (every store restored whole, then SDPA).
DECODE_PATH = os.environ.get("MINICACHE_VLLM_DECODE", "auto")

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
    from vllm.platforms import current_platform

    from minicache_vllm.paged import decode_path

    try:
        decode_path(DECODE_PATH)
    except ValueError as err:
        raise _refuse(path, str(err)) from None
    if not current_platform.is_cpu():
        # The store layers reuse vLLM's CPU backend for their pages (and copy block tables to the host each
        # step); on CUDA they need a backend of their own, not built or tested yet. The fused Triton decode
        # kernel already reads a step's batch gathered from the pages (MINICACHE_VLLM_DECODE=fused).
        raise _refuse(path, f"profiles are served on vLLM's CPU build only, not on {current_platform.device_name}; "
                            "use minicache's transformers runtime (MiniCache) on GPUs")
    if vllm_config.cache_config.enable_prefix_caching:
        raise _refuse(path, "prefix caching shares blocks between requests, and a merged block depends on its "
                            "request's whole window; pass enable_prefix_caching=False (vllm serve: "
                            "--no-enable-prefix-caching)")
    if vllm_config.speculative_config is not None:
        raise _refuse(path, "speculative decoding would merge draft tokens before they are accepted")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise _refuse(path, "tensor or pipeline parallelism is not served yet (one process per model)")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise _refuse(path, "the merged attention is plain PyTorch that torch.compile cannot trace; pass "
                            "enforce_eager=True (vllm serve: --enforce-eager)")


def store_layout(template, heads: int, head_dim: int, dtype):
    """The page layout of a merged group (``template``: its :class:`~minicache.runtime.store.GroupStore`).

    Room for retained entries per unit: the sinks of every head and retaining component (a component
    stored ``exact`` retains nothing), plus :data:`RETAINED_FRACTION` of the unit's entries when the
    group retains by distance (gamma > 0).
    """
    from minicache_vllm.layout import COMPONENTS, PageLayout, page_unit

    settings = [c.settings for c in (template.components[name] for name in COMPONENTS) if c.method.retains]
    entries = page_unit(template.components, template.block_size) * heads * len(settings)
    room = max((s.sink_tokens for s in settings), default=0) * heads * len(settings)
    if any(s.gamma > 0 for s in settings):
        room += math.ceil(RETAINED_FRACTION * entries)
    return PageLayout.build(template.components, heads, head_dim, template.block_size, dtype, min(room, entries))


@dataclass(frozen=True)
class StorePlan:
    """One store layer a profile asks for: the layers whose KV it holds, and how.

    Attributes
    ----------
    layers : tuple of int
        A merged group's members, or one unmerged layer of a quantized profile.
    template
        Its :class:`~minicache.runtime.store.GroupStore` or :class:`~minicache.runtime.layers.QuantizedLayer`,
        as :class:`minicache.MiniCache` builds it from the profile.
    layout : UnitLayout
        Its pages.
    window_tokens : int
        Recent tokens per request and layer kept outside the pages (``residual_length`` + a unit).
    sink_tokens : int
        Exact first tokens per request kept outside the pages (an unmerged quantized layer's sinks).
    window_bits : int or None
        The window's width (an unmerged quantized layer's ``quantization.window_bits``); None: exact.
    """

    layers: tuple[int, ...]
    template: object
    layout: object
    window_tokens: int
    sink_tokens: int = 0
    window_bits: int | None = None

    def page_bytes_per_token(self, page_tokens: int) -> int:
        """Bytes vLLM allocates per token of this store (all KV heads)."""
        return self.layout.content_bytes(page_tokens) * self.layout.heads

    def window_bytes(self, requests: int) -> int:
        """Bytes of the windows (and exact sinks) of ``requests`` requests."""
        import torch

        from minicache.quant.packed import scale_dtype

        item = torch.empty((), dtype=self.layout.dtype).element_size()
        d = self.layout.head_dim
        # a coded window: bits / 8 bytes per channel, and a scale and zero point per token and head
        per_token = (d * item if self.window_bits is None
                     else d * self.window_bits // 8 + 2 * scale_dtype(self.layout.dtype).itemsize)
        tokens = len(self.layers) * self.window_tokens
        return requests * 2 * self.layout.heads * (tokens * per_token + self.sink_tokens * d * item)


def plan_stores(cache, heads: int, head_dim: int, dtype) -> list[StorePlan]:
    """The store layers a profile's cache (``cache``: a :class:`minicache.MiniCache` of the model) needs:
    one per merged group, then one per unmerged quantized layer; other layers keep vLLM's own pages."""
    from minicache.runtime.layers import QuantizedLayer
    from minicache_vllm.layout import quantized_layer_layout

    plans = []
    for template in cache.stores:
        layout = store_layout(template, heads, head_dim, dtype)
        plans.append(StorePlan(template.layers, template, layout, template.residual_length + layout.unit_tokens))
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, QuantizedLayer):
            layout = quantized_layer_layout(layer, heads, head_dim, dtype)
            plans.append(StorePlan((i,), layer, layout, layer.spec.residual_length + layout.unit_tokens,
                                   layer.spec.sink_tokens, layer.spec.window_bits))
    return plans


def install(model, vllm_config, path: Path) -> dict:
    """Replace the attention of ``model``'s merged groups (and, in a quantized profile, of its other
    layers) and add their store layers.

    Returns what was installed: ``groups`` (PagedGroup, PagedQuantizedLayer), ``window_bytes`` (the
    pools, taken off vLLM's KV cache budget), ``requests`` (``max_num_seqs``, the pools' slots),
    ``page_bytes_per_token`` (stores) and ``saved_bytes_per_token``.
    """
    import torch

    from minicache.profile import MergeProfile
    from minicache.runtime.cache import MiniCache
    from minicache.runtime.store import GroupStore
    from minicache_vllm.merged import MergedAttention, StoreLayer
    from minicache_vllm.paged import DECODE_PATHS, PagedGroup, unservable_groups
    from minicache_vllm.quantized import PagedQuantizedLayer
    from minicache_vllm.windows import WindowPool

    check_engine(path, vllm_config)
    profile = MergeProfile.load(path.parent)
    hf_config = vllm_config.model_config.hf_config
    profile.check_model(hf_config)  # a profile made for another model fails here, with its own message
    cache = MiniCache(profile, hf_config)
    problem = unservable_groups(cache)
    if problem is not None:
        raise _refuse(path, problem)
    page_tokens = vllm_config.cache_config.block_size
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    context = vllm_config.compilation_config.static_forward_context
    dtype = vllm_config.model_config.dtype
    attn = model.model.layers[0].self_attn.attn
    heads, head_dim = attn.num_kv_heads, attn.head_size
    plans = plan_stores(cache, heads, head_dim, dtype)
    groups, stores = [], []
    for plan in plans:
        store = StoreLayer(f"model.layers.{plan.layers[0]}.self_attn.minicache_store", plan.layout, page_tokens)
        pool = WindowPool(max_seqs, len(plan.layers), heads, head_dim, plan.window_tokens, dtype, bits=plan.window_bits)
        kind = PagedGroup if isinstance(plan.template, GroupStore) else PagedQuantizedLayer
        group = kind(plan.template, plan.layout, pool, page_tokens, store.blocks, store.layer_name)
        for member, layer in enumerate(plan.layers):
            attn_module = model.model.layers[layer].self_attn
            old = attn_module.attn
            context.pop(old.layer_name, None)  # no pages, no metadata: the store holds this layer's KV
            attn_module.attn = MergedAttention(group, member, old.num_heads, old.num_kv_heads, old.head_size,
                                               old.impl.scale, decode=DECODE_PATH)
        groups.append(group)
        stores.append(store)
    model.minicache_stores = torch.nn.ModuleList(stores)
    item = torch.empty((), dtype=dtype).element_size()
    page_bytes = sum(plan.page_bytes_per_token(page_tokens) for plan in plans)
    saved = sum(len(plan.layers) * heads * 2 * head_dim * item for plan in plans) - page_bytes
    window_bytes = sum(group.nbytes for group in groups)
    merged = [plan.layers for plan in plans if isinstance(plan.template, GroupStore)]
    packed = len(plans) - len(merged)
    logger.info(
        "minicache_vllm: %s merges layers %s%s; their pages hold %.0f bytes per token instead of %.0f; windows "
        "of %d requests take %.1f MiB off the KV cache budget",
        path, ", ".join(repr(layers) for layers in merged) or "none",
        f" and packs {packed} more layers ({profile.quantization.describe()})" if packed else "",
        page_bytes, page_bytes + saved, max_seqs, window_bytes / 2**20,
    )
    logger.info("minicache_vllm: prefill steps restore each request's store; a step's decode rows are attended "
                "together (MINICACHE_VLLM_DECODE=%s: %s)", DECODE_PATH, DECODE_PATHS.get(DECODE_PATH, DECODE_PATH))
    return {"groups": groups, "window_bytes": window_bytes, "requests": max_seqs, "page_bytes_per_token": page_bytes,
            "saved_bytes_per_token": saved}


class MiniCacheLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama; with a minicache profile next to the weights, its merged groups share pages."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        path = profile_path(vllm_config.model_config.model)
        self.minicache = install(self, vllm_config, path) if path is not None else None
