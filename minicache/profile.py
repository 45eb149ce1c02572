"""Merge profiles: which layers MiniCache merges and how (schema, YAML, validation, presets, fingerprint).

A profile is plain data (DESIGN.md §4). It ships as ``minicache_config.yaml`` next to the model
weights, the way PEFT ships ``adapter_config.json``::

    format_version: 2
    producer: {name: minicache, version: 0.1.0}
    model:
      name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
      model_type: llama
      ...
    defaults: {gamma: 0.05, retention: distinct, sink_tokens: 1, residual_length: 128, block_size: 64}
    quantization: {scheme: kivi, bits: 4, group_size: 128, residual_length: 128}   # optional
    groups:
    - layers: [20, 21]
      keys: {method: slerp, t: 0.6, align: true, gamma: 0.05, retention: distinct, sink_tokens: 1}
      values: {method: slerp, t: 0.6, align: true, gamma: 0.05, retention: distinct, sink_tokens: 1}
    calibration: {...}
    tensors: {file: minicache_config.3f2a9c1b52e7d0aa.tensors, sha256: 3f2a...}

Each group's ``keys`` and ``values`` name a merge method (:mod:`minicache.methods`) and carry that
method's own parameters, validated by the method's ``Params`` class, beside the settings every
method shares (retention ``gamma``/``retention`` and ``sink_tokens``), like PEFT's per-method
config classes behind one ``peft_type``. Tensors a method needs live in a sidecar next to the YAML,
named after its own SHA-256 (so a profile and its sidecar are replaced together or not at all), with
an extension weight loaders do not pick up. Format 1 profiles (no ``method`` key; SLERP with
``t``/``align``/``weights`` beside the retention settings; ``minicache_tensors.safetensors``) still
load; they are written back as format 2.

Every field is validated when an object is built, so a bad profile fails when it is loaded, with
an error that names the field path, the bad value and what is allowed, never halfway through
generation. Importing this module needs only the standard library and PyYAML; validating groups
imports the method registry (torch).

Examples
--------
>>> profile = MergeProfile.preset("paper", model.config)   # S = L/2, t = 0.6, γ = 0.05
>>> profile.save("my-model/")                              # my-model/minicache_config.yaml
>>> MergeProfile.load("my-model/").check_model(model.config)
"""

from __future__ import annotations

import copy
import itertools
import numbers
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from minicache.fileio import atomic_write, exists_message
from minicache.model_spec import ModelSpec, format_rope
from minicache.validation import (
    ModelMismatchWarning,
    ProfileError,
    build,
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_keys,
    check_str,
    check_unit,
    plain,
    show,
    type_name,
)

__all__ = [
    "FORMAT_VERSION",
    "LEGACY_TENSORS_FILENAME",
    "PRESETS",
    "PROFILE_FILENAME",
    "RETENTION_RULES",
    "SUPPORTED_FORMAT_VERSIONS",
    "WINDOW_BITS",
    "Defaults",
    "MergeGroup",
    "MergeProfile",
    "MergeSettings",
    "ModelFingerprint",
    "ModelMismatchWarning",
    "ProfileError",
    "Quantization",
    "sidecar_filename",
]

#: How retained tokens are chosen: "distinct" keeps the most distinct pairs (the paper's
#: reading, our default); "similar" is the literal reading found in xKV's re-implementation.
RETENTION_RULES = ("distinct", "similar")
#: Version written by this code; bump it on any change that an older reader would misread.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
PROFILE_FILENAME = "minicache_config.yaml"
#: The sidecar's name in format 1 (read, never written: loaders of weights pick up *.safetensors).
LEGACY_TENSORS_FILENAME = "minicache_tensors.safetensors"
SIDECAR_SUFFIX = ".tensors"
#: Built-in profiles: "paper" = the paper's layout, "none" = no groups (the full-cache baseline).
PRESETS = ("paper", "none")
#: Code widths an unmerged layer's recent window may be stored at (`Quantization.window_bits`).
WINDOW_BITS = (6, 8)
#: How unmerged layers round their packed keys (`Quantization.key_rounding`).
KEY_ROUNDINGS = ("nearest", "queries")
#: The sidecar tensor of `key_rounding: queries`: ``[layers, KV heads, head_dim]`` channel weights.
KEY_WEIGHTS_TENSOR = "quantization.key_weights"
DEFAULT_METHOD = "slerp"

_LAYERS_ALLOWED = ("a list of strictly consecutive layer indices, e.g. [20, 21] (at least 2 for merges; "
                   "1 for methods that store single layers, such as lowrank)")
#: Settings of a component that every method shares (the rest belong to the method).
_SHARED_KEYS = ("gamma", "retention", "sink_tokens")


def _version() -> str:
    # Not `minicache.__version__`: `minicache/__init__.py` imports this module before it sets it.
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("minicache")
    except (ImportError, PackageNotFoundError):
        return "0.1.0"


def _default_producer() -> dict:
    return {"name": "minicache", "version": _version()}


def _method(name: str):
    from minicache.methods import get_method

    return get_method(name)


def _method_names() -> list[str]:
    from minicache.methods import method_names

    return method_names()


def _quantizer(name: str):
    from minicache.quant import get_quantizer

    return get_quantizer(name)


# ---- schema ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeSettings:
    """How one component (keys or values) of one group is merged: a method, its parameters, retention.

    Attributes
    ----------
    params : MethodParams, mapping or None
        The method's own parameters (e.g. :class:`~minicache.methods.slerp.SlerpParams`); a mapping
        is validated into them, None gives the method's defaults.
    method : str or None
        A registered merge method (:func:`minicache.methods.method_names`); None: the method whose
        ``Params`` class ``params`` is, else ``"slerp"``.
    gamma : float
        Retention threshold as a fraction of the range of the method's per-token distances, in
        [0, 1]; tokens with ``d >= d_max - (d_max - d_min) * gamma`` stay exact
        (``retention="distinct"``).
    retention : str
        One of :data:`RETENTION_RULES`.
    sink_tokens : int
        The first tokens of every sequence that are never merged (the BOS/sink token is the most
        divergent of all).
    pre_rope : bool
        Keys only: the method stores the keys with the model's RoPE removed at their cache indices, and
        restoring puts it back (:mod:`minicache.runtime.rope`). Before RoPE a key's structure does not
        turn with its position, so a basis shared by every token holds it better (SmolLM2: a quarter of
        the width restores 2-3x closer, ``benchmarks/results/lowrank-cpu/probe.md``); attention then
        restores the prefix a block at a time instead of scoring the stored form. False: keys as the
        cache receives them (the format before this field).

    Examples
    --------
    >>> from minicache.methods.slerp import SlerpParams
    >>> MergeSettings(SlerpParams(t=0.5, align=True), gamma=0.05)
    >>> MergeSettings.create("slerp", t=0.5, gamma=0.05)      # the same, from plain values
    """

    params: Any = None
    method: str | None = None
    gamma: float = 0.05
    retention: str = "distinct"
    sink_tokens: int = 1
    pre_rope: bool = False

    def __post_init__(self) -> None:
        method = self.method
        if method is None:
            method = _method_for(self.params)
        method = check_choice(method, "method", _method_names(), "a registered merge method")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "params", _method(method).params(self.params))
        object.__setattr__(self, "gamma", check_unit(self.gamma, "gamma"))
        object.__setattr__(self, "retention", check_choice(self.retention, "retention", RETENTION_RULES,
                                                           "a retention rule"))
        object.__setattr__(self, "sink_tokens", check_int(self.sink_tokens, "sink_tokens", 0))
        object.__setattr__(self, "pre_rope", check_bool(self.pre_rope, "pre_rope"))

    @classmethod
    def create(cls, method: str = DEFAULT_METHOD, *, gamma: float = 0.05, retention: str = "distinct",
               sink_tokens: int = 1, pre_rope: bool = False, **params: Any) -> MergeSettings:
        """Settings from plain values: ``create("slerp", t=0.5, align=True, gamma=0.1)``."""
        return cls(params=params, method=method, gamma=gamma, retention=retention, sink_tokens=sink_tokens,
                   pre_rope=pre_rope)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "", inherited: Mapping[str, Any] | None = None
                  ) -> MergeSettings:
        """Strictly validated settings from a profile's flat mapping (``method`` + the method's
        parameters + the shared retention settings); ``inherited`` fills shared settings it omits."""
        inherited = dict(inherited or {})
        if not isinstance(data, Mapping):
            check_keys(data, path, ("method", *_SHARED_KEYS))  # raises: names what a mapping may hold
        method = data.get("method", DEFAULT_METHOD)
        try:
            method = check_choice(method, "method", _method_names(), "a registered merge method")
        except ProfileError as err:
            raise err.within(path) from None
        impl = _method(method)
        own = tuple(f.name for f in fields(impl.Params))
        check_keys(data, path, ("method", *own, *_SHARED_KEYS, "pre_rope"))
        shared = {k: data.get(k, inherited.get(k)) for k in _SHARED_KEYS}
        shared = {k: v for k, v in shared.items() if v is not None or k in data}
        if "pre_rope" in data:
            shared["pre_rope"] = data["pre_rope"]
        params = impl.params({k: v for k, v in data.items() if k in own}, path)
        return build(cls, path, {"params": params, "method": method, **shared})

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the profile's layout: ``method``, the method's parameters, the shared settings."""
        return {
            "method": self.method,
            **self.params.to_dict(),
            "gamma": self.gamma,
            "retention": self.retention,
            "sink_tokens": self.sink_tokens,
            **({"pre_rope": True} if self.pre_rope else {}),  # profiles without it read as before
        }

    @property
    def merge_method(self):
        """The registered :class:`~minicache.methods.MergeMethod` object."""
        return _method(self.method)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Local names of the sidecar tensors these settings need (e.g. ``("rotation",)``)."""
        return self.merge_method.tensor_names(self.params)

    def summary(self) -> str:
        """``"t 0.6, gamma 0.05, retention distinct, sink 1"`` (plus ``", method X"`` unless SLERP)."""
        text = f"{self.params.summary()}, gamma {self.gamma:g}, retention {self.retention}, sink {self.sink_tokens}"
        if self.pre_rope:
            text += ", pre-RoPE"
        return text if self.method == DEFAULT_METHOD else f"{text}, method {self.method}"


def _method_for(params: Any) -> str:
    """The registered method whose ``Params`` class ``params`` is an instance of (default SLERP)."""
    if params is None or isinstance(params, Mapping):
        return DEFAULT_METHOD
    from minicache.methods import get_method, method_names

    matches = [name for name in method_names() if type(params) is get_method(name).Params]
    if len(matches) != 1:
        raise ProfileError(
            f"{show(params)} is a {type_name(params)}; allowed: the Params of one registered merge method "
            "(or name the method)",
            "params",
        )
    return matches[0]


@dataclass(frozen=True)
class Defaults:
    """Profile-wide settings: the shared settings groups inherit in YAML, and the merge schedule.

    Attributes
    ----------
    gamma, retention, sink_tokens
        Inherited by every group's ``keys`` and ``values`` that do not set them (see
        :class:`MergeSettings`).
    residual_length : int
        Most recent tokens kept exact (unmerged); 0 is the paper's merge-every-step behaviour.
    block_size : int
        Tokens merged at a time out of the residual window.
    """

    gamma: float = 0.05
    retention: str = "distinct"
    sink_tokens: int = 1
    residual_length: int = 128
    block_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", check_unit(self.gamma, "gamma"))
        object.__setattr__(self, "retention", check_choice(self.retention, "retention", RETENTION_RULES,
                                                           "a retention rule"))
        object.__setattr__(self, "sink_tokens", check_int(self.sink_tokens, "sink_tokens", 0))
        object.__setattr__(self, "residual_length", check_int(self.residual_length, "residual_length", 0))
        object.__setattr__(self, "block_size", check_int(self.block_size, "block_size", 1))

    def shared(self) -> dict[str, Any]:
        """The settings a group's component inherits."""
        return {"gamma": self.gamma, "retention": self.retention, "sink_tokens": self.sink_tokens}

    def settings(self, method: str = DEFAULT_METHOD, **params: Any) -> MergeSettings:
        """The :class:`MergeSettings` of ``method`` with these shared settings."""
        return MergeSettings.create(method, **self.shared(), **params)


@dataclass(frozen=True)
class MergeGroup:
    """Consecutive layers whose caches are merged into one shared store.

    Attributes
    ----------
    layers : tuple of int
        At least 2 strictly consecutive layer indices, e.g. ``(20, 21)`` or ``(20, 21, 22)``.
    keys, values : MergeSettings
        Settings for the keys and for the values.
    """

    layers: tuple[int, ...]
    keys: MergeSettings
    values: MergeSettings

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ProfileError(f"{show(layers)} is a {type_name(layers)}; allowed: {_LAYERS_ALLOWED}", "layers")
        for i, layer in enumerate(layers):
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ProfileError(
                    f"{show(layer)} is a {type_name(layer)}; allowed: a layer index (integer >= 0)", f"layers[{i}]"
                )
            if layer < 0:
                raise ProfileError(f"{layer} is negative; allowed: a layer index (integer >= 0)", f"layers[{i}]")
        layers = tuple(int(layer) for layer in layers)
        if not layers:
            raise ProfileError(f"{list(layers)} is empty; allowed: {_LAYERS_ALLOWED}", "layers")
        for a, b in itertools.pairwise(layers):
            if b != a + 1:
                raise ProfileError(
                    f"{list(layers)} is non-adjacent ({b} does not directly follow {a}); allowed: {_LAYERS_ALLOWED}",
                    "layers",
                )
        object.__setattr__(self, "layers", layers)
        for component in ("keys", "values"):
            settings = getattr(self, component)
            check_instance(settings, MergeSettings, component)
            least = settings.merge_method.min_members
            if len(layers) < least:
                raise ProfileError(
                    f"{list(layers)} has fewer than {least} layers, the fewest method {settings.method!r} stores; "
                    f"allowed: {_LAYERS_ALLOWED}", "layers")
            try:
                settings.merge_method.check_members(settings.params, len(layers))
            except ProfileError as err:
                raise err.within(component) from None
        if self.values.pre_rope:
            raise ProfileError("true; allowed: false (only keys carry RoPE)", "values.pre_rope")

    @property
    def label(self) -> str:
        """``"20-21"``: the first and last layer."""
        return f"{self.layers[0]}-{self.layers[-1]}"

    def components(self) -> tuple[tuple[str, MergeSettings], tuple[str, MergeSettings]]:
        return ("keys", self.keys), ("values", self.values)


@dataclass(frozen=True)
class Quantization:
    """Integer storage of the cache (DESIGN.md §3 "Quantized storage"), by a registered scheme.

    The scheme (:mod:`minicache.quant`, default ``kivi``: keys per channel in groups of
    ``group_size`` tokens, values per token in groups of ``min(group_size, head_dim)`` channels)
    packs the stored fields of merged groups that a method marks quantizable, their retained vectors,
    and unmerged full-attention layers; magnitudes stay fp16.

    Attributes
    ----------
    bits : int or tuple of int
        Code width, one the scheme supports; or one width per layer of the model (a group's members
        must share theirs). Keys, and values too unless ``value_bits`` says otherwise.
    value_bits : int or tuple of int or None
        Code width of values (same forms as ``bits``); None: the same as ``bits``.
        ``minicache-calibrate --kv-bits auto`` chooses both per layer.
    group_size : int
        Tokens per key group and channels per value group (capped at ``head_dim``).
    residual_length : int
        Most recent tokens of unmerged layers kept exact in the model dtype; older tokens are
        quantized ``group_size`` at a time and never re-quantized. (Merged groups keep the
        profile's ``defaults.residual_length`` exact, and quantize each merged block.)
    scheme : str
        A registered quantizer.
    sink_tokens : int
        First tokens of unmerged layers kept exact (attention sinks): their keys are outliers that
        stretch the ranges of the first key group and draw much of the attention, so their rounding
        costs more than anyone else's. Fewer than ``group_size``; 0 keeps none (the format before
        this field).
    pre_rope_keys : bool
        Pack unmerged layers' keys with the model's RoPE removed (:mod:`minicache.runtime.rope`):
        before RoPE a channel keeps its range from token to token, which per-channel key groups need.
        False: keys are packed as the cache receives them (the format before this field).
    window_bits : int or None
        How unmerged layers hold their recent window (the ``residual_length`` tokens and the tokens
        waiting for a whole chunk): None exact in the model dtype (the format before this field);
        8: 8-bit codes per token and head (asymmetric, a scale and zero point per head vector), about
        half the bytes; 6: 6-bit codes of the head vector turned by the ``rotated`` scheme's Hadamard
        rotation first (without it a key's outlier channels would take the range), 41 % of the bytes in
        bf16. Each token is stored once when it arrives (after the step that brought it attended it
        exact) and packed to ``bits`` from that storage when it leaves the window.
    scale_bits : int or None
        How packed groups hold their scale and zero point: None as fp16 (fp32 for fp32 models; the format
        before this field); 8: 8-bit codes each (:func:`~minicache.quant.packed.encode_scales`), half the
        bytes of scales, which smaller groups can spend on precision. The scheme must support it
        (:attr:`~minicache.quant.Quantizer.scale_widths`).
    key_rounding : str
        How unmerged layers round their packed keys to the levels of their groups: ``"nearest"`` (the format
        before this field); ``"queries"``: channel by channel, each channel's error pushed onto the channels not
        yet rounded so that the error lands where the queries do not read (error feedback, as GPTQ rounds
        weights), with the profile's per-channel query energies (the sidecar tensor
        :data:`KEY_WEIGHTS_TENSOR`, fitted by ``minicache-calibrate``). Same levels, scales and bytes: only
        the codes differ, so every reader is unchanged. The scheme must rotate
        (:attr:`~minicache.quant.Quantizer.weighted_rounding`): without a rotation the channels' errors are
        independent and there is nothing to push.
    """

    bits: int | tuple[int, ...] = 4
    group_size: int = 128
    residual_length: int = 128
    scheme: str = "kivi"
    value_bits: int | tuple[int, ...] | None = None
    sink_tokens: int = 0
    pre_rope_keys: bool = False
    window_bits: int | None = None
    scale_bits: int | None = None
    key_rounding: str = "nearest"

    def __post_init__(self) -> None:
        from minicache.quant import quantizer_names

        scheme = check_choice(self.scheme, "scheme", quantizer_names(), "a registered quantization scheme")
        object.__setattr__(self, "scheme", scheme)
        supported = list(_quantizer(scheme).bits)
        allowed = f"one of {supported}, or a list of them (one per layer)"

        def width(value: Any, path: str) -> int:
            if isinstance(value, bool) or value not in supported:
                raise ProfileError(f"{show(value)} is not a supported width; allowed: {allowed}", path)
            return int(value)

        def widths(value: Any, path: str) -> int | tuple[int, ...]:
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ProfileError(f"{show(value)} is empty; allowed: {allowed}", path)
                return tuple(width(b, f"{path}[{i}]") for i, b in enumerate(value))
            return width(value, path)

        object.__setattr__(self, "bits", widths(self.bits, "bits"))
        if self.value_bits is not None:
            value_bits = widths(self.value_bits, "value_bits")
            object.__setattr__(self, "value_bits", None if value_bits == self.bits else value_bits)
        object.__setattr__(self, "group_size", check_int(self.group_size, "group_size", 2))
        object.__setattr__(self, "residual_length", check_int(self.residual_length, "residual_length", 0))
        object.__setattr__(self, "sink_tokens", check_int(self.sink_tokens, "sink_tokens", 0))
        if self.sink_tokens >= self.group_size:
            raise ProfileError(f"{self.sink_tokens} exact sink tokens do not fit in the first group of "
                               f"{self.group_size}; allowed: 0 to {self.group_size - 1}", "sink_tokens")
        object.__setattr__(self, "pre_rope_keys", check_bool(self.pre_rope_keys, "pre_rope_keys"))
        if self.window_bits is not None and (isinstance(self.window_bits, bool) or self.window_bits not in WINDOW_BITS):
            raise ProfileError(f"{show(self.window_bits)} is not a window width; allowed: {list(WINDOW_BITS)}, or "
                               "leave it out (exact)", "window_bits")
        if self.scale_bits is not None:
            widths = _quantizer(scheme).scale_widths
            if isinstance(self.scale_bits, bool) or self.scale_bits not in widths:
                allowed = f"{list(widths)}, or leave it out (floats)" if widths else "leave it out (floats)"
                raise ProfileError(f"{show(self.scale_bits)} is not a scale width of scheme {scheme!r}; allowed: "
                                   f"{allowed}", "scale_bits")
        object.__setattr__(self, "key_rounding", check_choice(self.key_rounding, "key_rounding", KEY_ROUNDINGS,
                                                              "a key rounding"))
        if self.key_rounding != "nearest" and not _quantizer(scheme).weighted_rounding:
            raise ProfileError(f"scheme {scheme!r} does not round keys by weights (it does not rotate them); "
                               "allowed: key_rounding nearest, or a rotated scheme", "key_rounding")

    @property
    def quantizer(self):
        """The registered :class:`~minicache.quant.Quantizer` of :attr:`scheme`."""
        return _quantizer(self.scheme)

    def pack(self, x, role: str, bits: int, weights=None):
        """``x`` ``[..., H, N, D]`` of ``role`` packed at ``bits`` by this scheme, its group size and scale width:
        a :class:`~minicache.quant.QuantizedTensor`. ``weights`` ``[H, D]``: round by them
        (:attr:`key_rounding`; None: to the nearest level)."""
        if weights is None:  # a scheme written before weighted rounding need not take the argument
            return self.quantizer.quantize(x, role, bits, self.group_size, self.scale_bits)
        return self.quantizer.quantize(x, role, bits, self.group_size, self.scale_bits, weights=weights)

    def bits_of(self, layer: int, role: str = "keys") -> int:
        """Code width of one layer's keys (``role="keys"``) or values (``"values"``)."""
        bits = self.value_bits if role == "values" and self.value_bits is not None else self.bits
        return bits if isinstance(bits, int) else bits[layer]

    def widths(self) -> set[int]:
        """Every width used, keys and values."""
        out: set[int] = set()
        for bits in (self.bits, self.value_bits):
            if bits is not None:
                out |= {bits} if isinstance(bits, int) else set(bits)
        return out

    def mean_bits(self, num_layers: int) -> float:
        """Code width averaged over the layers' keys and values (scales not included)."""
        return sum(self.bits_of(i, r) for i in range(num_layers) for r in ("keys", "values")) / (2 * num_layers)

    def check_shape(self, head_dim: int, num_layers: int | None = None) -> None:
        """Raise :class:`ProfileError` when this scheme cannot pack vectors of ``head_dim`` (or the
        per-layer widths do not match ``num_layers``)."""
        for name in ("bits", "value_bits"):
            bits = getattr(self, name)
            if num_layers is not None and isinstance(bits, tuple) and len(bits) != num_layers:
                raise ProfileError(
                    f"{len(bits)} widths for {num_layers} layers; allowed: one width per layer", f"quantization.{name}"
                )
        for bits in sorted(self.widths()):
            problem = self.quantizer.check(bits, self.group_size, head_dim)
            if problem is not None:
                where, detail = problem
                raise ProfileError(detail, f"quantization.{where}")

    def describe(self) -> str:
        widths = sorted(self.widths())
        bits = "/".join(str(b) for b in widths)
        mean = ""
        if len(widths) > 1:
            layers = max(len(b) if isinstance(b, tuple) else 1 for b in (self.bits, self.value_bits or 0))
            mean = f", mean {self.mean_bits(layers):.2f} bits"
        scheme = "" if self.scheme == "kivi" else f"{self.scheme} "
        sinks = f", {self.sink_tokens} exact sinks" if self.sink_tokens else ""
        sinks += ", keys pre-RoPE" if self.pre_rope_keys else ""
        sinks += f", {self.window_bits}-bit window" if self.window_bits else ""
        sinks += f", {self.scale_bits}-bit scales" if self.scale_bits else ""
        sinks += ", keys rounded for the queries" if self.key_rounding == "queries" else ""
        return f"{bits}-bit {scheme}KV (group {self.group_size}, residual {self.residual_length}{sinks}{mean})"

    def to_dict(self) -> dict[str, Any]:
        def plain(bits):
            return bits if isinstance(bits, int) else list(bits)

        out = {"scheme": self.scheme, "bits": plain(self.bits), "group_size": self.group_size,
               "residual_length": self.residual_length}
        if self.value_bits is not None:
            out["value_bits"] = plain(self.value_bits)
        if self.sink_tokens:
            out["sink_tokens"] = self.sink_tokens
        if self.pre_rope_keys:
            out["pre_rope_keys"] = True
        if self.window_bits:
            out["window_bits"] = self.window_bits
        if self.scale_bits:
            out["scale_bits"] = self.scale_bits
        if self.key_rounding != "nearest":
            out["key_rounding"] = self.key_rounding
        return out


# ---- the model ---------------------------------------------------------------------------------
def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class ModelFingerprint:
    """Which model a profile was made for.

    Attributes
    ----------
    name_or_path : str or None
        For people; not compared.
    model_type, num_hidden_layers, num_key_value_heads, head_dim : str, int, int, int
        The basic shape of the KV cache.
    config_sha256 : str
        SHA-256 of a canonical JSON of the KV-relevant config fields
        (:attr:`minicache.model_spec.ModelSpec.fingerprint_json`): model_type, layer count,
        attention and KV heads, head_dim, hidden_size, per-layer attention types, rotary settings
        and sliding windows.
    """

    name_or_path: str | None
    model_type: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    config_sha256: str

    #: Fields compared by :meth:`differences` (name_or_path is only informative).
    COMPARED = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim", "config_sha256")

    def __post_init__(self) -> None:
        if self.name_or_path is not None:
            check_str(self.name_or_path, "name_or_path", "a string or null")
        check_str(self.model_type, "model_type")
        object.__setattr__(self, "num_hidden_layers", check_int(self.num_hidden_layers, "num_hidden_layers", 1))
        object.__setattr__(self, "num_key_value_heads",
                           check_int(self.num_key_value_heads, "num_key_value_heads", 1))
        object.__setattr__(self, "head_dim", check_int(self.head_dim, "head_dim", 1))
        if not _is_sha256(self.config_sha256):
            raise ProfileError(
                f"{show(self.config_sha256)} is not a SHA-256; allowed: 64 lowercase hex digits", "config_sha256"
            )

    @classmethod
    def from_spec(cls, spec: ModelSpec, name_or_path: str | None = None) -> ModelFingerprint:
        """Fingerprint of a :class:`~minicache.model_spec.ModelSpec` (``name_or_path``: recorded for
        people; defaults to the config's own)."""
        name = spec.name_or_path if name_or_path is None else name_or_path
        return cls(
            name_or_path=None if name is None else str(name),
            model_type=spec.model_type,
            num_hidden_layers=spec.num_layers,
            num_key_value_heads=spec.kv_heads,
            head_dim=spec.head_dim,
            config_sha256=spec.config_sha256,
        )

    @classmethod
    def from_config(cls, config: Any, name_or_path: str | None = None) -> ModelFingerprint:
        """Fingerprint of a transformers config (or model); multimodal configs give their text part's."""
        return cls.from_spec(ModelSpec.from_config(config), name_or_path)

    def differences(self, other: ModelFingerprint) -> list[tuple[str, Any, Any]]:
        """``(field, this value, other value)`` for every compared field that differs."""
        return [
            (f, getattr(self, f), getattr(other, f))
            for f in self.COMPARED
            if getattr(self, f) != getattr(other, f)
        ]

    def matches(self, other: ModelFingerprint) -> bool:
        """Whether both fingerprints describe the same model (``name_or_path`` aside)."""
        return not self.differences(other)


# ---- YAML --------------------------------------------------------------------------------------
# Never fold long strings (paths, notes) over several lines: one value, one line, easy diffs.
_NO_WRAP = 1_000_000


class _FlowDict(dict):
    """A mapping written on one line (``{t: 0.6, gamma: 0.05}``)."""


class _Dumper(yaml.SafeDumper):
    """Safe dumper with DESIGN.md §4's layout: short settings and layer lists on one line."""

    def represent_list(self, data):  # lists of scalars (layers, per-head numbers) on one line
        flow = all(d is None or isinstance(d, (str, int, float, bool)) for d in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    def increase_indent(self, flow=False, indentless=False):
        # Indent list items under their key (`groups:\n  - layers: ...`), the common YAML style.
        return super().increase_indent(flow, False)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(
    _FlowDict, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
)


def _sorted_plain(value: Any) -> Any:
    # Free-form calibration data is written with sorted keys: equal dicts built in different
    # orders must give the same bytes.
    if isinstance(value, dict):
        return {k: _sorted_plain(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_plain(v) for v in value]
    return value


# ---- the profile -------------------------------------------------------------------------------
_TOP_KEYS = (
    "format_version", "producer", "model", "defaults", "groups", "calibration", "tensors", "quantization"
)
_QUANT_KEYS = ("scheme", "bits", "group_size", "residual_length", "value_bits", "sink_tokens", "pre_rope_keys",
               "window_bits", "scale_bits", "key_rounding")
_TENSORS_KEYS = ("file", "sha256")
_PRODUCER_KEYS = ("name", "version")
_MODEL_KEYS = tuple(f.name for f in fields(ModelFingerprint))
_DEFAULTS_KEYS = tuple(f.name for f in fields(Defaults))
_GROUP_KEYS = ("layers", "keys", "values")
# Format 1: SLERP's parameters and the shared settings side by side, `method` only when not SLERP.
_V1_DEFAULTS_KEYS = ("t", *_DEFAULTS_KEYS)
_V1_SETTINGS_KEYS = ("t", "gamma", "retention", "sink_tokens", "align", "weights", "method")


@dataclass
class MergeProfile:
    """Which layers MiniCache merges, with which methods and settings, for which model.

    Attributes
    ----------
    groups : tuple of MergeGroup
        Groups of consecutive layers merged together; a layer belongs to at most one group.
        No groups = the full cache.
    defaults : Defaults
        Merge schedule (residual window, block size) and the shared settings groups inherit in YAML.
    model : ModelFingerprint or None
        The model the profile was made for; checked by :meth:`check_model`. None accepts any
        model whose layers fit.
    calibration : dict or None
        Provenance and measured quality (free-form YAML-safe plain data); None for presets.
    producer : dict
        ``{"name": ..., "version": ...}`` of the program that wrote the profile.
    format_version : int
        Version of the file format it is written in (:data:`FORMAT_VERSION`; older files are
        upgraded when read).
    tensors : ProfileTensors or None
        Tensors of the sidecar (:mod:`minicache.sidecar`) that the groups' methods need, named
        ``<local>.<first>-<last>.<keys|values>`` and validated by each method. None when no group
        needs any.
    quantization : Quantization or None
        Integer storage of the cache; None keeps every tensor in the model dtype.
    """

    groups: tuple[MergeGroup, ...] = ()
    defaults: Defaults = field(default_factory=Defaults)
    model: ModelFingerprint | None = None
    calibration: dict | None = None
    producer: dict = field(default_factory=_default_producer)
    format_version: int = FORMAT_VERSION
    tensors: Any = None
    quantization: Quantization | None = None
    # Name of the preset that built this profile, for describe(); not saved, not compared.
    _preset: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_format_version(self.format_version)
        self.format_version = FORMAT_VERSION

        producer = check_keys(self.producer, "producer", _PRODUCER_KEYS, required=_PRODUCER_KEYS)
        self.producer = {k: check_str(producer[k], f"producer.{k}") for k in _PRODUCER_KEYS}

        check_instance(self.defaults, Defaults, "defaults")
        if self.model is not None:
            check_instance(self.model, ModelFingerprint, "model")
        if self.quantization is not None:
            check_instance(self.quantization, Quantization, "quantization")
            if self.model is not None:
                self.quantization.check_shape(self.model.head_dim, self.model.num_hidden_layers)
        if self.calibration is not None:
            if not isinstance(self.calibration, Mapping):
                raise ProfileError(
                    f"{show(self.calibration)} is a {type_name(self.calibration)}; allowed: a mapping or null",
                    "calibration",
                )
            self.calibration = plain(self.calibration, "calibration")

        groups = self.groups
        if isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, Sequence):
            raise ProfileError(f"{show(groups)} is a {type_name(groups)}; allowed: a list of groups", "groups")
        owner: dict[int, int] = {}
        for i, group in enumerate(groups):
            check_instance(group, MergeGroup, f"groups[{i}]")
            for layer in group.layers:
                if layer in owner:
                    j = owner[layer]
                    raise ProfileError(
                        f"{list(group.layers)} overlaps groups[{j}] ({list(groups[j].layers)}) "
                        f"at layer {layer}; allowed: each layer in at most one group",
                        f"groups[{i}].layers",
                    )
                owner[layer] = i
        self.groups = tuple(groups)
        if self.quantization is not None:
            _check_group_widths(self.quantization, self.groups)
        if self.tensors is not None and not isinstance(self.tensors, _profile_tensors_class()):
            self.tensors = _profile_tensors_class()(self.tensors)
        if self.tensors is not None and not len(self.tensors):
            self.tensors = None
        self._check_tensors()

    def _check_tensors(self) -> None:
        """Every tensor a group's method needs is in the sidecar and valid; nothing else is."""
        needed = set()
        shape = None if self.model is None else (self.model.num_key_value_heads, self.model.head_dim)
        for i, group in enumerate(self.groups):
            for component, settings in group.components():
                for local in settings.tensor_names:
                    name = _tensor_name(local, group.label, component)
                    needed.add(name)
                    path = f"groups[{i}].{component}"
                    tensor = None if self.tensors is None else self.tensors.get(name)
                    if tensor is None:
                        where = "no tensors sidecar was loaded with this profile" if self.tensors is None else (
                            f"the tensors sidecar has no {name!r}")
                        raise ProfileError(
                            f"{settings.method} needs the tensor {name!r}, but {where}; allowed: the profile and "
                            "the sidecar it names side by side (MergeProfile.load reads both; minicache-calibrate "
                            "writes both)",
                            path,
                        )
                    settings.merge_method.check_tensor(
                        settings.params, local, tensor, len(group.layers), shape, path, name
                    )
                if settings.tensor_names:
                    settings.merge_method.check_tensor_set(
                        settings.params, self.tensors_of(group, component), len(group.layers), shape, path
                    )
        if self.quantization is not None and self.quantization.key_rounding == "queries":
            needed.add(KEY_WEIGHTS_TENSOR)
            tensor = None if self.tensors is None else self.tensors.get(KEY_WEIGHTS_TENSOR)
            if tensor is None:
                raise ProfileError(
                    f"key_rounding queries needs the tensor {KEY_WEIGHTS_TENSOR!r} (per-channel query energies, "
                    "written by minicache-calibrate), but the profile has none; allowed: key_rounding nearest, or "
                    "the profile and its sidecar side by side", "quantization.key_rounding")
            _check_key_weights(tensor, self.model)
        if self.tensors is not None:
            extra = sorted(set(self.tensors.names()) - needed)
            if extra:
                raise ProfileError(
                    f"the sidecar holds {extra[0]!r}, which no group uses; allowed: only the tensors this "
                    "profile's groups need (was the sidecar written for another profile?)",
                    "tensors",
                )

    # -- tensors -------------------------------------------------------------------------------
    def tensors_of(self, group: MergeGroup, component: str) -> dict[str, Any]:
        """``{local name: tensor}`` that one group's component needs (empty for most methods)."""
        settings = getattr(group, component)
        return {
            local: self.tensors[_tensor_name(local, group.label, component)] for local in settings.tensor_names
        }

    def key_weights(self, layer: int):
        """``[KV heads, head_dim]`` float32 query energies that layer ``layer``'s keys are rounded by
        (:attr:`Quantization.key_rounding` ``queries``), or None (nearest rounding)."""
        if self.quantization is None or self.quantization.key_rounding != "queries":
            return None
        return self.tensors[KEY_WEIGHTS_TENSOR][layer]

    @property
    def uses_tensors(self) -> bool:
        """Whether any group needs sidecar tensors (e.g. aligned SLERP)."""
        return any(s.tensor_names for g in self.groups for _, s in g.components())

    def with_quantization(self, quantization: Quantization | None) -> MergeProfile:
        """A copy of this profile with integer storage ``quantization`` (None: model dtype)."""
        if quantization is not None:
            check_instance(quantization, Quantization, "quantization")
            if self.model is not None:
                quantization.check_shape(self.model.head_dim, self.model.num_hidden_layers)
            _check_group_widths(quantization, self.groups)
        out = copy.copy(self)
        out.quantization = quantization
        # the key weights stay while the new storage rounds by them, and go with the storage that does
        tensors = {} if self.tensors is None else {name: self.tensors[name] for name in self.tensors.names()}
        if quantization is None or quantization.key_rounding != "queries":
            tensors.pop(KEY_WEIGHTS_TENSOR, None)
        out.tensors = _profile_tensors_class()(tensors) if tensors else None
        out._check_tensors()
        return out

    # -- queries ---------------------------------------------------------------------------------
    @property
    def merged_layers(self) -> set[int]:
        """Every layer that belongs to a group."""
        return {layer for group in self.groups for layer in group.layers}

    def group_of(self, layer_idx: int) -> tuple[MergeGroup, int] | None:
        """``(group, position of the layer inside the group)``, or None when the layer is not merged."""
        for group in self.groups:
            if layer_idx in group.layers:
                return group, group.layers.index(layer_idx)
        return None

    def describe(self) -> str:
        """One line for people and CLIs.

        E.g. ``"paper preset: 7 groups [15-16, 17-18, ...] of 30 layers; t 0.6, gamma 0.05, ..."``.
        """
        method = (self.calibration or {}).get("method")
        if self._preset:
            origin = f"{self._preset} preset: "
        elif isinstance(method, str) and method.startswith("preset:"):
            origin = f"{method.split(':', 1)[1]} preset (calibrated): "
        elif self.calibration is not None:
            origin = "calibrated: "
        else:
            origin = ""
        of = f" of {self.model.num_hidden_layers} layers" if self.model else ""
        quant = f"; {self.quantization.describe()}" if self.quantization is not None else ""
        if not self.groups:
            return f"{origin}no groups: full cache{of}{quant}"
        n = len(self.groups)
        text = f"{origin}{n} group{'s' if n != 1 else ''} [{', '.join(g.label for g in self.groups)}]{of}"
        settings = {s for g in self.groups for s in (g.keys, g.values)}
        if len(settings) == 1:
            (s,) = settings
            text += f"; {s.summary()}"
        else:
            text += "; per-group settings"
        d = self.defaults
        return text + f"; residual {d.residual_length}, block {d.block_size}{quant}"

    def __repr__(self) -> str:
        return f"MergeProfile({self.describe()})"

    # -- model checks ----------------------------------------------------------------------------
    def check_model(self, config: Any, allow_mismatch: bool = False) -> None:
        """Check that this profile fits a model.

        Parameters
        ----------
        config : transformers.PretrainedConfig or ModelSpec
            The model's config (a model, or a multimodal config, is reduced to its text config).
        allow_mismatch : bool
            Downgrade a fingerprint mismatch (profile made for another model) to a
            :class:`ModelMismatchWarning`. Layers out of range and groups mixing attention types,
            rotary settings or KV shapes always raise: they cannot work.

        Raises
        ------
        ProfileError
            Naming the group or fingerprint field at fault and what is allowed.
        """
        spec = ModelSpec.from_config(config)
        if self.model is not None:
            diffs = self.model.differences(ModelFingerprint.from_spec(spec))
            if diffs:
                listed = "; ".join(f"{name}: profile {want!r}, model {got!r}" for name, want, got in diffs)
                made_for = f" ({self.model.name_or_path})" if self.model.name_or_path else ""
                if not allow_mismatch:
                    raise ProfileError(
                        f"this profile was made for another model{made_for}: {listed}; allowed: the same model, "
                        "or pass allow_mismatch=True (command line: --allow-model-mismatch) to use it anyway",
                        "model",
                    )
                warnings.warn(
                    f"model: this profile was made for another model{made_for}: {listed}; used anyway, as "
                    "allow_mismatch=True (--allow-model-mismatch) asks",
                    ModelMismatchWarning,
                    stacklevel=2,
                )

        n = spec.num_layers
        if self.quantization is not None:
            for head_dim in sorted({layer.head_dim for layer in spec.layers}):
                self.quantization.check_shape(head_dim, n)
        for i, group in enumerate(self.groups):
            for layer in group.layers:
                if layer >= n:
                    raise ProfileError(
                        f"layer {layer} out of range; allowed: 0..{n - 1} for this model (num_hidden_layers={n})",
                        f"groups[{i}].layers",
                    )
        if not self.groups:
            return
        # Why each must agree: one shared store is attended by every member layer, and post-RoPE
        # keys merge exactly only when both layers rotate them the same way (DESIGN.md §2).
        attend = "a merged cache is attended the same way by every layer of its group"
        checks = (
            ("attention type", lambda s: s.attention_type, repr, attend),
            ("sliding window", lambda s: s.window, repr, attend),
            ("rotary settings", lambda s: s.rope, format_rope, "post-RoPE keys merge exactly only under the same "
             "rotation"),
            ("KV shape (num_key_value_heads, head_dim)", lambda s: s.kv_shape, repr, "a merged cache has one shape"),
        )
        for i, group in enumerate(self.groups):
            for component, settings in group.components():
                for local in settings.tensor_names:
                    name = _tensor_name(local, group.label, component)
                    settings.merge_method.check_tensor(
                        settings.params, local, self.tensors[name], len(group.layers),
                        spec.kv_shape(group.layers[0]), f"groups[{i}].{component}", name,
                    )
                if settings.tensor_names:
                    settings.merge_method.check_tensor_set(
                        settings.params, self.tensors_of(group, component), len(group.layers),
                        spec.kv_shape(group.layers[0]), f"groups[{i}].{component}",
                    )
            first = spec.layers[group.layers[0]]
            for layer in group.layers[1:]:
                other = spec.layers[layer]
                for what, get, fmt, why in checks:
                    if get(other) != get(first):
                        raise ProfileError(
                            f"{list(group.layers)}: layers {group.layers[0]} and {layer} differ in {what} "
                            f"({fmt(get(first))} vs {fmt(get(other))}); allowed: layers with the same {what} in "
                            f"one group ({why})",
                            f"groups[{i}].layers",
                        )

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(
        cls,
        name: str,
        config: Any,
        t: float = 0.6,
        gamma: float = 0.05,
        start: int | None = None,
        method: str = DEFAULT_METHOD,
        **default_overrides: Any,
    ) -> MergeProfile:
        """A built-in profile for the model of ``config``.

        Parameters
        ----------
        name : str
            ``"paper"``: the paper's layout, pairs ``(S, S+1), (S+2, S+3), ...`` from ``S = L // 2``
            while a pair fits. ``"none"``: no groups (the full-cache baseline).
        config : transformers.PretrainedConfig or ModelSpec
            The model's config; the profile gets its fingerprint.
        t, gamma : float
            Weight of the deeper layer (SLERP's ``t``) and retention fraction of every group.
        start : int, optional
            First layer ``S`` of the paper layout (default ``num_hidden_layers // 2``).
        method : str
            Merge method of every group (its parameters take ``t``); ``"average"`` with ``t=0.5`` is
            the paper's averaging baseline.
        **default_overrides
            Other :class:`Defaults` fields (``residual_length``, ``block_size``, ``sink_tokens``,
            ``retention``).

        Raises
        ------
        ProfileError
            Unknown preset, bad settings, or a layout that does not fit the model (e.g. the paper's
            pairs on a model that alternates sliding and full attention layers).
        """
        if name not in PRESETS:
            allowed = ", ".join(repr(p) for p in PRESETS)
            raise ProfileError(f"{show(name)} is not a known preset; allowed: one of {allowed}", "preset")
        unknown = sorted(set(default_overrides) - set(_DEFAULTS_KEYS))
        if unknown:
            others = ", ".join(k for k in _DEFAULTS_KEYS if k != "gamma")
            raise ProfileError(f"unknown setting {unknown[0]!r}; allowed: {others}", f"defaults.{unknown[0]}")
        defaults = build(Defaults, "defaults", {"gamma": gamma, **default_overrides})
        spec = ModelSpec.from_config(config)
        n = spec.num_layers
        if name == "none":
            if start is not None:
                raise ProfileError(f"{show(start)} given; allowed: no start layer for the 'none' preset", "start")
            groups: tuple[MergeGroup, ...] = ()
        else:
            if start is None:
                start = n // 2
            if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start <= n - 2:
                raise ProfileError(
                    f"{show(start)} leaves no pair of layers; allowed: 0..{n - 2} for this model "
                    f"(num_hidden_layers={n})",
                    "start",
                )
            settings = build(MergeSettings, "", {"params": {"t": t}, "method": method, **defaults.shared()})
            groups = tuple(MergeGroup((s, s + 1), settings, settings) for s in range(int(start), n - 1, 2))
        profile = cls(groups=groups, defaults=defaults, model=ModelFingerprint.from_spec(spec))
        try:
            profile.check_model(spec)
        except ProfileError as err:
            raise ProfileError(f"the {name!r} preset does not fit this model: {err}", "preset") from None
        profile._preset = name
        return profile

    # -- plain data ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data in DESIGN.md §4's layout (format 2), every group's settings fully resolved."""
        data: dict[str, Any] = {"format_version": self.format_version, "producer": dict(self.producer)}
        if self.model is not None:
            data["model"] = asdict(self.model)
        data["defaults"] = asdict(self.defaults)
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        data["groups"] = [
            {"layers": list(g.layers), "keys": g.keys.to_dict(), "values": g.values.to_dict()} for g in self.groups
        ]
        if self.calibration is not None:
            data["calibration"] = plain(self.calibration, "calibration")
        return data

    @classmethod
    def from_dict(cls, data: Mapping, tensors: Any = None) -> MergeProfile:
        """Build a profile from plain data (parsed YAML, format 1 or 2), validating every field strictly.

        A group's ``keys``/``values`` may be omitted or partial: ``method`` defaults to SLERP, the
        method's parameters to their defaults, and the shared settings come from ``defaults``.
        ``format_version`` is required; everything else has a default. ``tensors``
        (:class:`~minicache.sidecar.ProfileTensors`) is the loaded sidecar, required when a group's
        method needs tensors; the ``tensors`` entry of ``data`` only names the file.

        Raises
        ------
        ProfileError
            Naming the path of the first bad field, the bad value and what is allowed.
        """
        data = check_keys(data, "", _TOP_KEYS, required=("format_version",))
        # Check the version first: a newer file may fail every other check for a good reason.
        fv = _check_format_version(data["format_version"])
        v1 = fv == 1

        producer = data.get("producer")
        producer = _default_producer() if producer is None else producer

        model = None
        if data.get("model") is not None:
            raw = check_keys(data["model"], "model", _MODEL_KEYS, required=_MODEL_KEYS[1:])
            model = build(ModelFingerprint, "model", {"name_or_path": None, **raw})

        raw_defaults = data.get("defaults")
        raw_defaults = {} if raw_defaults is None else dict(
            check_keys(raw_defaults, "defaults", _V1_DEFAULTS_KEYS if v1 else _DEFAULTS_KEYS))
        default_t = raw_defaults.pop("t", None)
        if default_t is not None:
            check_unit(default_t, "defaults.t")
        defaults = build(Defaults, "defaults", raw_defaults)
        quantization = None
        if data.get("quantization") is not None:
            raw_quant = dict(check_keys(data["quantization"], "quantization", _QUANT_KEYS))
            if isinstance(raw_quant.get("bits"), list):
                raw_quant["bits"] = tuple(raw_quant["bits"])
            quantization = build(Quantization, "quantization", raw_quant)
        if data.get("tensors") is not None:
            _check_tensors_entry(check_keys(data["tensors"], "tensors", _TENSORS_KEYS, required=_TENSORS_KEYS))

        raw_groups = data.get("groups")
        raw_groups = [] if raw_groups is None else raw_groups
        if not isinstance(raw_groups, list):
            raise ProfileError(f"{show(raw_groups)} is a {type_name(raw_groups)}; allowed: a list of groups", "groups")
        groups = []
        for i, raw in enumerate(raw_groups):
            path = f"groups[{i}]"
            raw = check_keys(raw, path, _GROUP_KEYS, required=("layers",))
            parts = {}
            for component in ("keys", "values"):
                given = raw.get(component)
                given = {} if given is None else given
                where = f"{path}.{component}"
                if v1:
                    given = _upgrade_v1_settings(given, where, default_t)
                parts[component] = MergeSettings.from_dict(given, where, defaults.shared())
            layers = raw["layers"]
            if not isinstance(layers, list):  # YAML gives lists; a string here is a typo like "20-21"
                raise ProfileError(
                    f"{show(layers)} is a {type_name(layers)}; allowed: {_LAYERS_ALLOWED}", f"{path}.layers"
                )
            groups.append(build(MergeGroup, path, {"layers": tuple(layers), **parts}))

        return build(
            cls,
            "",
            {
                "groups": tuple(groups),
                "defaults": defaults,
                "model": model,
                "calibration": data.get("calibration"),
                "producer": producer,
                "format_version": fv,
                "tensors": tensors,
                "quantization": quantization,
            },
        )

    def to_yaml(self, tensors_entry: Mapping | None = None) -> str:
        """The profile as YAML text; equal profiles give byte-identical text (no timestamps).

        ``tensors_entry`` (``{"file": ..., "sha256": ...}``) names the sidecar; :meth:`save`
        passes it for profiles with tensors.
        """
        data = self.to_dict()
        data["producer"] = _FlowDict(data["producer"])
        data["defaults"] = _FlowDict(data["defaults"])
        if "quantization" in data:
            data["quantization"] = _FlowDict(data["quantization"])
        for group in data["groups"]:
            group["keys"], group["values"] = _FlowDict(group["keys"]), _FlowDict(group["values"])
        if "calibration" in data:
            data["calibration"] = _sorted_plain(data["calibration"])
        if tensors_entry is not None:
            data["tensors"] = _FlowDict(_check_tensors_entry(dict(tensors_entry)))
        body = yaml.dump(
            data,
            Dumper=_Dumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=_NO_WRAP,
        )
        return "# MiniCache merge profile (arXiv 2405.14366); read it with minicache.MergeProfile.load\n" + body

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None, tensors: Any = None) -> MergeProfile:
        """Parse and validate YAML text (``yaml.safe_load`` only: a profile can never run code).

        ``tensors``: the sidecar's tensors, for profiles whose methods need some (:meth:`load`
        reads them).
        """
        data = _parse_yaml(text, source)
        try:
            return cls.from_dict(data, tensors=tensors)
        except ProfileError as err:
            raise ProfileError(err.detail, err.path, source) from None

    # -- files -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_model_dir: str | os.PathLike) -> MergeProfile:
        """Read a profile: a ``.yaml``/``.yml`` file, or a model directory holding ``minicache_config.yaml``.

        Raises
        ------
        FileNotFoundError
            No profile at that path.
        ProfileError
            The file is not a valid profile (the message starts with the file's path).
        """
        file = profile_file(path_or_model_dir)
        if file.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(
                f"{file.stat().st_size} bytes; allowed: a profile of at most {MAX_PROFILE_BYTES // 2**20} MiB",
                source=str(file),
            )
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ProfileError(
                f"not UTF-8 text ({err.reason} at byte {err.start}); allowed: a YAML file in UTF-8", source=str(file)
            ) from None
        data = _parse_yaml(text, str(file))
        tensors = _read_sidecar(file, data)
        try:
            return cls.from_dict(data, tensors=tensors)
        except ProfileError as err:
            raise ProfileError(err.detail, err.path, str(file)) from None

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
        """Write the profile atomically and return the file written.

        Parameters
        ----------
        path : str or os.PathLike
            A ``.yaml``/``.yml`` file, or a directory (created if needed) that gets
            ``minicache_config.yaml`` (e.g. a model directory).
        overwrite : bool
            Replace an existing profile. Without it an existing file is never touched.

        Raises
        ------
        FileExistsError
            The file exists and ``overwrite`` is False.

        Notes
        -----
        A profile with tensors also writes its sidecar next to the YAML, named after the sidecar's
        own SHA-256 (``minicache_config.<sha256[:16]>.tensors``), first; the YAML, which records that
        name and hash, is renamed into place last. A reader therefore sees the old profile with its
        own sidecar or the new one with its own, never a mix. After the new YAML is in place, what an
        earlier save left behind is removed: sidecars of this profile's name that no profile in the
        directory names (the replaced one's, an interrupted save's) and this profile's temporary files
        older than a minute (a killed save's; a younger one may belong to a save still running).
        """
        target = _target_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            raise FileExistsError(exists_message(target))
        entry = None
        blob = None
        if self.tensors is not None and len(self.tensors):
            from minicache.sidecar import sha256_hex

            blob = self.tensors.to_bytes()
            digest = sha256_hex(blob)
            entry = {"file": sidecar_filename(target, digest), "sha256": digest}
        text = self.to_yaml(entry)  # before any write: a profile that cannot be dumped writes nothing
        if entry is not None:
            sidecar = target.parent / entry["file"]
            if not (sidecar.is_file() and _sha256_of_file(sidecar) == entry["sha256"]):
                atomic_write(sidecar, blob, overwrite=True)  # named by its content: only ever ours
        atomic_write(target, text.encode("utf-8"), overwrite)
        _remove_leftovers(target)
        return target


def _check_group_widths(quantization: Quantization, groups: Sequence[MergeGroup]) -> None:
    """The layers of a group share one store, hence one code width."""
    for name in ("bits", "value_bits"):
        bits = getattr(quantization, name)
        if bits is None or isinstance(bits, int):
            continue
        for i, group in enumerate(groups):
            widths = {bits[layer] for layer in group.layers if layer < len(bits)}
            if len(widths) > 1:
                raise ProfileError(
                    f"{list(group.layers)} are quantized to {sorted(widths)} bits ({name}); allowed: one width "
                    "for all layers of a group (they share one store)",
                    f"groups[{i}].layers",
                )


def profile_file(path_or_model_dir: str | os.PathLike) -> pathlib.Path:
    """The profile file a path names: the path itself, or ``minicache_config.yaml`` in a directory.

    Raises
    ------
    FileNotFoundError
        Nothing there.
    """
    path = pathlib.Path(path_or_model_dir)
    if path.is_dir():
        file = path / PROFILE_FILENAME
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} is a directory without {PROFILE_FILENAME}: no MiniCache profile ships with it; "
                "pass the profile file itself, or write one with minicache-calibrate"
            )
        return file
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"no MiniCache profile at {path}: expected a .yaml file or a model directory holding {PROFILE_FILENAME}"
    )


def sidecar_filename(profile_file: str | os.PathLike, sha256: str) -> str:
    """File name of the tensors sidecar of a profile file with sidecar bytes of this SHA-256.

    ``<profile stem>.<sha256[:16]>.tensors`` in the profile's directory: named after its content, so
    saving never clobbers the sidecar an older profile names, and with an extension weight loaders
    (which pick up ``*.safetensors``) leave alone.
    """
    return f"{pathlib.Path(profile_file).stem}.{sha256[:16]}{SIDECAR_SUFFIX}"


def _target_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.suffix.lower() in (".yaml", ".yml") and not path.is_dir():
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: a profile is written to a .yaml/.yml file or into a directory")
    return path / PROFILE_FILENAME


def _named_sidecar(target: pathlib.Path) -> pathlib.Path | None:
    """The sidecar an existing profile file names (None when it names none or cannot be read)."""
    try:
        data = _parse_yaml(target.read_text(encoding="utf-8"), str(target))
        entry = _check_tensors_entry(data["tensors"])
    except Exception:  # an unreadable old profile has nothing of ours to clean up
        return None
    return target.parent / entry["file"]


def _remove_leftovers(target: pathlib.Path, stale_after_s: float = 60.0) -> None:
    """Remove what earlier saves of ``target`` left behind (see :meth:`MergeProfile.save`)."""
    import re
    import time

    directory = target.parent
    # x.yaml and x.yml share the sidecar stem: a sidecar is kept while any profile here names it.
    named = {
        sidecar.name
        for other in (*directory.glob("*.yaml"), *directory.glob("*.yml"))
        if other.is_file() and other.stat().st_size <= MAX_PROFILE_BYTES
        and (sidecar := _named_sidecar(other)) is not None
    }
    ours = re.compile(rf"{re.escape(target.stem)}\.[0-9a-f]{{16}}{re.escape(SIDECAR_SUFFIX)}")
    temporary = re.compile(rf"\.{re.escape(target.stem)}\..*\.tmp")
    now = time.time()
    for file in directory.iterdir():
        try:
            orphan = ours.fullmatch(file.name) is not None and file.name not in named
            stale = temporary.fullmatch(file.name) is not None and now - file.stat().st_mtime > stale_after_s
            if orphan or stale:
                file.unlink()
        except FileNotFoundError:  # removed meanwhile by another save
            pass


def _sha256_of_file(path: pathlib.Path) -> str:
    from minicache.sidecar import sha256_hex

    return sha256_hex(path.read_bytes())


def _tensor_name(local: str, label: str, component: str) -> str:
    from minicache.methods.base import tensor_name

    return tensor_name(local, label, component)


def _profile_tensors_class():
    from minicache.sidecar import ProfileTensors

    return ProfileTensors


def _check_format_version(value: Any) -> int:
    allowed = f"one of {list(SUPPORTED_FORMAT_VERSIONS)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProfileError(f"{show(value)} is a {type_name(value)}; allowed: {allowed}", "format_version")
    if value not in SUPPORTED_FORMAT_VERSIONS:
        newer = " (written by a newer minicache: upgrade minicache to read it)" if value > FORMAT_VERSION else ""
        raise ProfileError(f"{value} is not supported{newer}; allowed: {allowed}", "format_version")
    return int(value)


def _upgrade_v1_settings(given: Any, path: str, default_t: float | None) -> dict:
    """A format-1 component (SLERP's ``t``/``align``/``weights`` beside the shared settings, ``method``
    only when not SLERP) in format 2's layout."""
    given = dict(check_keys(given, path, _V1_SETTINGS_KEYS))
    out = {"method": given.pop("method", DEFAULT_METHOD)}
    if "t" not in given and default_t is not None:
        given["t"] = default_t
    out.update(given)
    return out


#: A profile is a few kilobytes; anything this large is not one (and is not parsed).
MAX_PROFILE_BYTES = 4 * 2**20
#: Deepest nesting of mappings and lists a profile may have (a real one needs about 5).
MAX_PROFILE_DEPTH = 32


class _ProfileLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for untrusted profiles: no anchors or aliases (an alias chain of a few hundred
    bytes expands to gigabytes), bounded nesting (no RecursionError), no duplicate keys (a second
    ``groups: []`` must not silently replace the first)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ProfileError(
                f"line {event.start_mark.line + 1}: a YAML anchor or alias; allowed: plain YAML without "
                "anchors (&) and aliases (*)"
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_PROFILE_DEPTH:
            raise ProfileError(
                f"line {event.start_mark.line + 1}: nested deeper than {MAX_PROFILE_DEPTH} levels; allowed: "
                f"at most {MAX_PROFILE_DEPTH}"
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise ProfileError(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line {first}); "
                    "allowed: each key once"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str | None) -> Any:
    if len(text) > MAX_PROFILE_BYTES:
        raise ProfileError(
            f"{len(text)} characters; allowed: a profile of at most {MAX_PROFILE_BYTES // 2**20} MiB", source=source
        )
    try:
        data = yaml.load(text, Loader=_ProfileLoader)  # a SafeLoader: never constructs Python objects
    except ProfileError as err:
        raise ProfileError(err.detail, err.path, source) from None
    except yaml.YAMLError as err:
        raise ProfileError(f"not valid YAML: {err}; allowed: a YAML mapping", source=source) from None
    if data is None:
        raise ProfileError(
            "the document is empty; allowed: a YAML mapping with format_version, groups, ...", source=source
        )
    return data


def _check_key_weights(tensor: Any, model: ModelFingerprint | None) -> None:
    """The key weights of ``key_rounding: queries``: ``[layers, KV heads, head_dim]``, finite, non-negative,
    some weight in every head."""
    import torch  # a sidecar was read, so torch is there

    path = f"tensors[{KEY_WEIGHTS_TENSOR!r}]"
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise ProfileError(f"{show(tensor)} is not a 3-d tensor; allowed: [layers, KV heads, head_dim] floats", path)
    if model is not None:
        shape = (model.num_hidden_layers, model.num_key_value_heads, model.head_dim)
        if tuple(tensor.shape) != shape:
            raise ProfileError(f"shape {list(tensor.shape)} does not fit the model; allowed: {list(shape)}", path)
    if not tensor.is_floating_point() or not bool(tensor.isfinite().all()) or bool((tensor < 0).any()) or bool(
            (tensor.sum(-1) <= 0).any()):
        raise ProfileError("the key weights must be finite, non-negative floats with some weight in every head",
                           path)


def _check_tensors_entry(entry: Mapping) -> dict:
    name = entry.get("file")
    plain_name = isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")
    if not plain_name or not (name.endswith(SIDECAR_SUFFIX) or name.endswith(".safetensors")):
        raise ProfileError(
            f"{show(name)} is not a sidecar file name; allowed: a plain file name ending in {SIDECAR_SUFFIX} "
            "(or .safetensors, format 1), in the profile's directory",
            "tensors.file",
        )
    sha = entry.get("sha256")
    if not _is_sha256(sha):
        raise ProfileError(f"{show(sha)} is not a SHA-256; allowed: 64 lowercase hex digits", "tensors.sha256")
    return {"file": name, "sha256": sha}


def _read_sidecar(file: pathlib.Path, data: Any) -> Any:
    """The sidecar named by the parsed profile at ``file`` (None when it names none), hash-checked."""
    entry = data.get("tensors") if isinstance(data, Mapping) else None
    if entry is None:
        return None
    try:
        entry = _check_tensors_entry(check_keys(entry, "tensors", _TENSORS_KEYS, required=_TENSORS_KEYS))
    except ProfileError as err:
        raise ProfileError(err.detail, err.path, str(file)) from None
    sidecar = file.parent / entry["file"]
    if not sidecar.is_file():
        raise ProfileError(
            f"names the tensors sidecar {entry['file']}, but {sidecar} does not exist; allowed: the "
            "profile and its sidecar side by side (copy both files, or re-run minicache-calibrate)",
            "tensors.file",
            str(file),
        )
    from minicache.sidecar import ProfileTensors, sha256_hex

    blob = sidecar.read_bytes()
    if sha256_hex(blob) != entry["sha256"]:
        raise ProfileError(
            f"{sidecar} does not belong to this profile (its SHA-256 differs from the one recorded); "
            "allowed: the sidecar saved together with this profile",
            "tensors.sha256",
            str(file),
        )
    return ProfileTensors.from_bytes(blob, source=str(sidecar))

