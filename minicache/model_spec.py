"""What minicache needs to know about a model, read from its config in one place.

:class:`ModelSpec` is the only code in minicache that reads a transformers config's attributes:
per-layer KV shape, attention type, rotary settings and sliding window, the model's fingerprint
(the hash a profile records), and a few sizes (positions, vocabulary). The runtime, calibration,
evaluation and benchmarks ask a spec instead of reading ``config.num_key_value_heads`` themselves,
so a new architecture whose config names things differently is one change here.

Configs are read duck-typed (standard library only; transformers' own layer-type rule is used when
transformers is importable), so profiles validate without torch.

Examples
--------
>>> spec = ModelSpec.from_config(model.config)   # or ModelSpec.from_config(model)
>>> spec.num_layers, spec.kv_shape(0)
(30, (3, 64))
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from minicache.validation import ProfileError

__all__ = ["MODEL_SHAPES", "LayerSpec", "ModelSpec", "format_rope"]


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as the KV cache sees it.

    Attributes
    ----------
    kv_heads, head_dim : int
        Shape of one token's keys (and values): ``[kv_heads, head_dim]``.
    attention_type : str
        ``"full_attention"``, ``"sliding_attention"``, ``"chunked_attention"``, ... (transformers' names).
    rope : tuple or None
        Canonical rotary settings as sorted ``(name, value)`` pairs; None for a layer without RoPE.
        Equal tuples mean the same rotation.
    window : int or None
        Sliding window or attention chunk of a non-full layer.
    num_attention_heads : int or None
        Query heads.
    """

    kv_heads: int
    head_dim: int
    attention_type: str
    rope: tuple | None
    window: int | None
    num_attention_heads: int | None = None

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.kv_heads, self.head_dim


@dataclass(frozen=True)
class ModelSpec:
    """A model's KV-relevant structure (see the module docstring).

    Attributes
    ----------
    model_type : str
        ``config.model_type`` (or the config class name).
    layers : tuple of LayerSpec
        One per hidden layer.
    name_or_path : str or None
        For people (profiles record it); not part of the fingerprint.
    hidden_size, max_positions, vocab_size : int or None
    config_sha256 : str
        SHA-256 of :attr:`fingerprint_json`, the canonical JSON of the KV-relevant fields.
    fingerprint_json : str
        The canonical fields that :attr:`config_sha256` hashes.
    cache_layer_kwargs : tuple of dict
        Per layer, the keyword arguments transformers' own cache layer of that type takes
        (e.g. ``sliding_window``), for the layers minicache leaves to transformers.
    """

    model_type: str
    layers: tuple[LayerSpec, ...]
    name_or_path: str | None
    hidden_size: int | None
    max_positions: int | None
    vocab_size: int | None
    config_sha256: str
    fingerprint_json: str
    cache_layer_kwargs: tuple[Mapping[str, Any], ...]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config_or_model: Any) -> ModelSpec:
        """Read a transformers config (a model, or a multimodal config, is reduced to its decoder config).

        Raises
        ------
        ProfileError
            The config describes no decoder with attention heads (path ``"model"``).
        """
        if isinstance(config_or_model, ModelSpec):
            return config_or_model
        config = text_config(config_or_model)
        n = _num_layers(config)
        per_layer = _layer_configs(config, n)
        types, kwargs = _layer_types_and_kwargs(config, n)
        shapes = [_kv_shape(layer) for layer in per_layer]
        ropes = [_rope_dict(config, layer, i, t) for i, (layer, t) in enumerate(zip(per_layer, types, strict=True))]
        windows = [_window(layer, t) for layer, t in zip(per_layer, types, strict=True)]
        heads = [_attr(layer, "num_attention_heads") for layer in per_layer]
        fields = _canonical(
            {
                "model_type": _attr(config, "model_type") or type(config).__name__,
                "num_hidden_layers": n,
                "num_attention_heads": _one_or_list(heads),
                "num_key_value_heads": _one_or_list([kv for kv, _ in shapes]),
                "head_dim": _one_or_list([hd for _, hd in shapes]),
                "hidden_size": _attr(config, "hidden_size"),
                "layer_types": types,
                "rope": ropes,
                "sliding_window": windows,
            }
        )
        payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        layers = tuple(
            LayerSpec(
                kv_heads=kv,
                head_dim=hd,
                attention_type=t,
                rope=None if rope is None else _freeze(rope),
                window=window,
                num_attention_heads=None if h is None else int(h),
            )
            for (kv, hd), t, rope, window, h in zip(shapes, types, ropes, windows, heads, strict=True)
        )
        name = _attr(config, "name_or_path") or None
        return cls(
            model_type=str(fields["model_type"]),
            layers=layers,
            name_or_path=None if name is None else str(name),
            hidden_size=_int_or_none(_attr(config, "hidden_size")),
            max_positions=_int_or_none(_attr(config, "max_position_embeddings")),
            vocab_size=_int_or_none(_attr(config, "vocab_size")),
            config_sha256=hashlib.sha256(payload.encode()).hexdigest(),
            fingerprint_json=payload,
            cache_layer_kwargs=tuple(dict(k) for k in kwargs),
        )

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_shape(self, layer: int = 0) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of one layer."""
        return self.layers[layer].kv_shape

    @property
    def kv_heads(self) -> int:
        """KV heads of the first layer (the fingerprint's ``num_key_value_heads``)."""
        return self.layers[0].kv_heads

    @property
    def head_dim(self) -> int:
        """head_dim of the first layer (the fingerprint's ``head_dim``)."""
        return self.layers[0].head_dim

    @property
    def attention_types(self) -> list[str]:
        return [layer.attention_type for layer in self.layers]

    @property
    def rope_signatures(self) -> list[tuple | None]:
        return [layer.rope for layer in self.layers]

    def check_fits(self, tokens: int, what: str) -> None:
        """Refuse a run of ``tokens`` positions (``what`` names the options that add up to it) longer
        than the model's ``max_position_embeddings``; models that state none accept any length.

        Raises
        ------
        ValueError
            ``"<what> = <tokens> tokens exceeds the model's <limit> positions (max_position_embeddings)"``.
        """
        if self.max_positions is not None and tokens > self.max_positions:
            raise ValueError(
                f"{what} = {tokens} tokens exceeds the model's {self.max_positions} positions (max_position_embeddings)"
            )

    def kv_bytes_per_token(self, layer: int, element_size: int) -> int:
        """Bytes one token's keys and values take in one layer of a full cache."""
        kv_heads, head_dim = self.kv_shape(layer)
        return 2 * kv_heads * head_dim * element_size

    @property
    def fingerprint_fields(self) -> dict:
        return json.loads(self.fingerprint_json)


# ---- reading configs ---------------------------------------------------------------------------
def text_config(config: Any) -> Any:
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


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def _num_layers(config: Any) -> int:
    value = _attr(config, "num_hidden_layers")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ProfileError(
            f"the model config has num_hidden_layers={value!r}; allowed: an integer >= 1", "model"
        )
    return int(value)


def _layer_configs(config: Any, n: int) -> list[Any]:
    """One config per layer: per-layer views of transformers' heterogeneous configs, else the config."""
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


def _layer_types_and_kwargs(config: Any, n: int) -> tuple[list[str], list[dict]]:
    """Attention type of every layer and the kwargs of transformers' cache layer for it.

    transformers' own rule where it exists (the runtime builds its cache from it, so they must
    agree exactly); else ``config.layer_types``, or per layer: ``"sliding_attention"`` when a
    ``sliding_window`` is set (Mistral), ``"chunked_attention"`` with an ``attention_chunk_size``,
    else ``"full_attention"``.
    """
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        types, kwargs = list(types), [dict(k) for k in kwargs]
    except (ImportError, AttributeError, TypeError):
        types, kwargs = _infer_layer_types(config, n), []
    if len(types) < n:
        raise ProfileError(
            f"config.layer_types has {len(types)} entries; allowed: one per layer ({n})", "model"
        )
    kwargs = (kwargs + [{}] * n)[:n]
    return [str(t) for t in types[:n]], kwargs


def _infer_layer_types(config: Any, n: int) -> list[str]:
    types = _attr(config, "layer_types")
    if types is None:
        types = []
        for layer in _layer_configs(config, n):
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


def _window(layer: Any, layer_type: str) -> int | None:
    window = None
    if layer_type != "full_attention":
        window = _attr(layer, "sliding_window") or _attr(layer, "attention_chunk_size")
    return None if window is None else int(window)


def _one_or_list(values: list) -> Any:
    return values[0] if len(set(map(repr, values))) == 1 else values


def format_rope(signature: tuple | None) -> str:
    """Rotary settings for people: ``{rope_theta: 10000, ...}`` or "no rotary embedding (NoPE)"."""
    if signature is None:
        return "no rotary embedding (NoPE)"
    return "{" + ", ".join(f"{k}: {v}" for k, v in signature) + "}"


#: Llama-architecture shapes for :func:`minicache.models.random_model` (config fields only; weights are random).
#: ``tiny`` matches ``tests/tiny_configs.py``'s llama; the others are the published shapes of
#: SmolLM2-135M, Llama-2-7B and Llama-3-8B, for speed and memory measurements that need a model
#: of a given size but not its trained weights (GPU runs with no checkpoint on the machine).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
    },
    "smollm2-135m": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
    "llama2-7b": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 4096,
    },
    "llama3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
}
