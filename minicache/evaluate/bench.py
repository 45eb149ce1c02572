"""`minicache-bench`: prefill/decode speed and KV memory of MiniCache against the full cache.

Every point (cache, context length, batch size) runs ``repeats`` times, the caches interleaved
within each repeat (order rotated between repeats) so that drift in the machine's load hits all
of them alike. Reported:

* **prefill** tokens/s: one forward over the ``[B, T]`` prompt (``B·T / median seconds``);
* **decode** tokens/s: ``decode_tokens`` greedy single-token steps with the cache
  (``B·N / median seconds``), merges that fall due included;
* **KV bytes**: what the cache holds after the prefill and at the end, counted from its tensors
  (``MiniCache.memory_report()['kv_bytes']``; for `DynamicCache` the sum of its keys and values);
* on CUDA also ``torch.cuda.max_memory_allocated`` during the point (weights and activations
  included) — on CPU there is no such number and none is reported;
* **ratios** cache / full of every median, from the same run.

The **largest batch within a KV budget** is computed from a linear model of the cache's bytes
measured at each context length: one real prompt's full KV is replayed through each cache's
``update`` (exactly the calls a prefill makes) at batch 1 and 2, giving bytes per sequence and a
fixed per-cache part (alignment rotations); the computed batch is then verified by building the
cache at that batch and at one more and measuring both.

Timings on a shared CPU are noisy: compare ratios, not absolute numbers; absolute throughput
means something only on a dedicated GPU.

The command line itself (options, checks before any model loads) is :mod:`minicache.evaluate.bench_cli`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import DynamicCache

from minicache.cli_options import DEFAULT_MODEL, quantization_from_args
from minicache.model_spec import ModelSpec
from minicache.profile import MergeProfile, ProfileError
from minicache.runtime.cache import MiniCache
from minicache.runtime.memory import cache_bytes

SCHEMA = "minicache-bench/1"
FULL = "full"
MIB = 2**20

MEMORY_KIND_CPU = (
    "kv_bytes: bytes of the tensors the cache holds (counted, not sampled); CPU has no allocator "
    "peak, so no peak memory is reported"
)
MEMORY_KIND_CUDA = (
    "kv_bytes: bytes of the tensors the cache holds (counted); peak_allocated_bytes: "
    "torch.cuda.max_memory_allocated over the point (weights + activations + cache)"
)


# ---- what is measured -------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    """One cache under test.

    Attributes
    ----------
    name : str
        Label in the results (``"full"`` is the `DynamicCache` baseline).
    profile : MergeProfile or None
        None for the full cache.
    source : str
        Where the profile came from: ``"baseline:full"``, ``"preset:paper"`` or a path.
    """

    name: str
    profile: MergeProfile | None
    source: str

    def __post_init__(self):
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"cache name must be a non-empty word, got {self.name!r}")
        if (self.profile is None) != (self.name == FULL):
            raise ValueError(f"the cache named {FULL!r} and only it is the full cache (no profile)")

    def build(self, config_or_model, allow_model_mismatch: bool = False):
        """A fresh, empty cache for the model (or its config)."""
        if self.profile is None:
            config = getattr(config_or_model, "config", config_or_model)
            return DynamicCache(config=config)
        return MiniCache(self.profile, config_or_model, allow_model_mismatch=allow_model_mismatch)

    def describe(self) -> dict:
        groups = [] if self.profile is None else [list(g.layers) for g in self.profile.groups]
        return {"name": self.name, "source": self.source, "merged_groups": groups}


def full_cache() -> CacheSpec:
    return CacheSpec(FULL, None, "baseline:full")


@dataclass(frozen=True)
class BenchSettings:
    """Sizes and repetitions of one benchmark run.

    Attributes
    ----------
    context_lengths, batch_sizes : tuple of int
        Every combination is one point.
    decode_tokens : int
        Single-token steps timed after the prefill (0: prefill only).
    repeats : int
        Timed runs per point; medians are reported.
    warmup : int
        Untimed runs of every cache at the smallest point first (allocator, thread pools).
    kv_budget_bytes : int or None
        Budget for the largest-batch computation; None skips it.
    """

    context_lengths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    kv_budget_bytes: int | None = None

    def __post_init__(self):
        for name in ("context_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values!r}")
        if self.decode_tokens < 0:
            raise ValueError(f"decode_tokens must be ≥ 0, got {self.decode_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be ≥ 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError(f"kv_budget_bytes must be positive, got {self.kv_budget_bytes}")


class PromptSource:
    """Prompt token ids: windows of a token stream, sequence ``i`` of a batch starting at ``i·T``.

    Parameters
    ----------
    stream : torch.Tensor
        ``[N]`` int64 token ids; windows wrap around when the batch needs more than ``N`` tokens.
    description : str
        Recorded in the results (e.g. which text, or "random token ids").
    """

    def __init__(self, stream: torch.Tensor, description: str):
        if stream.dim() != 1 or stream.numel() == 0:
            raise ValueError("the prompt stream must be a non-empty 1-D tensor of token ids")
        self.stream = stream.long()
        self.description = description

    @classmethod
    def random(cls, vocab_size: int, length: int, seed: int = 0) -> PromptSource:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (length,), generator=generator)
        return cls(ids, f"random token ids (seed {seed})")

    def batch(self, batch_size: int, length: int) -> torch.Tensor:
        """``[batch_size, length]`` token ids."""
        if self.stream.numel() < length:
            raise ValueError(f"the prompt text has {self.stream.numel()} tokens, fewer than one context of {length}")
        n = self.stream.numel()
        starts = [(i * length) % (n - length + 1) for i in range(batch_size)]
        return torch.stack([self.stream[s : s + length] for s in starts])


# ---- measuring one point ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_once(model, spec: CacheSpec, prompt: torch.Tensor, decode_tokens: int, *,
                 allow_model_mismatch: bool = False) -> dict:
    """Time one prefill of ``prompt`` (``[B, T]``) and ``decode_tokens`` greedy steps with a fresh cache.

    Returns
    -------
    dict
        ``prefill_s``, ``decode_s``, ``kv_bytes_prefill`` / ``kv_bytes_full_prefill`` (after the
        prefill), ``kv_bytes_end`` / ``kv_bytes_full_end`` (after decoding) and, on CUDA,
        ``peak_allocated_bytes``.
    """
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    batch, length = prompt.shape
    # No gc.collect(): the previous point's cache is freed by reference counting already, and a full
    # collection over transformers' object graph takes half a second.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = spec.build(model, allow_model_mismatch)
    mask = torch.ones(batch, length + decode_tokens, dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    # logits_to_keep=1: the prompt's other logits ([B, T, vocab]) are not needed and would dominate memory.
    out = model(input_ids=prompt, attention_mask=mask[:, :length], cache=cache, logits_to_keep=1)
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    held_prefill, full_prefill = cache_bytes(cache)
    start = time.perf_counter()
    for step in range(decode_tokens):
        seen = length + step + 1
        out = model(input_ids=next_token, attention_mask=mask[:, :seen], cache=cache, logits_to_keep=1)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - start
    held_end, full_end = cache_bytes(cache)
    result = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "kv_bytes_prefill": held_prefill,
        "kv_bytes_full_prefill": full_prefill,
        "kv_bytes_end": held_end,
        "kv_bytes_full_end": full_end,
    }
    if device.type == "cuda":
        result["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    del cache, out
    return result


@torch.inference_mode()
def timed_greedy_decode(model, cache, prompt: torch.Tensor, decode_tokens: int,
                        attention_mask: torch.Tensor | None = None) -> tuple[list[float], torch.Tensor]:
    """Greedy decoding after an untimed prefill, each step timed on its own.

    For benchmarks that compare decode paths: subtracting a separately timed prefill from
    ``generate``'s total mixes the prefill's run-to-run noise into every step's figure.

    Parameters
    ----------
    cache : Cache or None
        The cache to fill (None: a fresh ``DynamicCache``, the full cache).
    prompt : torch.Tensor
        ``[B, T]`` token ids.
    attention_mask : torch.Tensor, optional
        ``[B, T]`` mask of the prompt (default: every token attended); decode tokens are appended.

    Returns
    -------
    (list of float, torch.Tensor)
        Seconds of each decode step, and the ``[B, decode_tokens]`` generated ids.
    """
    device = prompt.device
    cache = DynamicCache(config=model.config) if cache is None else cache
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
    out = model(input_ids=prompt, attention_mask=mask, cache=cache, logits_to_keep=1)
    seconds, generated = [], []
    for _ in range(decode_tokens):
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, cache=cache, logits_to_keep=1)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, torch.cat(generated, dim=1)


def summarize(spec: CacheSpec, context_length: int, batch_size: int, decode_tokens: int,
              samples: Sequence[dict]) -> dict:
    """One result row from the repeats of a point: medians, tokens/s from the medians, raw samples."""
    prefill = statistics.median(s["prefill_s"] for s in samples)
    decode = statistics.median(s["decode_s"] for s in samples)
    row = {
        "cache": spec.name,
        "context_length": context_length,
        "batch_size": batch_size,
        "decode_tokens": decode_tokens,
        "prefill_s_median": prefill,
        "decode_s_median": decode,
        "prefill_tokens_per_s": batch_size * context_length / prefill if prefill > 0 else None,
        "decode_tokens_per_s": batch_size * decode_tokens / decode if decode_tokens and decode > 0 else None,
        # Bytes do not vary between repeats (same prompt, deterministic merging); the last one is kept.
        "kv_bytes_prefill": samples[-1]["kv_bytes_prefill"],
        "kv_bytes_full_prefill": samples[-1]["kv_bytes_full_prefill"],
        "kv_bytes_end": samples[-1]["kv_bytes_end"],
        "kv_bytes_full_end": samples[-1]["kv_bytes_full_end"],
        "prefill_s": [s["prefill_s"] for s in samples],
        "decode_s": [s["decode_s"] for s in samples],
    }
    if "peak_allocated_bytes" in samples[-1]:
        row["peak_allocated_bytes_median"] = int(statistics.median(s["peak_allocated_bytes"] for s in samples))
    return row


RATIO_FIELDS = ("prefill_tokens_per_s", "decode_tokens_per_s", "kv_bytes_prefill", "kv_bytes_end",
                "peak_allocated_bytes_median")


def ratios(rows: Sequence[dict]) -> list[dict]:
    """Each cache's medians divided by the full cache's at the same point of the same run.

    Speed ratios above 1 mean faster than the full cache; byte ratios below 1 mean smaller. The
    ``*_paired`` speed ratios are the median over repeats of the ratio within one repeat (full
    seconds / cache seconds; the two ran next to each other), which a slow drift of the machine's
    load disturbs less than the ratio of medians.
    """
    full = {(r["context_length"], r["batch_size"]): r for r in rows if r["cache"] == FULL}
    out = []
    for row in rows:
        base = full.get((row["context_length"], row["batch_size"]))
        if row["cache"] == FULL or base is None:
            continue
        entry = {"cache": row["cache"], "context_length": row["context_length"], "batch_size": row["batch_size"]}
        for name in RATIO_FIELDS:
            a, b = row.get(name), base.get(name)
            if a is not None and b:
                entry[name] = a / b
        for phase in ("prefill", "decode"):
            pairs = list(zip(base[f"{phase}_s"], row[f"{phase}_s"], strict=True))
            if pairs and all(mine > 0 for _, mine in pairs):
                entry[f"{phase}_tokens_per_s_paired"] = statistics.median(full / mine for full, mine in pairs)
        out.append(entry)
    return out


# ---- largest batch within a KV budget ----------------------------------------------------------
def max_batch_within(budget_bytes: float, bytes_per_sequence: float, fixed_bytes: float = 0.0) -> int:
    """Largest ``B`` with ``fixed_bytes + B · bytes_per_sequence ≤ budget_bytes`` (0 if none fits)."""
    if bytes_per_sequence <= 0:
        raise ValueError(f"bytes_per_sequence must be positive, got {bytes_per_sequence}")
    room = budget_bytes - fixed_bytes
    return max(0, math.floor(room / bytes_per_sequence)) if room > 0 else 0


@torch.inference_mode()
def prompt_kv(model, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact per-layer keys and values ``[1, H, T, D]`` of one prompt ``[1, T]`` (a full-cache prefill)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=cache, logits_to_keep=1)
    if not cache.layers or cache.layers[0].keys is None:
        import transformers

        raise RuntimeError(f"the model left the cache empty: transformers {transformers.__version__} does not take "
                           "`cache=` (minicache needs transformers >= 5.24)")
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def replayed_bytes(spec: CacheSpec, config, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int, *,
                   allow_model_mismatch: bool = False) -> int:
    """Bytes a cache holds after a prefill of ``batch`` copies of the prompt whose KV is ``kv``.

    Feeds every layer's keys/values through ``cache.update`` in layer order, the calls a model's
    prefill makes, so the stored layout is exactly a prefill's, without running the model.
    """
    cache = spec.build(config, allow_model_mismatch)
    for layer, (k, v) in enumerate(kv):
        cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), layer)
    held, _ = cache_bytes(cache)
    del cache
    return held


def budget_entry(spec: CacheSpec, config, kv, budget_bytes: int, context_length: int, *,
                 allow_model_mismatch: bool = False) -> dict:
    """Measured bytes per sequence, computed largest batch, and its verification, at one context length."""
    kw = {"allow_model_mismatch": allow_model_mismatch}
    one, two = replayed_bytes(spec, config, kv, 1, **kw), replayed_bytes(spec, config, kv, 2, **kw)
    per_sequence = two - one
    fixed = one - per_sequence
    batch = max_batch_within(budget_bytes, per_sequence, fixed)
    verified = {}
    for label, b in (("at_max_batch", batch), ("at_max_batch_plus_1", batch + 1)):
        if b >= 1:
            held = replayed_bytes(spec, config, kv, b, **kw)
            verified[label] = {"batch_size": b, "kv_bytes": held, "fits": held <= budget_bytes}
    ok = verified.get("at_max_batch", {"fits": True})["fits"] and not verified["at_max_batch_plus_1"]["fits"]
    return {
        "cache": spec.name,
        "context_length": context_length,
        "bytes_per_sequence": per_sequence,
        "fixed_bytes": fixed,
        "max_batch": batch,
        "verified": verified,
        "verification_ok": ok,
    }


# ---- a whole run --------------------------------------------------------------------------------
def machine_info(device: torch.device, note: str | None = None) -> dict:
    """Where the numbers come from: CPU model and cores, GPU, library versions."""
    import importlib.metadata as md

    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    memory_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {name: version(name) for name in ("torch", "transformers", "minicache", "triton")},
    }
    if device.type == "cuda":
        info["versions"]["cuda"] = torch.version.cuda
    if note:
        info["note"] = note
    return info


def run_benchmark(
    model,
    caches: Sequence[CacheSpec],
    settings: BenchSettings,
    prompts: PromptSource,
    *,
    allow_model_mismatch: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure every point for every cache (the full cache added first when missing).

    Returns
    -------
    dict
        ``settings``, ``caches``, ``memory_kind``, ``results`` (one row per cache and point, see
        :func:`summarize`), ``ratios`` (see :func:`ratios`) and ``budget`` (or None).
    """
    log = log or (lambda _msg: None)
    specs = list(caches)
    if not any(s.name == FULL for s in specs):
        specs.insert(0, full_cache())
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"cache names must be unique, got {names}")
    device = next(model.parameters()).device
    kw = {"allow_model_mismatch": allow_model_mismatch}
    for spec in specs:  # refuse a mismatched profile before spending time
        spec.build(model.config, allow_model_mismatch)

    smallest = prompts.batch(min(settings.batch_sizes), min(settings.context_lengths))
    for _ in range(settings.warmup):
        for spec in specs:
            measure_once(model, spec, smallest, min(settings.decode_tokens, 2), **kw)

    rows = []
    for length in settings.context_lengths:
        for batch in settings.batch_sizes:
            prompt = prompts.batch(batch, length)
            samples: dict[str, list[dict]] = {s.name: [] for s in specs}
            for repeat in range(settings.repeats):
                # Interleaved, in an order rotated every repeat: a change in the machine's load during
                # the point affects every cache, and no cache always runs first (cold) or last.
                shift = repeat % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    samples[spec.name].append(measure_once(model, spec, prompt, settings.decode_tokens, **kw))
                log(f"T={length} B={batch} repeat {repeat + 1}/{settings.repeats}: " + ", ".join(
                    f"{n} {s[-1]['prefill_s']:.2f}s+{s[-1]['decode_s']:.2f}s" for n, s in samples.items()))
            rows += [summarize(spec, length, batch, settings.decode_tokens, samples[spec.name]) for spec in specs]

    budget = None
    if settings.kv_budget_bytes is not None:
        entries = []
        for length in settings.context_lengths:
            kv = prompt_kv(model, prompts.batch(1, length))
            for spec in specs:
                entries.append(budget_entry(spec, model.config, kv, settings.kv_budget_bytes, length, **kw))
                log(f"budget T={length} {spec.name}: max batch {entries[-1]['max_batch']}")
            del kv
        full_max = {e["context_length"]: e["max_batch"] for e in entries if e["cache"] == FULL}
        full_per_sequence = {e["context_length"]: e["bytes_per_sequence"] for e in entries if e["cache"] == FULL}
        for e in entries:
            base = full_max.get(e["context_length"])
            e["max_batch_ratio"] = e["max_batch"] / base if base else None
            e["full_max_batch"] = base
            full_bytes = full_per_sequence.get(e["context_length"])
            e["bytes_per_sequence_ratio"] = e["bytes_per_sequence"] / full_bytes if full_bytes else None
        budget = {
            "kv_budget_bytes": settings.kv_budget_bytes,
            "method": (
                "bytes_per_sequence and fixed_bytes are measured: kv_bytes of the cache built at batch 1 and 2 "
                "by replaying one real prompt's KV through cache.update (the calls a prefill makes); max_batch "
                "is computed as floor((budget - fixed) / per_sequence) and verified by building the cache at "
                "max_batch and max_batch + 1 and measuring kv_bytes (verified.*)"
            ),
            "entries": entries,
        }
    return {
        "settings": asdict(settings),
        "prompts": prompts.description,
        "caches": [s.describe() for s in specs],
        "memory_kind": MEMORY_KIND_CUDA if device.type == "cuda" else MEMORY_KIND_CPU,
        "results": rows,
        "ratios": ratios(rows),
        "budget": budget,
    }


# ---- output -------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """Markdown table of a run: tokens/s and KV MiB per cache and point, ratios to the full cache."""
    ratio = {(r["cache"], r["context_length"], r["batch_size"]): r for r in result["ratios"]}
    lines = [
        "| cache | context | batch | prefill tok/s | decode tok/s | KV MiB | prefill × | decode × | KV × "
        "| prefill × paired | decode × paired |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        r = ratio.get((row["cache"], row["context_length"], row["batch_size"]), {})
        lines.append(
            f"| {row['cache']} | {row['context_length']} | {row['batch_size']} "
            f"| {_fmt(row['prefill_tokens_per_s'], '.0f')} | {_fmt(row['decode_tokens_per_s'], '.1f')} "
            f"| {row['kv_bytes_prefill'] / MIB:.1f} "
            f"| {_fmt(r.get('prefill_tokens_per_s'), '.2f')} | {_fmt(r.get('decode_tokens_per_s'), '.2f')} "
            f"| {_fmt(r.get('kv_bytes_prefill'), '.3f')} "
            f"| {_fmt(r.get('prefill_tokens_per_s_paired'), '.2f')} "
            f"| {_fmt(r.get('decode_tokens_per_s_paired'), '.2f')} |"
        )
    budget = result.get("budget")
    if budget:
        lines += [
            "",
            f"Largest batch whose KV fits in {budget['kv_budget_bytes'] / MIB:g} MiB (computed from measured "
            "bytes per sequence, verified by building the cache):",
            "",
            "| cache | context | KV MiB / sequence | KV / sequence vs full | max batch | full's max batch "
            "| × full | verified |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in budget["entries"]:
            # Batches are whole numbers: a small saving can look large as a ratio of small batches, so
            # the absolute numbers stand beside the ratio.
            lines.append(
                f"| {e['cache']} | {e['context_length']} | {e['bytes_per_sequence'] / MIB:.2f} "
                f"| {_fmt(e.get('bytes_per_sequence_ratio'), '.3f')} | {e['max_batch']} "
                f"| {_fmt(e.get('full_max_batch'), 'd')} "
                f"| {_fmt(e['max_batch_ratio'], '.2f')} | {'yes' if e['verification_ok'] else 'NO'} |"
            )
    return "\n".join(lines)


def plot_figure(result: dict):
    """A matplotlib `Figure`: prefill and decode tokens/s, KV per sequence, largest batch in budget."""
    from matplotlib.figure import Figure  # the calibrate extra; the runtime never needs it

    rows = result["results"]
    budget = result.get("budget")
    caches = [c["name"] for c in result["caches"]]
    batches = sorted({r["batch_size"] for r in rows})
    lengths = sorted({r["context_length"] for r in rows})
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    colors = {name: f"C{i}" for i, name in enumerate(caches)}
    styles = ["-", "--", ":", "-."]
    for ax, field, title in ((axes[0], "prefill_tokens_per_s", "prefill"), (axes[1], "decode_tokens_per_s", "decode")):
        for name in caches:
            for i, b in enumerate(batches):
                pts = sorted((r["context_length"], r[field]) for r in rows
                             if r["cache"] == name and r["batch_size"] == b and r[field] is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=colors[name], ls=styles[i % len(styles)],
                            label=f"{name}, B={b}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("tokens/s (median)")
        ax.set_title(f"{title} throughput")
        ax.legend(fontsize=7)
    ax = axes[2]
    for name in caches:
        pts = sorted((r["context_length"], r["kv_bytes_prefill"] / r["batch_size"] / MIB) for r in rows
                     if r["cache"] == name and r["batch_size"] == batches[-1])
        ax.plot(*zip(*pts, strict=True), marker="o", color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("MiB per sequence")
    ax.set_title(f"KV cache held after prefill (B={batches[-1]})")
    ax.legend(fontsize=7)
    if budget:
        ax = axes[3]
        width = 0.8 / len(caches)
        for i, name in enumerate(caches):
            entries = [e for e in budget["entries"] if e["cache"] == name]
            xs = [lengths.index(e["context_length"]) + (i - (len(caches) - 1) / 2) * width for e in entries]
            bars = ax.bar(xs, [e["max_batch"] for e in entries], width, color=colors[name], label=name)
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("sequences")
        ax.set_title(f"largest batch in {budget['kv_budget_bytes'] / MIB:g} MiB of KV")
        ax.legend(fontsize=7)
    else:
        axes[3].set_axis_off()
    model = result.get("model", {}).get("name_or_path", "")
    where = result.get("machine", {}).get("gpu") or result.get("machine", {}).get("cpu_model") or ""
    fig.suptitle(f"minicache-bench: {model} ({result.get('model', {}).get('dtype', '')}) on {where}", fontsize=10)
    return fig


def save_plot(result: dict, path: str | os.PathLike) -> None:
    from minicache.fileio import save_figure

    save_figure(plot_figure(result), Path(path))


# ---- what the command line asks for -------------------------------------------------------------
def _cache_specs(args, config) -> list[CacheSpec]:
    specs = [full_cache()]
    for name in args.preset:
        specs.append(CacheSpec(name, MergeProfile.preset(name, config), f"preset:{name}"))
    for path in args.profile:
        label = Path(path).stem if Path(path).suffix in (".yaml", ".yml") else Path(path).name
        label = label.replace(" ", "_") or "profile"
        base, n = label, 2
        while label in {s.name for s in specs}:
            label, n = f"{base}-{n}", n + 1
        specs.append(CacheSpec(label, MergeProfile.load(path), path))
    spec = quantization_from_args(args)
    if spec is not None:
        specs += [
            CacheSpec(
                f"{s.name}-{args.kv_bits}bit", s.profile.with_quantization(spec), f"{s.source}; {spec.describe()}"
            )
            for s in specs
            if s.profile is not None
        ]
    return specs


def _switch_kernels(model, mode: str) -> tuple[bool, str | None]:
    """Turn the fused kernels on for ``mode`` ``auto``/``on``: ``(enabled, why not)``."""
    if mode == "off":
        return False, "--kernels off"
    if mode == "torch":
        from minicache.runtime.attention import enable_fused_attention

        if enable_fused_attention(model, backend="torch"):
            return True, None
        raise ValueError(f"--kernels torch: {type(model).__name__} cannot change its attention implementation")
    from minicache.runtime.kernels import why_unusable

    device = next(model.parameters()).device
    reason = why_unusable(device, allow_interpreter=False)
    if reason is None:
        from minicache.runtime.attention import enable_fused_attention

        if enable_fused_attention(model):
            return True, None
        reason = f"{type(model).__name__} cannot change its attention implementation"
    if mode == "on":
        raise ValueError(f"--kernels on: {reason}")
    return False, reason


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run what ``minicache-bench`` was asked for (``args`` parsed and checked by
    :mod:`minicache.evaluate.bench_cli`): print the table, write the JSON and plot; the exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    from minicache.data import DataError, read_samples, token_windows
    from minicache.models import ModelSourceError, load_model, random_model

    started = time.perf_counter()
    try:
        samples = read_samples(args.data) if args.data else None
        if args.model_shape:
            model, tokenizer = random_model(args.model_shape, dtype=dtype, device=device, seed=args.seed), None
            model_spec = f"random:{args.model_shape}"
        else:
            model_spec = args.model or DEFAULT_MODEL
            model, tokenizer = load_model(model_spec, dtype=dtype)
            model.to(device)
        config = model.config
        model_shape = ModelSpec.from_config(config)
        specs = _cache_specs(args, config)
        budget = int(args.kv_budget_mib * MIB) if args.kv_budget_mib else None
        settings = BenchSettings(args.context_lengths, args.batch_sizes, args.decode_tokens, args.repeats,
                                 args.warmup, budget)
        model_shape.check_fits(max(settings.context_lengths) + settings.decode_tokens,
                               f"the longest --context-lengths {max(settings.context_lengths)} + --decode-tokens "
                               f"{settings.decode_tokens}")
        if samples is not None:
            if tokenizer is None:
                raise ValueError("--data needs a tokenizer; a --model-shape model has none (prompts are random)")
            stream = token_windows(samples, tokenizer, 1).flatten()
            prompts = PromptSource(stream, f"{args.data} ({stream.numel()} tokens)")
        else:
            length = max(settings.context_lengths) * max(settings.batch_sizes)
            prompts = PromptSource.random(model_shape.vocab_size, length, args.seed)
        kernels, kernels_off_reason = _switch_kernels(model, args.kernels)
        log("fused kernels: on" if kernels else f"fused kernels: off ({kernels_off_reason})")
        result = run_benchmark(model, specs, settings, prompts, allow_model_mismatch=args.allow_model_mismatch,
                               log=log)
    except (DataError, ProfileError, ModelSourceError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {
        "schema": SCHEMA,
        "command": shlex.join(["minicache-bench", *(sys.argv[1:] if argv is None else argv)]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, args.note),
        "model": {
            "spec": model_spec,
            "name_or_path": model_shape.name_or_path,
            "random_weights": bool(args.model_shape),
            "num_hidden_layers": model_shape.num_layers,
            "num_key_value_heads": model_shape.kv_heads,
            "head_dim": model_shape.head_dim,
            "dtype": dtype_name,
        },
        # MiniCache decode attention and merging: the fused Triton kernels, or the torch path
        # (restore, then attend); the full cache always runs transformers' sdpa.
        "kernels": {"enabled": kernels, "mode": args.kernels, "why_not": kernels_off_reason},
        **result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    from minicache.fileio import atomic_write

    print(format_table(result))  # first: a file that cannot be written must not cost the results
    try:
        for out in (args.json_out, args.plot_out):
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
        if args.json_out:
            atomic_write(Path(args.json_out), (json.dumps(result, indent=1) + "\n").encode(), overwrite=True)
        if args.plot_out:
            save_plot(result, args.plot_out)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
