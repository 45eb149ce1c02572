"""vLLM plugin for minicache merge profiles (``vllm.general_plugins`` entry point ``minicache``).

vLLM calls :func:`register` in every process it starts. It replaces the model classes of the
architectures minicache supports with subclasses that look for ``minicache_config.yaml`` in the
model directory: without one they are the stock classes, unchanged; with one they validate it
against the model and refuse to serve it, with a message, until merged storage is built (issue 19,
``docs/vllm-plugin-design.md``): serving the full cache under a profile's name would claim memory
it does not save.
"""

from __future__ import annotations

#: Architecture name -> the class that replaces vLLM's (``module:class``, imported lazily by vLLM).
ARCHITECTURES = {"LlamaForCausalLM": "minicache_vllm.models:MiniCacheLlamaForCausalLM"}


def register() -> None:
    """Register the profile-aware model classes with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    for architecture, model_cls in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model_cls)
