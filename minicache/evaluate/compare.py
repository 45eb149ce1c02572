"""Several methods on the same data in one run: full cache, presets, baselines and profiles.

A *method* is what ``minicache-eval`` measures: a baseline (``full``: transformers'
`DynamicCache`; ``average``: the paper preset's groups merged by plain averaging, DESIGN.md §5),
a preset (``paper``), or a profile on disk. :func:`compare_quality` scores every method on the
same windows against one full-cache reference run; :func:`compare_passkey` has every method
answer the same passkey prompts. Both return plain data for JSON, and :func:`quality_markdown` /
:func:`passkey_markdown` render it as Markdown tables.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from minicache.evaluate.passkey import PasskeyMethod, accuracy_table, make_passkey_prompts, run_passkey
from minicache.evaluate.peers import PressSpec, kvpress_version, press_cache_factory
from minicache.evaluate.quality import (
    QUANTIZED_CACHE_BACKENDS,
    evaluate_profile,
    format_interval,
    full_cache_factory,
    quantized_cache_factory,
    reference_run,
)
from minicache.evaluate.tasks import TaskMethod, make_task_prompts, run_tasks, task_table
from minicache.profile import MergeProfile, ProfileError, Quantization
from minicache.runtime.cache import MiniCache

#: Built-in methods: name -> (kind, what it is).
BUILTIN_METHODS = {
    "full": ("baseline", "transformers' DynamicCache: the exact baseline"),
    "paper": ("preset", "the paper's layout: pairs from S = L/2, SLERP t 0.6, γ 0.05"),
    "average": ("baseline", "the paper preset's pairs merged by plain averaging (t 0.5), same retention"),
    "none": ("preset", "no merging: with --kv-bits, quantization alone"),
    **{
        f"quantized-cache-{backend}": ("baseline", f"transformers' QuantizedCache, {backend} backend")
        for backend in QUANTIZED_CACHE_BACKENDS
    },
}
_KINDS = ("baseline", "preset", "profile", "peer")


@dataclass(frozen=True)
class MethodSpec:
    """One method to measure, before the model is loaded.

    Attributes
    ----------
    label : str
        Name in tables and JSON (``"full"``, ``"paper"``, a profile path, or the single-run
        labels ``"baseline:full"`` / ``"preset:paper"``).
    kind : str
        ``"baseline"``, ``"preset"``, ``"profile"`` or ``"peer"`` (a kvpress press,
        ``kvpress:NAME@RATIO``).
    name : str
        The baseline or preset name, or the profile's path.
    profile : MergeProfile or None
        The loaded profile (kind ``"profile"`` only): loading it validates it early.
    quantization : Quantization or None
        ``--kv-bits``: MiniCache methods store their cache quantized (issue 6); transformers'
        grouped `QuantizedCache` baselines take its bits and group size. Ignored by ``full``.
    press : PressSpec or None
        The kvpress press (kind ``"peer"`` only).
    """

    label: str
    kind: str
    name: str
    profile: MergeProfile | None = None
    quantization: Quantization | None = None
    press: PressSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"method kind {self.kind!r} is not one of {_KINDS}")
        if (self.kind == "peer") != (self.press is not None):
            raise ValueError("a press goes with kind 'peer' only")
        if self.kind == "peer" and self.quantization is not None:
            raise ValueError(f"{self.label!r}: kvpress methods are not stored quantized here")
        if self.kind not in ("profile", "peer") and BUILTIN_METHODS.get(self.name, ("",))[0] != self.kind:
            known = ", ".join(n for n, (k, _) in BUILTIN_METHODS.items() if k == self.kind)
            raise ValueError(f"{self.name!r} is not a {self.kind}; known: {known}")
        if (self.kind == "profile") != (self.profile is not None):
            raise ValueError("a loaded profile goes with kind 'profile' only")

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """``full``, ``paper``, ``average`` (or ``baseline:NAME`` / ``preset:NAME``), else a profile path;
        any of them followed by ``@[SCHEME:]BITS[/GROUP]`` is stored quantized that way
        (:func:`parse_storage`; e.g. ``none@rotated:3``, ``profiles/x@kivi:2/64``).
        ``kvpress:NAME@RATIO`` is a kvpress press (:class:`~minicache.evaluate.peers.PressSpec`).

        Raises
        ------
        ProfileError, OSError
            The profile does not exist or is not valid.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty method name")
        if text.startswith("kvpress:"):
            return cls(text, "peer", text, press=PressSpec.parse(text.removeprefix("kvpress:")))
        if "@" in text:
            base, _, storage = text.rpartition("@")
            return replace(cls.parse(base), label=text, quantization=parse_storage(storage))
        kind, sep, name = text.partition(":")
        if sep and kind in ("baseline", "preset"):
            return cls(text, kind, name)
        if text in BUILTIN_METHODS:
            return cls(text, BUILTIN_METHODS[text][0], text)
        try:
            profile = MergeProfile.load(text)
        except FileNotFoundError as err:
            hint = difflib.get_close_matches(text, list(BUILTIN_METHODS), n=1)
            if not hint:
                raise
            raise FileNotFoundError(
                f"{text!r} is neither a built-in method nor a profile on disk (did you mean {hint[0]!r}?); "
                f"built in: {', '.join(BUILTIN_METHODS)}"
            ) from err
        return cls(text, "profile", text, profile)

    def build(self, config) -> tuple[MergeProfile, Callable | None]:
        """``(profile, cache_factory)`` for :func:`~minicache.evaluate.quality.evaluate_profile`
        (``cache_factory`` None: a :class:`MiniCache` of the profile)."""
        q = self.quantization
        if self.name == "full" and self.kind == "baseline":
            return MergeProfile(), full_cache_factory
        if self.kind == "peer":
            return MergeProfile(), press_cache_factory(self.press)[0]
        if self.kind == "baseline" and self.name.startswith("quantized-cache-"):
            backend = self.name.removeprefix("quantized-cache-")
            bits, group = (q.bits, q.group_size) if q is not None else (4, 128)
            return MergeProfile(), quantized_cache_factory(backend, bits, group)
        if self.kind == "profile":
            profile = self.profile
        elif self.name == "average":
            profile = MergeProfile.preset("paper", config, t=0.5, method="average")
        else:
            profile = MergeProfile.preset(self.name, config)
        return (profile if q is None else profile.with_quantization(q)), None

    def prefill_context(self) -> Callable | None:
        """``model -> context manager`` around the prefix's forward pass (kvpress presses), or None."""
        return press_cache_factory(self.press)[1] if self.kind == "peer" else None

    @property
    def quantized(self) -> dict:
        """``kv_bits``/``kv_group_size`` (and the exact window) of this method, for JSON; {} if none."""
        q = self.quantization
        if self.kind == "peer" or (self.kind == "baseline" and self.name == "quantized-cache-fp8"):
            return {}
        if self.kind == "baseline" and self.name.startswith("quantized-cache-"):
            return {"kv_bits": q.bits if q else 4, "kv_group_size": q.group_size if q else 128}
        if q is None and self.profile is not None:
            q = self.profile.quantization
        if q is None or (self.kind == "baseline" and self.name == "full"):
            return {}
        out = {"kv_bits": q.bits, "kv_group_size": q.group_size, "kv_residual_length": q.residual_length}
        if q.value_bits is not None:
            out["kv_value_bits"] = q.value_bits
        if q.scheme != "kivi":
            out["kv_scheme"] = q.scheme
        if q.sink_tokens:
            out["kv_sink_tokens"] = q.sink_tokens
        if q.pre_rope_keys:
            out["kv_pre_rope_keys"] = True
        if q.window_bits:
            out["kv_window_bits"] = q.window_bits
        if q.scale_bits:
            out["kv_scale_bits"] = q.scale_bits
        if q.key_rounding != "nearest":
            out["kv_key_rounding"] = q.key_rounding
        return out


_STORAGE = re.compile(r"(?:(?P<scheme>[^:]+):)?(?P<bits>\d+|k\d+v\d+)(?:/(?P<group>\d+))?"
                      r"(?:\+s(?P<sinks>\d+))?(?:\+r(?P<window>\d+))?(?P<pre>\+prerope)?(?:\+w(?P<wbits>\d+))?"
                      r"(?:\+z(?P<zbits>\d+))?(?P<qk>\+qk)?")


def parse_storage(text: str) -> Quantization:
    """``[SCHEME:]BITS[/GROUP][+sS][+rR][+prerope][+wW][+zZ][+qk]`` (after a method's ``@``) as a :class:`Quantization`:
    scheme default ``kivi``, group default 128. ``BITS`` is one width, or ``kKvV`` (keys ``K`` bits,
    values ``V``); ``+sS`` keeps the first ``S`` tokens exact (``sink_tokens``); ``+rR`` keeps the
    ``R`` most recent tokens exact (``residual_length``, default 128); ``+prerope`` packs keys before
    RoPE (``pre_rope_keys``); ``+wW`` stores that window at ``W`` bits (``window_bits``); ``+zZ`` stores
    scales and zero points at ``Z`` bits (``scale_bits``); ``+qk`` rounds keys for the queries (``key_rounding``
    ``queries``: only on a profile whose sidecar holds the key weights, e.g. ``PROFILE@rotated:2/64+qk``).

    Raises
    ------
    ValueError
        Not of that form, or a width/group/scheme the registry refuses (the message says which).
    """
    form = _STORAGE.fullmatch(text)
    if form is None:
        raise ValueError(f"storage {text!r} is not [SCHEME:]BITS[/GROUP][+sS][+rR][+prerope][+wW][+zZ][+qk] (BITS: "
                         "a width, or kKvV for keys K and values V bits; S: exact sink tokens; R: recent tokens kept "
                         "in the window; W: the window's width, 6 or 8; Z: the scales' width, 8; qk: keys rounded for "
                         "the queries; e.g. rotated:3, kivi:2/64, kivi:k2v4, rotated:3+s4+prerope+w8, "
                         "rotated:3/64+s4+z8)")
    scheme, bits, group, sinks, window, wbits, zbits = form.group("scheme", "bits", "group", "sinks", "window",
                                                                  "wbits", "zbits")
    split = re.fullmatch(r"k(\d+)v(\d+)", bits)
    keys, values = split.groups() if split else (bits, bits)
    window = Quantization.residual_length if window is None else int(window)  # the field's own default
    try:
        return Quantization(bits=int(keys), value_bits=int(values), group_size=int(group or 128),
                            scheme=scheme or "kivi", sink_tokens=int(sinks or 0), pre_rope_keys=bool(form.group("pre")),
                            residual_length=window, window_bits=None if wbits is None else int(wbits),
                            scale_bits=None if zbits is None else int(zbits),
                            key_rounding="queries" if form.group("qk") else "nearest")
    except ProfileError as err:
        raise ValueError(f"storage {text!r}: {err}") from err


def parse_methods(text: str) -> list[MethodSpec]:
    """A comma-separated list of methods (see :meth:`MethodSpec.parse`); labels must be unique."""
    specs = [MethodSpec.parse(part) for part in text.split(",")]
    labels = [s.label for s in specs]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate is not None:
        raise ValueError(f"method {duplicate!r} is listed twice")
    return specs


def _cache_maker(profile: MergeProfile, factory: Callable | None, allow_model_mismatch: bool):
    if factory is not None:
        return lambda model: factory(profile, model)
    return lambda model: MiniCache(profile, model, allow_model_mismatch=allow_model_mismatch)


@torch.inference_mode()
def compare_quality(
    model,
    windows: torch.Tensor,
    prefix_length: int,
    methods: Sequence[MethodSpec],
    *,
    batch_size: int = 4,
    chunk_size: int = 64,
    allow_model_mismatch: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Score every method on the same windows against one full-cache reference run.

    Returns
    -------
    list of dict
        One row per method, in order: :class:`~minicache.evaluate.quality.QualityResult` fields
        plus ``method`` (label), ``describe`` (the profile in one line) and ``seconds``.
    """
    reference = reference_run(model, windows, prefix_length, batch_size)
    rows = []
    for spec in methods:
        started = time.perf_counter()
        profile, factory = spec.build(model.config)
        result = evaluate_profile(
            model,
            windows,
            prefix_length,
            profile,
            reference=reference,
            batch_size=batch_size,
            chunk_size=chunk_size,
            cache_factory=factory,
            prefill_context=spec.prefill_context(),
            allow_model_mismatch=allow_model_mismatch,
        )
        row = {"method": spec.label, **result.to_dict(), **spec.quantized, "describe": _describe(spec, profile)}
        if spec.kind == "peer":
            row["kvpress_version"] = kvpress_version()
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        if progress is not None:
            progress(f"{spec.label}: ppl {row['ppl_increase']:+.2%}, compression {row['compression_ratio']:.3f}x")
    return rows


def _describe(spec: MethodSpec, profile: MergeProfile) -> str:
    if spec.kind == "baseline" and spec.name == "full":
        return "DynamicCache (full)"
    if spec.kind == "baseline" and spec.name.startswith("quantized-cache-"):
        return BUILTIN_METHODS[spec.name][1]
    if spec.kind == "peer":
        press = spec.press
        return f"kvpress {kvpress_version()} {press.class_name}(compression_ratio={press.compression_ratio})"
    return profile.describe()


@torch.inference_mode()
def compare_passkey(
    model,
    tokenizer,
    methods: Sequence[MethodSpec],
    context_lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int,
    *,
    seed: int = 0,
    batch_size: int = 4,
    max_new_tokens: int = 8,
    allow_model_mismatch: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Passkey accuracy of every method, and of the full cache, on the same prompts.

    The full cache is always measured (first), whether or not ``methods`` names it.

    Returns
    -------
    dict
        ``methods`` (labels, full first), ``by_length`` / ``by_cell`` / ``counts`` (see
        :func:`~minicache.evaluate.passkey.accuracy_table`; lengths and depths as JSON-safe
        strings), ``compression`` per method and length, ``records`` (every answer), ``settings``.
    """
    specs = list(methods)
    peers = [s.label for s in specs if s.kind == "peer"]
    if peers:
        raise ValueError(f"{', '.join(peers)}: kvpress methods are measured on the perplexity task only")
    if not any(s.kind == "baseline" and s.name == "full" for s in specs):
        specs.insert(0, MethodSpec("full", "baseline", "full"))
    runnable = []
    for spec in specs:
        profile, factory = spec.build(model.config)
        runnable.append(PasskeyMethod(spec.label, _cache_maker(profile, factory, allow_model_mismatch)))
    prompts = make_passkey_prompts(tokenizer, context_lengths, depths, samples_per_cell, seed)
    records, compression = run_passkey(
        model, tokenizer, prompts, runnable, batch_size=batch_size, max_new_tokens=max_new_tokens,
        progress=progress,
    )
    table = accuracy_table(records)

    def keys_as_str(value):
        if isinstance(value, dict):
            return {str(k): keys_as_str(v) for k, v in value.items()}
        return value

    return {
        "methods": [s.label for s in specs],
        "by_length": keys_as_str(table["by_length"]),
        "by_cell": keys_as_str(table["by_cell"]),
        "counts": keys_as_str(table["counts"]),
        "compression": keys_as_str(compression),
        "records": [r.to_dict() for r in records],
        "settings": {
            "context_lengths": list(context_lengths),
            "depths": list(depths),
            "samples_per_cell": samples_per_cell,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
        },
    }


# ---- Markdown -----------------------------------------------------------------------------------
@torch.inference_mode()
def compare_tasks(
    model,
    tokenizer,
    methods: Sequence[MethodSpec],
    tasks: Sequence[str],
    context_lengths: Sequence[int],
    samples_per_cell: int,
    *,
    seed: int = 0,
    allow_model_mismatch: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Accuracy of every method, and of the full cache, on the same long-context task prompts
    (:mod:`minicache.evaluate.tasks`); kvpress presses compress each context before its question.

    Returns
    -------
    dict
        ``methods`` (labels, full first), ``table`` (:func:`~minicache.evaluate.tasks.task_table`),
        ``compression`` per method and task, ``records`` (every answer), ``settings``.
    """
    specs = list(methods)
    if not any(s.kind == "baseline" and s.name == "full" for s in specs):
        specs.insert(0, MethodSpec("full", "baseline", "full"))
    runnable = []
    for spec in specs:
        profile, factory = spec.build(model.config)
        runnable.append(TaskMethod(spec.label, _cache_maker(profile, factory, allow_model_mismatch),
                                   spec.prefill_context()))
    prompts = make_task_prompts(tokenizer, tasks, context_lengths, samples_per_cell, seed)
    records, compression = run_tasks(model, tokenizer, prompts, runnable, progress=progress)
    return {
        "methods": [s.label for s in specs],
        "table": task_table(records),
        "compression": compression,
        "records": [r.to_dict() for r in records],
        "settings": {"tasks": list(tasks), "context_lengths": list(context_lengths),
                     "samples_per_cell": samples_per_cell, "seed": seed},
    }


def tasks_markdown(result: dict) -> str:
    """Accuracy per task and length (rows: methods), with sample size and 95 % interval."""
    tasks = result["settings"]["tasks"]
    lengths = [str(n) for n in result["settings"]["context_lengths"]]
    header = ["method", *[f"{t} @{n}" for t in tasks for n in lengths], "compression"]
    rows = []
    for method in result["methods"]:
        cells = []
        for t in tasks:
            for n in lengths:
                c = result["table"][method][t][n]
                low, high = c["ci95"]
                cells.append(f"{c['accuracy']:.0%} [{low:.0%}..{high:.0%}]")
        ratios = result["compression"].get(method, {})
        mean = sum(ratios.values()) / len(ratios) if ratios else 1.0
        rows.append([f"`{method}`", *cells, f"{mean:.3f}x"])
    n = result["settings"]["samples_per_cell"]
    note = (f"Exact-match accuracy, {n} prompts per task and length, [95 % Wilson interval]; compression: "
            "full-cache bytes ÷ bytes held after the answer, mean over tasks.")
    return _table(header, rows, ["l"] + ["r"] * (len(header) - 1)) + "\n\n" + note


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    marks = {"l": ":---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def quality_markdown(rows: Sequence[dict]) -> str:
    """The rows of :func:`compare_quality` as a Markdown table."""
    header = ["method", "ppl", "ppl increase", "95 % interval", "KL mean", "KL q95", "top-1", "compression", "KV MiB"]
    body = [
        [
            f"`{r['method']}`",
            f"{r['ppl']:.3f}",
            f"{r['ppl_increase']:+.2%}",
            format_interval(r["ppl_increase_ci95"]) if r.get("ppl_increase_ci95") else "",
            f"{r['kl_mean']:.4f}",
            f"{r['kl_q95']:.4f}",
            f"{r['top1_agreement']:.2%}",
            f"{r['compression_ratio']:.3f}x",
            f"{r['kv_bytes'] / 2**20:.1f}",
        ]
        for r in rows
    ]
    first = rows[0] if rows else None
    note = ""
    if first is not None:
        note = (
            f"\n\n{first['windows']} windows × ({first['prefix_length']} prefix + "
            f"{first['continuation_length']} scored tokens); compression and KV MiB after the prefix "
            f"(KV MiB summed over windows). 95 % interval of the perplexity increase: paired bootstrap "
            f"over windows."
        )
    return _table(header, body, "lrrrrrrrr") + note


def passkey_markdown(result: dict) -> str:
    """Accuracy per context length (and compression), then per length and depth, as Markdown."""
    lengths = [str(n) for n in result["settings"]["context_lengths"]]
    depths = [str(d) for d in result["settings"]["depths"]]
    header = ["method", *[f"acc @ {n}" for n in lengths], *[f"compression @ {n}" for n in lengths]]
    body = []
    for method in result["methods"]:
        acc = result["by_length"][method]
        comp = result["compression"][method]
        body.append(
            [f"`{method}`", *[f"{acc[n]:.0%}" for n in lengths], *[f"{comp[n]:.3f}x" for n in lengths]]
        )
    per_length = _table(header, body, "l" + "r" * (2 * len(lengths)))
    header = ["method", "length", *[f"depth {d}" for d in depths]]
    body = [
        [f"`{method}`", n, *[f"{result['by_cell'][method][n][d]:.0%}" for d in depths]]
        for method in result["methods"]
        for n in lengths
    ]
    per_depth = _table(header, body, "lr" + "r" * len(depths))
    settings = result["settings"]
    per_cell = settings["samples_per_cell"]
    note = (
        f"{per_cell} prompts per (length, depth), {per_cell * len(depths)} per length; exact match of the "
        f"passkey in {settings['max_new_tokens']} greedy tokens; seed {settings['seed']}. Compression: "
        "full-cache bytes ÷ bytes held after the question."
    )
    return f"{per_length}\n\n{per_depth}\n\n{note}"


def check_methods(specs: Sequence[MethodSpec], config, allow_model_mismatch: bool = False) -> None:
    """Build every method's profile for ``config`` and check it fits, before any long run."""
    for spec in specs:
        profile, _ = spec.build(config)
        try:
            profile.check_model(config, allow_mismatch=allow_model_mismatch)
        except ProfileError as err:
            raise ProfileError(f"method {spec.label!r}: {err}") from None
