"""Quantizers of the cache: a registry of schemes behind one protocol (:class:`Quantizer`).

Built in: ``kivi`` (:mod:`minicache.quant.kivi`), ``rotated`` (:mod:`minicache.quant.rotated`:
KIVI after a fixed randomized Hadamard rotation), ``rotated-mse`` (:mod:`minicache.quant.clipped`:
value groups choose their range by squared error) and ``rotated-lloyd`` (:mod:`minicache.quant.lloyd`:
unevenly spaced levels, the same bytes). A new scheme is one file::

    from minicache.quant import Quantizer, register_quantizer

    @register_quantizer
    class MyScheme(Quantizer):
        name = "my-scheme"
        bits = (2, 3, 4)
        def quantize(self, x, role, bits, group_size, scale_bits=None): ...
        def chunk_tokens(self, role, group_size): ...

and a profile then says ``quantization: {scheme: my-scheme, bits: 3}``.
"""

from __future__ import annotations

from minicache.quant.base import ROLES, Quantizer
from minicache.quant.clipped import ClippedRotatedQuantizer
from minicache.quant.kivi import KiviQuantizer
from minicache.quant.lloyd import RotatedLloydQuantizer
from minicache.quant.packed import QuantizedTensor, append, quantize
from minicache.quant.rotated import RotatedQuantizer
from minicache.registry import Registry

__all__ = [
    "ROLES",
    "QuantizedTensor",
    "Quantizer",
    "append",
    "get_quantizer",
    "quantize",
    "quantizer_names",
    "register_quantizer",
    "unregister_quantizer",
]

_REGISTRY: Registry[Quantizer] = Registry("quantizer")
#: Register a :class:`Quantizer` subclass under its ``name`` (a class decorator).
register_quantizer = _REGISTRY.register
#: Remove a registered scheme (tests register toy schemes and clean up).
unregister_quantizer = _REGISTRY.unregister
#: The registered quantizer of a name (KeyError naming the registered ones otherwise).
get_quantizer = _REGISTRY.get
#: Names of the registered schemes, sorted.
quantizer_names = _REGISTRY.names

register_quantizer(KiviQuantizer)
register_quantizer(RotatedQuantizer)
register_quantizer(ClippedRotatedQuantizer)
register_quantizer(RotatedLloydQuantizer)
