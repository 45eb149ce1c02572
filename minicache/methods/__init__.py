"""Merge methods: a registry of ways to store a group of layers' keys or values, behind one protocol.

Built in: ``slerp`` (MiniCache, :mod:`minicache.methods.slerp`), ``average`` (the paper's
averaging baseline, :mod:`minicache.methods.average`), ``lowrank`` (a calibrated basis shared by
a group's layers, :mod:`minicache.methods.lowrank`), ``predictive_residual`` (each layer predicted
from the one below, the residual stored for a quantizer, :mod:`minicache.methods.predictive`) and
``exact`` (one layer's keys or values kept as they are beside its other component compressed,
:mod:`minicache.methods.exact`).
A new method is one file::

    from minicache.methods import MergeMethod, MethodParams, register_method

    @dataclass(frozen=True)
    class MyParams(MethodParams):
        rank: int = 8
        def __post_init__(self): ...            # validate, raising ProfileError("...", "rank")

    @register_method
    class MyMethod(MergeMethod):
        name = "my-method"
        Params = MyParams
        fields = (Field("coefficients", 8, quantize="vectors", part="coefficients"),)
        def encode(self, params, xs, tensors): ...
        def decode(self, params, fields, member, tensors, dtype, *, in_frame=False): ...

after which a profile can say ``keys: {method: my-method, rank: 8}``, the cache stores it, the
blockwise torch attention path reads it, and ``minicache-calibrate --methods slerp,my-method``
considers it. See ``docs/architecture.md``.
"""

from __future__ import annotations

from minicache.methods.average import AverageMethod
from minicache.methods.base import COMPONENTS, Encoded, Field, FitStatistic, Frame, MergeMethod, MethodParams
from minicache.methods.exact import ExactMethod
from minicache.methods.lowrank import LowRankMethod
from minicache.methods.predictive import PredictiveMethod
from minicache.methods.slerp import SlerpMethod
from minicache.registry import Registry

__all__ = [
    "COMPONENTS",
    "Encoded",
    "Field",
    "FitStatistic",
    "Frame",
    "MergeMethod",
    "MethodParams",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
]


def _check_params(cls: type) -> None:
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, MethodParams)):
        raise ValueError(f"{cls.__name__}.Params must be a MethodParams dataclass")


_REGISTRY: Registry[MergeMethod] = Registry("merge method", _check_params)
#: Register a :class:`MergeMethod` subclass under its ``name`` (a class decorator).
register_method = _REGISTRY.register
#: Remove a registered method (tests register toy methods and clean up).
unregister_method = _REGISTRY.unregister
#: The registered method of a name (KeyError naming the registered ones otherwise).
get_method = _REGISTRY.get
#: Names of the registered methods, sorted.
method_names = _REGISTRY.names

register_method(SlerpMethod)
register_method(AverageMethod)
register_method(LowRankMethod)
register_method(PredictiveMethod)
register_method(ExactMethod)
