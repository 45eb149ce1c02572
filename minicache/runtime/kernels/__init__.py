"""Triton kernels for the merged KV cache: merge (SLERP + retention) and fused decode attention.

Triton is optional (``pip install minicache[kernels]``): this package imports without it, and every
entry point says clearly when it cannot run. Kernels run on CUDA tensors; with
``TRITON_INTERPRET=1`` (set before triton is imported) they also run on CPU tensors through
Triton's interpreter, which is how CI tests them.

Public entry points
-------------------
merge_block
    One merge step of a block of tokens (norms, angle, SLERP, magnitudes, distances, retention).
fused_decode_attention
    Decode attention (one query token) straight from the merged store, never restoring it.
fused_decode_reference
    Torch reference of the above (restores, then softmax attention), for tests.

The kernels read :class:`~minicache.runtime.views.MergedKVView` snapshots and plain tensors; they know
nothing of caches. :func:`minicache.runtime.attention.enable_fused_attention` routes a transformers
model's decode attention over `MiniCache` layers to them.

``python -m minicache.runtime.kernels.aot_check --arch 90`` compiles every kernel for a GPU
architecture on a machine without one; ``benchmarks/kernel_bench.py`` measures them on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import torch

__all__ = [
    "check_usable",
    "fused_decode_attention",
    "fused_decode_reference",
    "interpreter_enabled",
    "kernels_usable",
    "merge_block",
    "triton_available",
    "why_unusable",
]

# Lazily imported names → module, so that `import minicache.runtime.kernels` never imports triton.
_LAZY = {
    "merge_block": "minicache.runtime.kernels.merge",
    "fused_decode_attention": "minicache.runtime.kernels.decode",
    "fused_decode_reference": "minicache.runtime.kernels.reference",
}


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unusable(device: torch.device | str, *, allow_interpreter: bool = True) -> str | None:
    """Why the kernels cannot run on tensors of ``device``, or None when they can.

    ``allow_interpreter``: accept CPU tensors when ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    if not triton_available():
        return "triton is not installed (pip install 'minicache[kernels]')"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu" and interpreter_enabled():
        if not allow_interpreter:
            return "CPU tensors run the kernels only when forced (interpreter)"
        return _interpreter_set_too_late()
    return f"the kernels need a CUDA device (got {device.type}; CPU works only under TRITON_INTERPRET=1)"


def _interpreter_set_too_late() -> str | None:
    """Triton decides at its own import whether its jit'd standard library (``tl.sum``, ...) is
    interpreted; ``TRITON_INTERPRET=1`` set later gives kernels that fail on every call."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(getattr(standard, "sum", None), InterpretedFunction):
        return None
    return (
        "TRITON_INTERPRET=1 was set after triton was imported (packages such as hqq import it through "
        "torch._dynamo); set it before importing torch-based libraries"
    )


def kernels_usable(device: torch.device | str, *, allow_interpreter: bool = True) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    return why_unusable(device, allow_interpreter=allow_interpreter) is None


def check_usable(device: torch.device | str) -> None:
    """Raise a RuntimeError saying why the kernels cannot run on ``device``, if they cannot."""
    reason = why_unusable(device)
    if reason is not None:
        raise RuntimeError(f"minicache Triton kernels cannot run: {reason}")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
