"""vLLM plugin for minicache merge profiles (``vllm.general_plugins`` entry point ``minicache``).

vLLM calls :func:`register` in every process it starts. It replaces the model classes of the
architectures minicache supports with subclasses that look for ``minicache_config.yaml`` in the
model directory: without one they are the stock classes, unchanged; with one, each merged group's
layers share one store of merged pages and keep their recent tokens exact in a window pool, and in a
quantized profile every other layer stores packed chunks in its pages (``minicache_vllm.merged``,
``docs/vllm-plugin-design.md``). Engine settings the stores cannot serve yet (prefix caching,
speculative decoding, parallelism, torch.compile, platforms other than CPU) are refused with a message.
"""

from __future__ import annotations

#: Architecture name -> the class that replaces vLLM's (``module:class``, imported lazily by vLLM).
ARCHITECTURES = {"LlamaForCausalLM": "minicache_vllm.models:MiniCacheLlamaForCausalLM"}


def register() -> None:
    """Register the profile-aware model classes with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    for architecture, model_cls in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model_cls)
    _budget_windows()


def _budget_windows() -> None:
    """Take the merged groups' window pools off the KV cache budget vLLM's CPU worker reports, so a
    profile's engine holds pages and windows in the memory a stock engine gives to pages alone."""
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # not the CPU build: nothing to adjust yet (CUDA is not served, see the design)
        return
    if getattr(CPUWorker.determine_available_memory, "_minicache", False):
        return
    original = CPUWorker.determine_available_memory

    def determine_available_memory(self) -> int:
        available = original(self)
        installed = getattr(self.model_runner.get_model(), "minicache", None)
        if not installed:
            return available
        windows, requests = installed["window_bytes"], installed["requests"]
        if windows >= available:
            from minicache_vllm.models import ProfileNotServableError

            raise ProfileNotServableError(
                f"minicache_vllm: the recent windows of max_num_seqs={requests} requests take {windows / 2**20:.0f} "
                f"MiB, and the whole KV cache budget is {available / 2**20:.0f} MiB; lower max_num_seqs (each "
                f"request's windows take {windows / requests / 2**20:.1f} MiB) or raise VLLM_CPU_KVCACHE_SPACE"
            )
        return available - windows

    determine_available_memory._minicache = True
    CPUWorker.determine_available_memory = determine_available_memory
