"""Tiny random transformers configs for fast CPU tests (models build in well under a second).

``tiny_config(arch)`` gives 4-6 layers, hidden size 64, 4 attention heads, 2 KV heads, head_dim 16,
vocabulary 128. ``ARCHS`` are the architectures whose layers are all alike (MiniCache merges any
adjacent pair of them); ``MIXED_ARCHS`` mix sliding-window and full-attention layers, and
``"smollm3"`` mixes RoPE and NoPE layers, for the checks that refuse such groups.
"""

from __future__ import annotations

from typing import Any

import transformers

#: Architectures with uniform layers (Mistral's default sliding window makes all of its layers
#: sliding ones; pass ``sliding_window=None`` for full attention).
ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma")
#: Alternating sliding/full attention layers: Gemma 2 (1:1) and Gemma 3 (5:1, local/global rope_theta).
MIXED_ARCHS = ("gemma2", "gemma3")

_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "phi3": "Phi3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "smollm3": "SmolLM3Config",
}

_COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    # Phi-3 defaults pad to id 32000, far outside a 128-token vocabulary.
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# No attn_implementation: transformers picks its default per architecture (SDPA where supported,
# eager for Gemma 2), which is what users get and what the fused-kernel tests switch back to.
# Pass attn_implementation="eager" as an override to pin it.

_PER_ARCH: dict[str, dict[str, Any]] = {
    "gemma2": {"sliding_window": 16, "query_pre_attn_scalar": 16},
    "gemma3": {"num_hidden_layers": 6, "sliding_window": 16, "query_pre_attn_scalar": 16},
    "smollm3": {"no_rope_layer_interval": 2},
}


def tiny_config(arch: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A small random-init config of ``arch``; ``overrides`` replace any field.

    Parameters
    ----------
    arch : str
        One of ``ARCHS``, ``MIXED_ARCHS`` or ``"smollm3"``.
    **overrides
        Config fields, e.g. ``num_hidden_layers=6`` or ``sliding_window=None``. ``head_dim``
        follows ``hidden_size // num_attention_heads`` unless given.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(_CONFIG_CLASSES)}")
    kwargs = {**_COMMON, **_PER_ARCH.get(arch, {}), **overrides}
    # Gemma configs default head_dim to 256; set it everywhere so that every arch has head_dim 16.
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return getattr(transformers, _CONFIG_CLASSES[arch])(**kwargs)
