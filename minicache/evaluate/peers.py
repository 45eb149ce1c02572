"""Peers measured beside minicache: NVIDIA's kvpress presses on the same windows and scoring.

A *press* (kvpress) drops the prefix tokens it scores least useful, per layer and KV head, right
after the prefill's attention; the continuation then attends to what is left. ``minicache-eval
--compare kvpress:snapkv@0.5`` runs SnapKV with kvpress's ``compression_ratio`` 0.5 (half of the
prefix's keys and values removed) on the same windows as every other method, and counts the bytes
the cache really holds afterwards.

kvpress 0.5 pins ``transformers < 5.3``; minicache needs 5.24 or later, where attention layers
receive ``cache`` instead of ``past_key_values`` and no ``cache_position``. kvpress is therefore
installed without its dependencies (``scripts/setup.sh``), and :func:`pressed_prefill` hands its
hook the two arguments it reads, under their old names: the press's own code does the rest.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

#: Short names -> kvpress class names. Query-agnostic presses score the prefix without knowing what
#: comes next (what a cache shared by many future questions must do); the others read the prefix's
#: last queries.
PRESSES = {
    "streaming": "StreamingLLMPress",  # 4 sink tokens + the most recent ones (StreamingLLM)
    "knorm": "KnormPress",  # drops the keys of largest norm
    "snapkv": "SnapKVPress",  # attention of the prefix's last 64 queries
    "expected": "ExpectedAttentionPress",  # attention of expected future queries (query-agnostic)
    "tova": "TOVAPress",  # attention of the last query, averaged over heads
    "keydiff": "KeyDiffPress",  # keys least similar to the mean key (query-agnostic)
    "random": "RandomPress",  # random tokens: the floor any scoring must beat
}


class PeerError(RuntimeError):
    """A peer method cannot run here (kvpress missing, or a model or cache it does not support)."""


def kvpress_version() -> str | None:
    """The installed kvpress version, or None."""
    try:
        return importlib.metadata.version("kvpress")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class PressSpec:
    """One kvpress press and its compression ratio.

    Attributes
    ----------
    name : str
        A key of :data:`PRESSES` (``"snapkv"``) or a kvpress class name (``"SnapKVPress"``).
    compression_ratio : float
        kvpress's meaning: the fraction of the prefix's keys and values removed, in [0, 1).
    """

    name: str
    compression_ratio: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"kvpress compression ratio {self.compression_ratio} is not in [0, 1)")
        if self.name not in PRESSES and self.name not in PRESSES.values():
            raise ValueError(f"unknown press {self.name!r}; known: {', '.join(PRESSES)}")

    @classmethod
    def parse(cls, text: str) -> PressSpec:
        """``NAME@RATIO`` (after ``kvpress:``), e.g. ``snapkv@0.5``."""
        name, sep, ratio = text.partition("@")
        try:
            value = float(ratio)
        except ValueError:
            value = None
        if not sep or value is None:
            raise ValueError(f"kvpress method {text!r} is not NAME@RATIO (e.g. kvpress:snapkv@0.5: half of the "
                             f"prefix removed); names: {', '.join(PRESSES)}")
        return cls(name, value)

    @property
    def class_name(self) -> str:
        return PRESSES.get(self.name, self.name)

    def build(self):
        """A fresh kvpress press object.

        Raises
        ------
        PeerError
            kvpress is not installed.
        """
        try:
            import kvpress
        except ImportError as err:
            raise PeerError(
                "kvpress is not installed: `bash scripts/setup.sh` installs it (without its transformers pin)"
            ) from err
        return getattr(kvpress, self.class_name)(compression_ratio=self.compression_ratio)


def _translated_hook(hook: Callable) -> Callable:
    """Wrap a kvpress forward hook so it reads the arguments it expects from transformers ≥ 5.24's."""

    def forward_hook(module, args, kwargs, output):
        kwargs = dict(kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kwargs["past_key_values"] = cache
        if "cache_position" not in kwargs:
            # positions of this call's queries; the layer's update already holds them
            held = cache.layers[module.layer_idx].get_seq_length()
            query = kwargs["hidden_states"].shape[1]
            kwargs["cache_position"] = torch.arange(held - query, held, device=kwargs["hidden_states"].device)
        return hook(module, args, kwargs, output)

    return forward_hook


@contextmanager
def pressed_prefill(press, model) -> Iterator[None]:
    """Within this context, every forward of ``model`` that prefills a cache compresses it with ``press``.

    kvpress's own context manager registers the hooks; only the arguments they read are translated.
    """
    press.forward_hook = _translated_hook(press.forward_hook)
    try:
        with press(model):
            yield
    finally:
        del press.forward_hook  # the class's hook again


def press_cache_factory(spec: PressSpec) -> tuple[Callable, Callable]:
    """``(cache_factory, prefill_context)`` for :func:`~minicache.evaluate.quality.evaluate_profile`:
    a transformers `DynamicCache` per batch, compressed by a fresh press during the prefix's prefill."""
    spec.build()  # fails now, before any model runs, if kvpress is missing

    def factory(profile, model) -> DynamicCache:
        return DynamicCache(config=model.config)

    def prefill_context(model):
        return pressed_prefill(spec.build(), model)

    return factory, prefill_context
