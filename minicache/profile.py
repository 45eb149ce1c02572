"""Merge profiles: which layers MiniCache merges and how (schema, YAML, validation, presets, fingerprint).

A profile is plain data (DESIGN.md §4). It ships as ``minicache_config.yaml`` next to the model
weights, the way PEFT ships ``adapter_config.json``::

    format_version: 1
    producer: {name: minicache, version: 0.1.0}
    model:
      name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
      model_type: llama
      ...
    defaults: {t: 0.6, gamma: 0.05, retention: distinct, sink_tokens: 1, residual_length: 128, block_size: 64}
    groups:
    - layers: [20, 21]
      keys: {t: 0.6, gamma: 0.05, retention: distinct, sink_tokens: 1}
      values: {t: 0.6, gamma: 0.05, retention: distinct, sink_tokens: 1}
    calibration: {...}

Every field is validated when an object is built, so a bad profile fails when it is loaded, with
an error that names the field path, the bad value and what is allowed, never halfway through
generation. This module only depends on the standard library and PyYAML; transformers configs are
read duck-typed, so the runtime stays light.

Examples
--------
>>> profile = MergeProfile.preset("paper", model.config)   # S = L/2, t = 0.6, γ = 0.05
>>> profile.save("my-model/")                              # my-model/minicache_config.yaml
>>> MergeProfile.load("my-model/").check_model(model.config)
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import numbers
import os
import pathlib
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

__all__ = [
    "FORMAT_VERSION",
    "MERGE_METHODS",
    "PRESETS",
    "PROFILE_FILENAME",
    "QUANT_BITS",
    "RETENTION_RULES",
    "SUPPORTED_FORMAT_VERSIONS",
    "TENSORS_FILENAME",
    "Defaults",
    "MergeGroup",
    "MergeProfile",
    "MergeSettings",
    "ModelFingerprint",
    "ModelMismatchWarning",
    "ProfileError",
    "Quantization",
    "layer_attention_types",
    "layer_rope_signatures",
]

#: How retained tokens are chosen: "distinct" keeps the most distinct pairs (the paper's
#: reading, our default); "similar" is the literal reading found in xKV's re-implementation.
RETENTION_RULES = ("distinct", "similar")
#: How a group's vectors are merged: "slerp" (MiniCache, the default) or "average" (the paper's
#: averaging baseline: every member restored as the weighted mean vector). Mirrors
#: ``minicache.runtime.merge.MERGE_METHODS`` (this module must not import torch).
MERGE_METHODS = ("slerp", "average")
#: Version written by this code; bump it on any change that an older reader would misread.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
PROFILE_FILENAME = "minicache_config.yaml"
TENSORS_FILENAME = "minicache_tensors.safetensors"
#: Built-in profiles: "paper" = the paper's layout, "none" = no groups (the full-cache baseline).
PRESETS = ("paper", "none")
#: Integer widths of quantized KV storage (``quantization.bits``).
QUANT_BITS = (2, 4)

_UNIT = "a number in [0, 1]"
_LAYERS_ALLOWED = "a list of at least 2 strictly consecutive layer indices, e.g. [20, 21]"


def _version() -> str:
    # Not `minicache.__version__`: `minicache/__init__.py` imports this module before it sets it.
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("minicache")
    except (ImportError, PackageNotFoundError):
        return "0.1.0"


def _default_producer() -> dict:
    return {"name": "minicache", "version": _version()}


# ---- errors ------------------------------------------------------------------------------------
class ProfileError(ValueError):
    """A profile that is malformed or does not fit the model.

    The message reads ``"<path>: <problem>; allowed: <what is allowed>"``, e.g.
    ``"groups[2].keys.t: 1.5 is out of range; allowed: a number in [0, 1]"``.

    Attributes
    ----------
    path : str
        Field path inside the profile (``"groups[2].keys.t"``); empty for the whole document.
    detail : str
        The message without the path.
    source : str or None
        The file the profile was read from, when there is one.
    """

    def __init__(self, detail: str, path: str = "", source: str | None = None):
        self.path, self.detail, self.source = path, detail, source
        message = f"{path}: {detail}" if path else detail
        super().__init__(f"{source}: {message}" if source else message)

    def within(self, prefix: str) -> ProfileError:
        """The same error with its path placed under ``prefix`` (``"t"`` -> ``"groups[2].keys.t"``)."""
        if not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}"
        return ProfileError(self.detail, path, self.source)


class ModelMismatchWarning(UserWarning):
    """A profile made for another model is used anyway (``allow_mismatch=True``)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_unit(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProfileError(f"{_show(value)} is a {_type_name(value)}; allowed: {_UNIT}", path)
    if not 0.0 <= value <= 1.0:  # NaN fails this comparison too
        raise ProfileError(f"{_show(value)} is out of range; allowed: {_UNIT}", path)
    return float(value)


def _check_int(value: Any, path: str, minimum: int) -> int:
    allowed = f"an integer >= {minimum}"
    # bool is an int in Python, but `sink_tokens: true` is a typo, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProfileError(f"{_show(value)} is a {_type_name(value)}; allowed: {allowed}", path)
    if value < minimum:
        raise ProfileError(f"{_show(value)} is out of range; allowed: {allowed}", path)
    return int(value)


def _check_retention(value: Any, path: str) -> str:
    if value not in RETENTION_RULES or not isinstance(value, str):
        allowed = ", ".join(repr(r) for r in RETENTION_RULES)
        raise ProfileError(f"{_show(value)} is not a retention rule; allowed: one of {allowed}", path)
    return str(value)


def _check_method(value: Any, path: str) -> str:
    if value not in MERGE_METHODS or not isinstance(value, str):
        allowed = ", ".join(repr(m) for m in MERGE_METHODS)
        raise ProfileError(f"{_show(value)} is not a merge method; allowed: one of {allowed}", path)
    return str(value)


def _check_weights(value: Any, path: str) -> tuple[float, ...]:
    allowed = "a list of non-negative numbers summing to 1, one per layer of the group"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) < 2:
        raise ProfileError(f"{_show(value)} is not a list of weights; allowed: {allowed}", path)
    out = []
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0.0 <= w <= 1.0:
            raise ProfileError(f"{_show(w)} is not a weight; allowed: {allowed}", f"{path}[{i}]")
        out.append(float(w))
    if abs(sum(out) - 1.0) > 1e-6:
        raise ProfileError(f"{_show(value)} sums to {sum(out):g}; allowed: {allowed}", path)
    return tuple(out)


def _check_format_version(value: Any) -> int:
    allowed = f"one of {list(SUPPORTED_FORMAT_VERSIONS)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProfileError(f"{_show(value)} is a {_type_name(value)}; allowed: {allowed}", "format_version")
    if value not in SUPPORTED_FORMAT_VERSIONS:
        newer = (
            " (written by a newer minicache: upgrade minicache to read it)" if value > FORMAT_VERSION else ""
        )
        raise ProfileError(f"{value} is not supported{newer}; allowed: {allowed}", "format_version")
    return int(value)


def _check_str(value: Any, path: str, allowed: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{_show(value)} is a {_type_name(value)}; allowed: {allowed}", path)
    return value


def _check_instance(value: Any, cls: type, path: str) -> None:
    if not isinstance(value, cls):
        raise ProfileError(f"{_show(value)} is a {_type_name(value)}; allowed: a {cls.__name__}", path)


def _check_keys(data: Any, path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping:
    """``data`` as a mapping with only ``allowed`` keys and all ``required`` ones."""
    where = path or "the top level"
    if not isinstance(data, Mapping):
        raise ProfileError(
            f"{_show(data)} is a {_type_name(data)}; allowed: a mapping with keys {', '.join(allowed)}", path
        )
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            key_path = f"{path}.{key}" if path else str(key)
            raise ProfileError(
                f"unknown key {key!r}{did_you_mean}; allowed keys at {where}: {', '.join(allowed)}", key_path
            )
    for key in required:
        if key not in data:
            raise ProfileError(
                f"required key {key!r} is missing; allowed keys at {where}: {', '.join(allowed)}", path
            )
    return data


def _plain(value: Any, path: str) -> Any:
    """A copy of ``value`` as YAML-safe plain data (dict/list/str/int/float/bool/None)."""
    # Converting subclasses (NumPy scalars, str enums) here keeps `yaml.safe_dump` from failing at
    # save time, long after the value was set; tuples become lists because YAML has no tuples.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProfileError(f"key {_show(key)} is a {_type_name(key)}; allowed: string keys", path)
            out[key] = _plain(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ProfileError(
        f"{_show(value)} is a {_type_name(value)}; allowed: plain data (mappings with string keys, lists, "
        "strings, numbers, booleans, null)",
        path,
    )


# ---- schema ------------------------------------------------------------------------------------
def _validate_settings(obj: Any) -> None:
    # Shared by MergeSettings and Defaults; frozen dataclasses need object.__setattr__ to store
    # the normalised values (t given as the int 1 is stored as 1.0, so equal profiles compare equal).
    object.__setattr__(obj, "t", _check_unit(obj.t, "t"))
    object.__setattr__(obj, "gamma", _check_unit(obj.gamma, "gamma"))
    object.__setattr__(obj, "retention", _check_retention(obj.retention, "retention"))
    object.__setattr__(obj, "sink_tokens", _check_int(obj.sink_tokens, "sink_tokens", 0))


@dataclass(frozen=True)
class MergeSettings:
    """How one component (keys or values) of one group is merged.

    Attributes
    ----------
    t : float
        SLERP weight of the deeper layer, in [0, 1] (0 = the shallower layer's direction).
    gamma : float
        Retention threshold as a fraction of the range of angular distances, in [0, 1]; tokens
        with ``d >= d_max - (d_max - d_min) * gamma`` stay unmerged (``retention="distinct"``).
    retention : str
        One of :data:`RETENTION_RULES`.
    sink_tokens : int
        The first tokens of every sequence that are never merged (the BOS/sink token is the most
        divergent pair of all).
    align : bool
        Merge in a calibrated aligned frame: every member has an orthogonal matrix per KV head,
        stored in the profile's tensors sidecar (issue 7). Written to YAML only when true.
    weights : tuple of float or None
        Groups of more than two layers only: each member's weight in the shared direction
        (non-negative, summing to 1); None = uniform. Pairs use ``t``. Written only when set.
    method : str
        One of :data:`MERGE_METHODS`. ``"average"`` (the paper's baseline) restores every member
        as the weighted mean of the group's vectors, with the same weights (``t`` for a pair:
        ``t = 0.5`` is the plain average) and the same retention as SLERP. Written only when not
        ``"slerp"``, so SLERP profiles keep their layout.
    """

    t: float = 0.6
    gamma: float = 0.05
    retention: str = "distinct"
    sink_tokens: int = 1
    align: bool = False
    weights: tuple[float, ...] | None = None
    method: str = "slerp"

    def __post_init__(self) -> None:
        _validate_settings(self)
        if not isinstance(self.align, bool):
            raise ProfileError(
                f"{_show(self.align)} is a {_type_name(self.align)}; allowed: true or false", "align"
            )
        if self.weights is not None:
            object.__setattr__(self, "weights", _check_weights(self.weights, "weights"))
        object.__setattr__(self, "method", _check_method(self.method, "method"))

    def to_dict(self) -> dict:
        """Plain data; ``align``, ``weights``, ``method`` only when set (paper-style profiles keep their layout)."""
        data = {"t": self.t, "gamma": self.gamma, "retention": self.retention}
        data["sink_tokens"] = self.sink_tokens
        if self.align:
            data["align"] = True
        if self.weights is not None:
            data["weights"] = list(self.weights)
        if self.method != "slerp":
            data["method"] = self.method
        return data


@dataclass(frozen=True)
class Defaults:
    """Profile-wide settings: group settings that a group does not set, and the merge schedule.

    Attributes
    ----------
    t, gamma, retention, sink_tokens
        Inherited by every group's ``keys`` and ``values`` that do not set them (see
        :class:`MergeSettings`).
    residual_length : int
        Most recent tokens kept exact (unmerged); 0 is the paper's merge-every-step behaviour.
    block_size : int
        Tokens merged at a time out of the residual window.
    """

    t: float = 0.6
    gamma: float = 0.05
    retention: str = "distinct"
    sink_tokens: int = 1
    residual_length: int = 128
    block_size: int = 64

    def __post_init__(self) -> None:
        _validate_settings(self)
        object.__setattr__(self, "residual_length", _check_int(self.residual_length, "residual_length", 0))
        object.__setattr__(self, "block_size", _check_int(self.block_size, "block_size", 1))

    def settings(self) -> MergeSettings:
        """The :class:`MergeSettings` a group gets when it sets nothing itself."""
        return MergeSettings(
            t=self.t, gamma=self.gamma, retention=self.retention, sink_tokens=self.sink_tokens
        )


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
            raise ProfileError(
                f"{_show(layers)} is a {_type_name(layers)}; allowed: {_LAYERS_ALLOWED}", "layers"
            )
        for i, layer in enumerate(layers):
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ProfileError(
                    f"{_show(layer)} is a {_type_name(layer)}; allowed: a layer index (integer >= 0)",
                    f"layers[{i}]",
                )
            if layer < 0:
                raise ProfileError(
                    f"{layer} is negative; allowed: a layer index (integer >= 0)", f"layers[{i}]"
                )
        layers = tuple(int(layer) for layer in layers)
        if len(layers) < 2:
            raise ProfileError(
                f"{list(layers)} has fewer than 2 layers; allowed: {_LAYERS_ALLOWED}", "layers"
            )
        for a, b in itertools.pairwise(layers):
            if b != a + 1:
                raise ProfileError(
                    f"{list(layers)} is non-adjacent ({b} does not directly follow {a}); "
                    f"allowed: {_LAYERS_ALLOWED}",
                    "layers",
                )
        object.__setattr__(self, "layers", layers)
        _check_instance(self.keys, MergeSettings, "keys")
        _check_instance(self.values, MergeSettings, "values")
        for component in ("keys", "values"):
            weights = getattr(self, component).weights
            if weights is None:
                continue
            if len(layers) == 2:
                raise ProfileError(
                    f"{list(weights)} given for a pair; allowed: t for pairs, weights for groups of 3+ "
                    "layers",
                    f"{component}.weights",
                )
            if len(weights) != len(layers):
                raise ProfileError(
                    f"{len(weights)} weights for {len(layers)} layers; allowed: one weight per layer",
                    f"{component}.weights",
                )

    @property
    def label(self) -> str:
        """``"20-21"``: the first and last layer."""
        return f"{self.layers[0]}-{self.layers[-1]}"


@dataclass(frozen=True)
class Quantization:
    """KIVI-style integer storage of the cache (issue 6; DESIGN.md §3 "Quantized storage").

    Keys are quantized per channel (groups of ``group_size`` consecutive tokens), values per token
    (groups of ``min(group_size, head_dim)`` channels), asymmetrically (a scale and a zero point
    per group, fp16 for half-precision models), and packed ``8 // bits`` to a byte. Merged groups
    quantize their shared directions; magnitudes stay fp16.

    Attributes
    ----------
    bits : int
        One of :data:`QUANT_BITS`.
    group_size : int
        Tokens per key group and channels per value group (capped at ``head_dim``). Larger groups
        store fewer scales and zero points: at ``head_dim`` 64, 4 bits, bf16 and a 4,096-token
        context, quantization alone compresses 3.4x with 128 and 3.0x with 32.
    residual_length : int
        Most recent tokens of unmerged layers kept exact in the model dtype; older tokens are
        quantized ``group_size`` at a time and never re-quantized. (Merged groups keep the
        profile's ``defaults.residual_length`` exact, and quantize each merged block.)
    """

    bits: int = 4
    group_size: int = 128
    residual_length: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ProfileError(
                f"{_show(self.bits)} is not a supported width; allowed: one of {list(QUANT_BITS)}", "bits"
            )
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "group_size", _check_int(self.group_size, "group_size", 2))
        object.__setattr__(self, "residual_length", _check_int(self.residual_length, "residual_length", 0))

    def value_group(self, head_dim: int) -> int:
        """Channels per value group for a model with this ``head_dim``."""
        return min(self.group_size, head_dim)

    def describe(self) -> str:
        return f"{self.bits}-bit KV (group {self.group_size}, residual {self.residual_length})"


# ---- model configs -----------------------------------------------------------------------------
def _text_config(config: Any) -> Any:
    """The decoder's config: a model's config, and the text part of multimodal configs (Gemma 3)."""
    if not hasattr(config, "num_hidden_layers") and hasattr(config, "config"):
        config = config.config  # a model was passed
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:  # older signature without `decoder`
            return get()
    return config


def _attr(config: Any, name: str, default: Any = None) -> Any:
    try:
        value = getattr(config, name, default)
    except RuntimeError:
        # transformers' heterogeneous configs raise on reading a per-layer attribute globally.
        return default
    return default if value is None else value


def _num_layers(config: Any) -> int:
    value = _attr(config, "num_hidden_layers")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ProfileError(
            f"the model config has num_hidden_layers={value!r}; allowed: an integer >= 1", "model"
        )
    return int(value)


def _layer_configs(config: Any) -> list[Any]:
    """One config per layer: per-layer views of transformers' heterogeneous configs, else the config."""
    n = _num_layers(config)
    if _attr(config, "is_heterogeneous", False):
        view = config.per_layer_config
        return [view[i] for i in range(n)]
    return [config] * n


def _kv_shape(config: Any) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of one layer's config."""
    heads = _attr(config, "num_attention_heads")
    kv_heads = _attr(config, "num_key_value_heads") or heads  # absent = multi-head attention
    head_dim = _attr(config, "head_dim")
    if head_dim is None:  # Qwen2 and Phi-3 configs have no head_dim
        hidden = _attr(config, "hidden_size")
        head_dim = hidden // heads if hidden and heads else None
    if kv_heads is None or head_dim is None:
        raise ProfileError(
            "the model config names neither num_key_value_heads/num_attention_heads nor "
            "head_dim/hidden_size; allowed: a decoder config with attention heads",
            "model",
        )
    return int(kv_heads), int(head_dim)


def layer_attention_types(config: Any) -> list[str]:
    """Attention type of every layer, as transformers' cache sees it.

    ``config.layer_types`` when the config has it (Gemma 2/3, Qwen2, ...), else inferred per layer
    like transformers does: ``"sliding_attention"`` when a ``sliding_window`` is set (Mistral),
    ``"chunked_attention"`` with an ``attention_chunk_size``, else ``"full_attention"``.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (multimodal configs are reduced to their text part).

    Returns
    -------
    list of str
        One entry per hidden layer.
    """
    config = _text_config(config)
    n = _num_layers(config)
    try:
        # The runtime builds its cache from this function; agree with it exactly where it exists.
        from transformers.cache_utils import get_layer_types_and_kwargs

        types = list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError, TypeError):
        types = _infer_layer_types(config)
    if len(types) < n:
        raise ProfileError(
            f"config.layer_types has {len(types)} entries; allowed: one per layer ({n})", "model"
        )
    return [str(t) for t in types[:n]]


def _infer_layer_types(config: Any) -> list[str]:
    types = _attr(config, "layer_types")
    if types is None:
        types = []
        for layer in _layer_configs(config):
            if _attr(layer, "sliding_window") is not None:
                types.append("sliding_attention")
            elif _attr(layer, "attention_chunk_size") is not None:
                types.append("chunked_attention")
            else:
                types.append("full_attention")
    return list(types)


def _canonical(value: Any) -> Any:
    """JSON-ready canonical form: sorted mappings, lists, integral floats as ints."""
    # A config.json may say rope_theta 10000 where a default says 10000.0: same model, same hash.
    if isinstance(value, Mapping):
        return {
            str(k): _canonical(v)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if v is not None
        }
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    item = getattr(value, "item", None)  # 0-d tensors
    return _canonical(item()) if callable(item) else str(value)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _rope_dicts(config: Any, types: list[str]) -> list[dict | None]:
    """Canonical rotary settings of every layer (None for a layer without RoPE)."""
    layers = _layer_configs(config)
    return [_rope_dict(config, layer, i, t) for i, (layer, t) in enumerate(zip(layers, types, strict=True))]


def _rope_dict(config: Any, layer: Any, layer_idx: int, layer_type: str) -> dict | None:
    """Canonical rotary settings of one layer, or None for a layer without RoPE (NoPE)."""
    no_rope = _attr(config, "no_rope_layers")  # SmolLM3 / Llama 4: 1 = RoPE, 0 = NoPE
    if isinstance(no_rope, Sequence) and layer_idx < len(no_rope) and not no_rope[layer_idx]:
        return None
    params = _attr(layer, "rope_parameters")
    if params is None:  # transformers 4.x style
        params = dict(_attr(layer, "rope_scaling") or {})
        if _attr(layer, "rope_theta") is not None:
            params["rope_theta"] = _attr(layer, "rope_theta")
    if isinstance(params, Mapping) and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]  # keyed by layer type: Gemma 3's local vs global rope_theta
    params = dict(params) if isinstance(params, Mapping) else {"rope_parameters": params}
    for name in ("partial_rotary_factor", "rotary_dim"):
        if name not in params and _attr(layer, name) is not None:
            params[name] = _attr(layer, name)
    return _canonical(params)


def layer_rope_signatures(config: Any) -> list[tuple | None]:
    """Rotary settings of every layer, as hashable values that compare equal when RoPE is the same.

    Post-RoPE keys of two layers can only be merged exactly when both layers rotate them the same
    way (DESIGN.md §2), so a group must not span layers whose signatures differ.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config. Handles a flat ``rope_parameters`` dict, one keyed by layer type
        (Gemma 3), per-layer configs, ``partial_rotary_factor`` and ``no_rope_layers``.

    Returns
    -------
    list
        One entry per hidden layer: a tuple of sorted ``(name, value)`` pairs, or None for a layer
        without rotary embedding.
    """
    config = _text_config(config)
    types = layer_attention_types(config)
    return [None if rope is None else _freeze(rope) for rope in _rope_dicts(config, types)]


def _format_rope(signature: tuple | None) -> str:
    if signature is None:
        return "no rotary embedding (NoPE)"
    return "{" + ", ".join(f"{k}: {v}" for k, v in signature) + "}"


def _windows(config: Any, types: list[str]) -> list[int | None]:
    out = []
    for layer, layer_type in zip(_layer_configs(config), types, strict=True):
        window = None
        if layer_type != "full_attention":
            window = _attr(layer, "sliding_window") or _attr(layer, "attention_chunk_size")
        out.append(None if window is None else int(window))
    return out


def _one_or_list(values: list) -> Any:
    return values[0] if len(set(map(repr, values))) == 1 else values


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
        SHA-256 of a canonical JSON of the KV-relevant config fields: model_type, layer count,
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
            _check_str(self.name_or_path, "name_or_path", "a string or null")
        _check_str(self.model_type, "model_type")
        object.__setattr__(
            self, "num_hidden_layers", _check_int(self.num_hidden_layers, "num_hidden_layers", 1)
        )
        object.__setattr__(
            self, "num_key_value_heads", _check_int(self.num_key_value_heads, "num_key_value_heads", 1)
        )
        object.__setattr__(self, "head_dim", _check_int(self.head_dim, "head_dim", 1))
        sha = self.config_sha256
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ProfileError(
                f"{_show(sha)} is not a SHA-256; allowed: 64 lowercase hex digits", "config_sha256"
            )

    @staticmethod
    def config_fields(config: Any) -> dict:
        """The canonical KV-relevant fields of ``config`` that :attr:`config_sha256` hashes."""
        config = _text_config(config)
        layers = _layer_configs(config)
        types = layer_attention_types(config)
        shapes = [_kv_shape(layer) for layer in layers]
        return _canonical(
            {
                "model_type": _attr(config, "model_type") or type(config).__name__,
                "num_hidden_layers": len(layers),
                "num_attention_heads": _one_or_list(
                    [_attr(layer, "num_attention_heads") for layer in layers]
                ),
                "num_key_value_heads": _one_or_list([kv for kv, _ in shapes]),
                "head_dim": _one_or_list([hd for _, hd in shapes]),
                "hidden_size": _attr(config, "hidden_size"),
                "layer_types": types,
                "rope": _rope_dicts(config, types),
                "sliding_window": _windows(config, types),
            }
        )

    @classmethod
    def from_config(cls, config: Any, name_or_path: str | None = None) -> ModelFingerprint:
        """Fingerprint of a transformers config (or model).

        Parameters
        ----------
        config : transformers.PretrainedConfig
            The model's config; multimodal configs are reduced to their text part.
        name_or_path : str, optional
            Recorded for people; defaults to the config's own ``name_or_path`` when it has one.
        """
        config = _text_config(config)
        if name_or_path is None:
            name_or_path = _attr(config, "name_or_path") or None
        payload = cls.config_fields(config)
        digest = hashlib.sha256(
            json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        kv_heads, head_dim = _kv_shape(_layer_configs(config)[0])
        return cls(
            name_or_path=None if name_or_path is None else str(name_or_path),
            model_type=str(payload["model_type"]),
            num_hidden_layers=payload["num_hidden_layers"],
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            config_sha256=digest,
        )

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
_QUANT_KEYS = tuple(f.name for f in fields(Quantization))
_TENSORS_KEYS = ("file", "sha256")
_PRODUCER_KEYS = ("name", "version")
_MODEL_KEYS = tuple(f.name for f in fields(ModelFingerprint))
_DEFAULTS_KEYS = tuple(f.name for f in fields(Defaults))
_SETTINGS_KEYS = tuple(f.name for f in fields(MergeSettings))
_GROUP_KEYS = ("layers", "keys", "values")


@dataclass
class MergeProfile:
    """Which layers MiniCache merges, with which settings, for which model.

    Attributes
    ----------
    groups : tuple of MergeGroup
        Groups of consecutive layers merged together; a layer belongs to at most one group.
        No groups = the full cache.
    defaults : Defaults
        Merge schedule (residual window, block size) and the settings groups inherit in YAML.
    model : ModelFingerprint or None
        The model the profile was made for; checked by :meth:`check_model`. None accepts any
        model whose layers fit.
    calibration : dict or None
        Provenance and measured quality (free-form YAML-safe plain data); None for presets.
    producer : dict
        ``{"name": ..., "version": ...}`` of the program that wrote the profile.
    format_version : int
        Version of the file format, one of :data:`SUPPORTED_FORMAT_VERSIONS`.
    tensors : ProfileTensors or None
        Tensors of the sidecar (:mod:`minicache.sidecar`): the alignment of every component with
        ``align: true``, validated against the groups and the model fingerprint. None when no
        group is aligned.
    quantization : Quantization or None
        Integer storage of the cache (issue 6); None keeps every tensor in the model dtype.
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
        self.format_version = _check_format_version(self.format_version)

        producer = _check_keys(self.producer, "producer", _PRODUCER_KEYS, required=_PRODUCER_KEYS)
        self.producer = {k: _check_str(producer[k], f"producer.{k}") for k in _PRODUCER_KEYS}

        _check_instance(self.defaults, Defaults, "defaults")
        if self.quantization is not None:
            _check_instance(self.quantization, Quantization, "quantization")
            if self.model is not None:
                _check_quantization_shape(self.quantization, self.model.head_dim)
        if self.model is not None:
            _check_instance(self.model, ModelFingerprint, "model")
        if self.calibration is not None:
            if not isinstance(self.calibration, Mapping):
                raise ProfileError(
                    f"{_show(self.calibration)} is a {_type_name(self.calibration)}; "
                    "allowed: a mapping or null",
                    "calibration",
                )
            self.calibration = _plain(self.calibration, "calibration")

        groups = self.groups
        if isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, Sequence):
            raise ProfileError(
                f"{_show(groups)} is a {_type_name(groups)}; allowed: a list of groups", "groups"
            )
        owner: dict[int, int] = {}
        for i, group in enumerate(groups):
            _check_instance(group, MergeGroup, f"groups[{i}]")
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
        if self.tensors is not None or self.aligned:
            from minicache.sidecar import ProfileTensors, validate_profile_tensors

            if self.tensors is not None and not isinstance(self.tensors, ProfileTensors):
                self.tensors = ProfileTensors(self.tensors)
            shape = None if self.model is None else (self.model.num_key_value_heads, self.model.head_dim)
            validate_profile_tensors(self.groups, self.tensors, shape)

    @property
    def aligned(self) -> bool:
        """Whether any group merges keys or values in a calibrated aligned frame."""
        return any(g.keys.align or g.values.align for g in self.groups)

    def rotation(self, group: MergeGroup, component: str):
        """``[k, H, D, D]`` float32 alignment of one group's component, or None when it is not aligned."""
        if not getattr(group, component).align:
            return None
        from minicache.sidecar import rotation_name

        return self.tensors[rotation_name(group.label, component)]

    def with_quantization(self, quantization: Quantization | None) -> MergeProfile:
        """A copy of this profile with integer storage ``quantization`` (None: model dtype)."""
        if quantization is not None:
            _check_instance(quantization, Quantization, "quantization")
            if self.model is not None:
                _check_quantization_shape(quantization, self.model.head_dim)
        out = copy.copy(self)
        out.quantization = quantization
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
            text += f"; t {s.t:g}, gamma {s.gamma:g}, retention {s.retention}, sink {s.sink_tokens}"
            if s.method != "slerp":
                text += f", method {s.method}"
        else:
            text += "; per-group t/gamma"
        d = self.defaults
        return text + f"; residual {d.residual_length}, block {d.block_size}{quant}"

    def __repr__(self) -> str:
        return f"MergeProfile({self.describe()})"

    # -- model checks ----------------------------------------------------------------------------
    def check_model(self, config: Any, allow_mismatch: bool = False) -> None:
        """Check that this profile fits a model.

        Parameters
        ----------
        config : transformers.PretrainedConfig
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
        config = _text_config(config)
        if self.model is not None:
            actual = ModelFingerprint.from_config(config)
            diffs = self.model.differences(actual)
            if diffs:
                listed = "; ".join(f"{name}: profile {want!r}, model {got!r}" for name, want, got in diffs)
                made_for = f" ({self.model.name_or_path})" if self.model.name_or_path else ""
                detail = (
                    f"this profile was made for another model{made_for}: {listed}; allowed: the same model, "
                    "or pass allow_mismatch=True (command line: --allow-model-mismatch) to use it anyway"
                )
                if not allow_mismatch:
                    raise ProfileError(detail, "model")
                warnings.warn(f"model: {detail}", ModelMismatchWarning, stacklevel=2)

        n = _num_layers(config)
        if self.quantization is not None:
            for _, head_dim in {_kv_shape(layer) for layer in _layer_configs(config)}:
                _check_quantization_shape(self.quantization, head_dim)
        for i, group in enumerate(self.groups):
            for layer in group.layers:
                if layer >= n:
                    raise ProfileError(
                        f"layer {layer} out of range; "
                        f"allowed: 0..{n - 1} for this model (num_hidden_layers={n})",
                        f"groups[{i}].layers",
                    )
        if not self.groups:
            return
        types = layer_attention_types(config)
        ropes = layer_rope_signatures(config)
        windows = _windows(config, types)
        shapes = [_kv_shape(layer) for layer in _layer_configs(config)]
        # Why each must agree: one shared store is attended by every member layer, and post-RoPE
        # keys merge exactly only when both layers rotate them the same way (DESIGN.md §2).
        attend = "a merged cache is attended the same way by every layer of its group"
        checks = (
            ("attention type", types, repr, attend),
            ("sliding window", windows, repr, attend),
            (
                "rotary settings",
                ropes,
                _format_rope,
                "post-RoPE keys merge exactly only under the same rotation",
            ),
            ("KV shape (num_key_value_heads, head_dim)", shapes, repr, "a merged cache has one shape"),
        )
        if self.aligned:
            from minicache.sidecar import check_rotation, rotation_name

            for i, group in enumerate(self.groups):
                for component in ("keys", "values"):
                    if getattr(group, component).align:
                        name = rotation_name(group.label, component)
                        check_rotation(self.tensors[name], f"groups[{i}].{component}.align", name,
                                       len(group.layers), shapes[group.layers[0]])
        for i, group in enumerate(self.groups):
            first = group.layers[0]
            for layer in group.layers[1:]:
                for what, per_layer, fmt, why in checks:
                    if per_layer[layer] != per_layer[first]:
                        raise ProfileError(
                            f"{list(group.layers)}: layers {first} and {layer} differ in {what} "
                            f"({fmt(per_layer[first])} vs {fmt(per_layer[layer])}); allowed: layers with "
                            f"the same {what} in one group ({why})",
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
        method: str = "slerp",
        **default_overrides: Any,
    ) -> MergeProfile:
        """A built-in profile for the model of ``config``.

        Parameters
        ----------
        name : str
            ``"paper"``: the paper's layout, pairs ``(S, S+1), (S+2, S+3), ...`` from ``S = L // 2``
            while a pair fits. ``"none"``: no groups (the full-cache baseline).
        config : transformers.PretrainedConfig
            The model's config; the profile gets its fingerprint.
        t, gamma : float
            SLERP weight and retention fraction of every group.
        start : int, optional
            First layer ``S`` of the paper layout (default ``num_hidden_layers // 2``).
        method : str
            Merge method of every group, one of :data:`MERGE_METHODS`; ``"average"`` with
            ``t=0.5`` is the paper's averaging baseline.
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
            raise ProfileError(f"{_show(name)} is not a known preset; allowed: one of {allowed}", "preset")
        unknown = sorted(set(default_overrides) - set(_DEFAULTS_KEYS))
        if unknown:
            others = ", ".join(k for k in _DEFAULTS_KEYS if k not in ("t", "gamma"))
            raise ProfileError(
                f"unknown setting {unknown[0]!r}; allowed: {others}",
                f"defaults.{unknown[0]}",
            )
        try:
            defaults = Defaults(t=t, gamma=gamma, **default_overrides)
        except ProfileError as err:
            raise err.within("defaults") from None
        config = _text_config(config)
        n = _num_layers(config)
        if name == "none":
            if start is not None:
                raise ProfileError(
                    f"{_show(start)} given; allowed: no start layer for the 'none' preset", "start"
                )
            groups: tuple[MergeGroup, ...] = ()
        else:
            if start is None:
                start = n // 2
            if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start <= n - 2:
                raise ProfileError(
                    f"{_show(start)} leaves no pair of layers; "
                    f"allowed: 0..{n - 2} for this model (num_hidden_layers={n})",
                    "start",
                )
            settings = replace(defaults.settings(), method=method)  # a bad method names the path "method"
            groups = tuple(MergeGroup((s, s + 1), settings, settings) for s in range(int(start), n - 1, 2))
        profile = cls(groups=groups, defaults=defaults, model=ModelFingerprint.from_config(config))
        try:
            profile.check_model(config)
        except ProfileError as err:
            raise ProfileError(f"the {name!r} preset does not fit this model: {err}", "preset") from None
        profile._preset = name
        return profile

    # -- plain data ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data in DESIGN.md §4's layout, every group's settings fully resolved."""
        data: dict[str, Any] = {"format_version": self.format_version, "producer": dict(self.producer)}
        if self.model is not None:
            data["model"] = asdict(self.model)
        data["defaults"] = asdict(self.defaults)
        if self.quantization is not None:
            data["quantization"] = asdict(self.quantization)
        data["groups"] = [
            {"layers": list(g.layers), "keys": g.keys.to_dict(), "values": g.values.to_dict()}
            for g in self.groups
        ]
        if self.calibration is not None:
            data["calibration"] = _plain(self.calibration, "calibration")
        return data

    @classmethod
    def from_dict(cls, data: Mapping, tensors: Any = None) -> MergeProfile:
        """Build a profile from plain data (parsed YAML), validating every field strictly.

        A group's ``keys``/``values`` may be omitted or partial: missing fields come from
        ``defaults``. ``format_version`` is required; everything else has a default.
        ``tensors`` (:class:`~minicache.sidecar.ProfileTensors`) is the loaded sidecar, required
        when a group is aligned; the ``tensors`` entry of ``data`` only names the file.

        Raises
        ------
        ProfileError
            Naming the path of the first bad field, the bad value and what is allowed.
        """
        data = _check_keys(data, "", _TOP_KEYS, required=("format_version",))
        # Check the version first: a newer file may fail every other check for a good reason.
        fv = _check_format_version(data["format_version"])

        producer = data.get("producer")
        producer = _default_producer() if producer is None else producer

        model = None
        if data.get("model") is not None:
            raw = _check_keys(data["model"], "model", _MODEL_KEYS, required=_MODEL_KEYS[1:])
            model = _build(ModelFingerprint, "model", {"name_or_path": None, **raw})

        raw_defaults = data.get("defaults")
        raw_defaults = {} if raw_defaults is None else _check_keys(raw_defaults, "defaults", _DEFAULTS_KEYS)
        defaults = _build(Defaults, "defaults", raw_defaults)
        inherited = defaults.settings().to_dict()
        quantization = None
        if data.get("quantization") is not None:
            raw_quant = _check_keys(data["quantization"], "quantization", _QUANT_KEYS)
            quantization = _build(Quantization, "quantization", dict(raw_quant))
        if data.get("tensors") is not None:
            entry = _check_keys(data["tensors"], "tensors", _TENSORS_KEYS, required=_TENSORS_KEYS)
            _check_tensors_entry(entry)

        raw_groups = data.get("groups")
        raw_groups = [] if raw_groups is None else raw_groups
        if not isinstance(raw_groups, list):
            raise ProfileError(
                f"{_show(raw_groups)} is a {_type_name(raw_groups)}; allowed: a list of groups", "groups"
            )
        groups = []
        for i, raw in enumerate(raw_groups):
            path = f"groups[{i}]"
            raw = _check_keys(raw, path, _GROUP_KEYS, required=("layers",))
            parts = {}
            for component in ("keys", "values"):
                given = raw.get(component)
                given = {} if given is None else _check_keys(given, f"{path}.{component}", _SETTINGS_KEYS)
                given = dict(given)
                if isinstance(given.get("weights"), list):
                    given["weights"] = tuple(given["weights"])
                parts[component] = _build(MergeSettings, f"{path}.{component}", {**inherited, **given})
            layers = raw["layers"]
            if not isinstance(layers, list):  # YAML gives lists; a string here is a typo like "20-21"
                raise ProfileError(
                    f"{_show(layers)} is a {_type_name(layers)}; allowed: {_LAYERS_ALLOWED}", f"{path}.layers"
                )
            groups.append(_build(MergeGroup, path, {"layers": tuple(layers), **parts}))

        return _build(
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
        if tensors_entry is not None:
            data["tensors"] = _FlowDict(_check_tensors_entry(dict(tensors_entry)))
        data["producer"] = _FlowDict(data["producer"])
        data["defaults"] = _FlowDict(data["defaults"])
        if "quantization" in data:
            data["quantization"] = _FlowDict(data["quantization"])
        for group in data["groups"]:
            group["keys"], group["values"] = _FlowDict(group["keys"]), _FlowDict(group["values"])
        if "calibration" in data:
            data["calibration"] = _sorted_plain(data["calibration"])
        body = yaml.dump(
            data,
            Dumper=_Dumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=_NO_WRAP,
        )
        return (
            "# MiniCache merge profile (arXiv 2405.14366); read it with minicache.MergeProfile.load\n" + body
        )

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None, tensors: Any = None) -> MergeProfile:
        """Parse and validate YAML text (``yaml.safe_load`` only: a profile can never run code).

        ``tensors``: the sidecar's tensors, for aligned profiles (:meth:`load` reads them).
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ProfileError(f"not valid YAML: {err}; allowed: a YAML mapping", source=source) from None
        if data is None:
            raise ProfileError(
                "the document is empty; allowed: a YAML mapping with format_version, groups, ...",
                source=source,
            )
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
        path = pathlib.Path(path_or_model_dir)
        if path.is_dir():
            file = path / PROFILE_FILENAME
            if not file.is_file():
                raise FileNotFoundError(
                    f"{path} is a directory without {PROFILE_FILENAME}: no MiniCache profile ships with it; "
                    "pass the profile file itself, or write one with minicache-calibrate"
                )
        elif path.is_file():
            file = path
        else:
            raise FileNotFoundError(
                f"no MiniCache profile at {path}: expected a .yaml file or a model directory "
                f"holding {PROFILE_FILENAME}"
            )
        text = file.read_text(encoding="utf-8")
        return cls.from_yaml(text, source=str(file), tensors=_read_sidecar(file, text))

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
        A profile with tensors also writes its sidecar next to the YAML
        (``minicache_tensors.safetensors`` beside ``minicache_config.yaml``, ``<name>.safetensors``
        beside any other ``<name>.yaml``). The sidecar is renamed into place first and the YAML,
        which records the sidecar's SHA-256, last: a reader sees the old profile, the new one, or
        (after a crash between the renames) an old YAML whose recorded hash no longer matches,
        which :meth:`load` refuses with a clear error.
        """
        path = pathlib.Path(path)
        if path.suffix.lower() in (".yaml", ".yml") and not path.is_dir():
            target = path
        elif path.exists() and not path.is_dir():
            raise ValueError(f"{path}: a profile is written to a .yaml/.yml file or into a directory")
        else:
            target = path / PROFILE_FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            raise FileExistsError(_exists_message(target))
        entry = None
        if self.tensors is not None and len(self.tensors):
            from minicache.sidecar import sha256_hex

            blob = self.tensors.to_bytes()
            sidecar = target.parent / sidecar_filename(target)
            if sidecar.exists() and not overwrite:
                raise FileExistsError(_exists_message(sidecar))
            entry = {"file": sidecar.name, "sha256": sha256_hex(blob)}
            text = self.to_yaml(entry)  # before any write: a profile that cannot be dumped writes nothing
            atomic_write(sidecar, blob, overwrite)
        else:
            text = self.to_yaml()
        atomic_write(target, text.encode("utf-8"), overwrite)
        return target


def _check_quantization_shape(quantization: Quantization, head_dim: int) -> None:
    """Values are grouped along head_dim and packed along it: both must divide it evenly."""
    group = quantization.value_group(head_dim)
    if head_dim % group:
        raise ProfileError(
            f"{quantization.group_size} does not divide head_dim {head_dim} into whole value groups; "
            f"allowed: a divisor of {head_dim}, or a multiple of it",
            "quantization.group_size",
        )
    if (head_dim * quantization.bits) % 8:
        raise ProfileError(
            f"{quantization.bits} bits do not pack head_dim {head_dim} into whole bytes; "
            "allowed: a width whose packed head vector fills whole bytes",
            "quantization.bits",
        )


def sidecar_filename(profile_file: str | os.PathLike) -> str:
    """File name of the tensors sidecar of a profile file (same directory)."""
    profile_file = pathlib.Path(profile_file)
    if profile_file.name == PROFILE_FILENAME:
        return TENSORS_FILENAME
    return profile_file.stem + ".safetensors"


def _check_tensors_entry(entry: Mapping) -> dict:
    name = entry.get("file")
    plain = isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")
    if not plain or not name.endswith(".safetensors"):
        raise ProfileError(
            f"{_show(name)} is not a sidecar file name; allowed: a plain file name ending in .safetensors, "
            "in the profile's directory",
            "tensors.file",
        )
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ProfileError(
            f"{_show(sha)} is not a SHA-256; allowed: 64 lowercase hex digits", "tensors.sha256"
        )
    return {"file": name, "sha256": sha}


def _read_sidecar(file: pathlib.Path, text: str) -> Any:
    """The sidecar named by the profile at ``file`` (None when it names none), hash-checked."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # from_yaml reports it
    entry = data.get("tensors") if isinstance(data, Mapping) else None
    if entry is None:
        return None
    try:
        entry = _check_tensors_entry(_check_keys(entry, "tensors", _TENSORS_KEYS, required=_TENSORS_KEYS))
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


def atomic_write(target: pathlib.Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``target`` all at once or not at all (readable by others, like any shipped file)."""
    # Temp file in the same directory: os.replace/os.link are atomic only within one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shipped profile must be readable
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_no_clobber(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _exists_message(target: pathlib.Path) -> str:
    return f"{target} exists; refusing to overwrite it (pass overwrite=True, or --force on the command line)"


def _link_no_clobber(tmp: pathlib.Path, target: pathlib.Path) -> None:
    # A hard link fails if the target appeared since our check, so a concurrent writer is never
    # clobbered; file systems without hard links fall back to check-then-replace.
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(_exists_message(target)) from None
    except OSError:
        if target.exists():
            raise FileExistsError(_exists_message(target)) from None
        os.replace(tmp, target)


def _build(cls: type, path: str, kwargs: dict) -> Any:
    """``cls(**kwargs)`` with validation errors placed under ``path``."""
    try:
        return cls(**kwargs)
    except ProfileError as err:
        raise (err.within(path) if path else err) from None
