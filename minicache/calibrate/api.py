"""`calibrate()`: data → KV capture → statistics → search → profile (+ report)."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minicache.calibrate.search import Budget, SearchResult, search
from minicache.calibrate.statistics import PairStatistics, capture_statistics
from minicache.data import DataError, Sample, file_sha256, read_samples, split_samples, token_windows
from minicache.evaluate.quality import QualityResult, evaluate_profile, reference_run
from minicache.profile import PROFILE_FILENAME, Defaults, MergeGroup, MergeProfile, ModelFingerprint, Quantization
from minicache.sidecar import rotation_name

#: Prompts the model continues itself when no data is given (data-free calibration).
SEED_PROMPTS = (
    "Write a detailed essay about the history of astronomy, from ancient observers to modern telescopes.",
    "Explain step by step how a compiler turns source code into machine code.",
    "Tell a long story about a sailor who discovers an island that is not on any map.",
    "Describe how the human immune system defends the body against infections.",
    "Write a travel guide to a city you know well, with its history, food and neighbourhoods.",
    "Explain the causes and consequences of the industrial revolution.",
    "Write a user manual for a simple kitchen appliance, with safety notes and troubleshooting.",
    "Summarise the main ideas of classical economics and how later schools criticised them.",
)


@dataclass(frozen=True)
class CalibrationResult:
    profile: MergeProfile
    statistics: PairStatistics
    search: SearchResult | None
    measured: QualityResult
    summary: str


def generate_default_samples(model, tokenizer, length: int, count: int, seed: int) -> list[Sample]:
    """Data-free calibration text: the model continues built-in seed prompts (seeded sampling)."""
    prompts = [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(count)]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    else:
        texts = prompts
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **batch.to(device),
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
        )
    torch.random.set_rng_state(generator_state)
    samples = []
    for i, row in enumerate(out.cpu()):
        padding = int((batch.attention_mask[i] == 0).sum())  # left padding of the prompt
        samples.append(Sample(line=i + 1, input_ids=tuple(row[padding:].tolist())))
    return samples


def _round(value: float, digits: int = 6) -> float:
    # Six significant digits keep profiles readable and stable against last-bit noise.
    if value == 0 or not math.isfinite(value):
        return float(value)
    return float(f"{value:.{digits}g}")


def calibrate(
    model,
    tokenizer,
    data: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    budget: Budget = Budget(),
    preset: str | None = None,
    num_samples: int = 32,
    max_length: int = 768,
    prefix_length: int | None = None,
    eval_windows: int = 8,
    held_out: float = 0.25,
    seed: int = 0,
    defaults: Defaults = Defaults(),
    batch_size: int = 4,
    probes: int = 6,
    progress: bool = True,
    log: Callable[[str], None] = print,
    align: bool = False,
    max_group_size: int = 2,
    quantization: Quantization | None = None,
) -> CalibrationResult:
    """Measure KV similarity on sample data and choose a merge profile within a quality budget.

    Parameters
    ----------
    data : path, optional
        JSON Lines (``text`` / ``messages`` / ``input_ids``) or ``.txt``. None: data-free
        calibration on text the model generates from built-in seed prompts.
    budget : Budget
        Largest quality loss accepted on the held-out part (default: perplexity +1 %).
    preset : str, optional
        ``"paper"``: skip the search and measure the paper's profile instead.
    num_samples : int
        Calibration windows of ``max_length`` tokens captured for statistics.
    prefix_length : int, optional
        Held-out windows are ``max_length`` tokens: this many merged, the rest scored.
        Default: two thirds of ``max_length``.
    eval_windows : int
        Held-out windows used to measure quality.
    align : bool
        Fit an orthogonal alignment per group, KV head and K/V on the calibration windows
        (issue 7). With ``preset``: the preset's groups, all aligned. Without: the search also
        considers aligned candidates and keeps, per component, whichever restores better.
    max_group_size : int
        Largest group the search considers (2 = pairs only, as in the paper).
    quantization : Quantization, optional
        Quantized storage for every candidate profile and the result (issue 6): quality is
        measured with it on, so the budget covers quantization and merging together.

    Returns
    -------
    CalibrationResult
        The profile (with provenance and measured quality), statistics, search trace, summary.
    """
    prefix_length = prefix_length or (2 * max_length) // 3
    if not 0 < prefix_length < max_length:
        raise ValueError(f"prefix_length must be in (0, max_length={max_length}), got {prefix_length}")
    config = model.config.get_text_config(decoder=True)

    if data is None:
        log(f"no --data: data-free calibration on text the model generates from {len(SEED_PROMPTS)} seed prompts")
        samples = generate_default_samples(model, tokenizer, max_length, len(SEED_PROMPTS), seed)
        data_info = {"path": None, "source": "generated from built-in seed prompts", "sha256": _samples_sha(samples)}
    else:
        samples = read_samples(data)
        data_info = {"path": str(data), "sha256": file_sha256(data)}
    calib, held = split_samples(samples, held_out, seed)
    if not held:
        raise DataError("need at least 2 samples: one part calibrates, a held-out part verifies quality")
    calib_windows = token_windows(calib, tokenizer, max_length, max_windows=num_samples)
    held_windows = token_windows(held, tokenizer, max_length, max_windows=eval_windows)
    if calib_windows.shape[0] == 0 or held_windows.shape[0] == 0:
        raise DataError(
            f"not enough text: {calib_windows.shape[0]} calibration and {held_windows.shape[0]} held-out windows "
            f"of {max_length} tokens; add samples or lower --max-length"
        )
    log(
        f"{len(samples)} samples -> {calib_windows.shape[0]} calibration windows, {held_windows.shape[0]} held-out "
        f"windows of {max_length} tokens (seed {seed})"
    )

    if max_group_size < 2:
        raise ValueError(f"max_group_size must be at least 2, got {max_group_size}")
    capture = None
    started = time.perf_counter()
    if align or max_group_size > 2:
        from minicache.calibrate.alignment import candidate_keys, capture_alignment

        n_layers = config.num_hidden_layers
        span = max_group_size if preset is None else 2
        capture = capture_alignment(
            model, calib_windows, batch_size=batch_size, window=defaults.block_size,
            sink_tokens=defaults.sink_tokens, max_group_size=span, progress=progress,
            group_keys=None if preset is not None else candidate_keys(n_layers, max_group_size, align),
        )
        stats = capture.statistics
        capture.cross.all_reduce()
        if capture.groups is not None:
            capture.groups.all_reduce()
    else:
        stats = capture_statistics(
            model, calib_windows, batch_size=batch_size, window=defaults.block_size,
            sink_tokens=defaults.sink_tokens, progress=progress,
        )
    stats.all_reduce()
    elapsed = time.perf_counter() - started
    log(f"statistics of {int(calib_windows.numel())} tokens in {elapsed:.0f}s "
        f"({calib_windows.numel() / max(elapsed, 1e-9):.0f} tokens/s)")

    started = time.perf_counter()
    reference = reference_run(model, held_windows, prefix_length, batch_size, keep_prefix_kv=True)
    passes = [time.perf_counter() - started]

    def evaluate(profile: MergeProfile) -> QualityResult:
        # Every quality measurement of the search goes through here: timed, so the log says where time goes.
        began = time.perf_counter()
        result = evaluate_profile(model, held_windows, prefix_length, profile, reference=reference,
                                  batch_size=batch_size)
        passes.append(time.perf_counter() - began)
        return result

    fingerprint = ModelFingerprint.from_config(config, name_or_path=model_name)

    fitted: dict = {}

    def make_profile(groups: tuple[MergeGroup, ...], calibration: dict | None = None) -> MergeProfile:
        # Aligned groups carry their rotations, fitted on every calibration window (cached per group).
        tensors = {}
        for g in groups:
            for name in ("keys", "values"):
                if getattr(g, name).align:
                    if g.layers not in fitted:
                        fitted[g.layers] = capture.cross.fit(g.layers)
                    tensors[rotation_name(g.label, name)] = fitted[g.layers][name]
        return MergeProfile(groups=groups, defaults=defaults, model=fingerprint, calibration=calibration,
                            tensors=tensors or None, quantization=quantization)

    result_search: SearchResult | None = None
    if preset is not None:
        profile = MergeProfile.preset(preset, config)
        groups = profile.groups
        if align:
            groups = tuple(
                MergeGroup(g.layers, replace(g.keys, align=True), replace(g.values, align=True))
                for g in groups
            )
        profile = make_profile(groups)
        measured = evaluate(profile)
    elif capture is not None:
        from minicache.calibrate.group_search import group_search

        log(f"searching groups of 2..{max_group_size} layers{' (aligned or not)' if align else ''} within "
            f"{budget.metric} <= {budget.max:g} on held-out data")
        result_search = group_search(capture.groups, evaluate, defaults, budget, config.num_hidden_layers,
                                     make_profile=make_profile, probes=probes, log=log)
        profile = make_profile(tuple(c.group() for c in result_search.chosen))
        measured = result_search.final if result_search.final is not None else evaluate(profile)
    else:
        log(f"searching within {budget.metric} <= {budget.max:g} on held-out data")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        result_search = search(stats, evaluate, defaults, budget, make_profile=make_profile, probes=probes,
                               head_dim=head_dim, dtype=next(model.parameters()).dtype, log=log)
        profile = make_profile(tuple(c.group() for c in result_search.chosen))
        measured = result_search.final if result_search.final is not None else evaluate(profile)

    log(f"quality: reference pass {passes[0]:.0f}s + {len(passes) - 1} evaluation passes "
        f"{sum(passes[1:]):.0f}s on {held_windows.shape[0]} held-out windows")
    calibration = {
        "data": {**data_info, "samples": len(samples), "tokens": int(calib_windows.numel()), "seed": seed,
                 "held_out_windows": int(held_windows.shape[0]), "max_length": max_length,
                 "prefix_length": prefix_length},
        "budget": {"metric": budget.metric, "max": budget.max},
        "measured": {k: (_round(v) if isinstance(v, float) else v) for k, v in measured.to_dict().items()},
        "method": "preset:" + preset if preset else "search",
    }
    if capture is not None:
        calibration["alignment"] = {
            "fitted": bool(align), "max_group_size": max_group_size,
            "aligned_groups": [g.label for g in profile.groups if g.keys.align or g.values.align],
        }
    profile = make_profile(profile.groups, calibration)
    saved = 1 - 1 / measured.compression_ratio if measured.compression_ratio else 0.0
    if not profile.groups:
        log(
            f"no group fits the budget {budget.metric} <= {budget.max:g}: the profile merges nothing "
            "(a valid profile; the cache then behaves as a full cache). Try a larger --budget."
        )
    summary = (
        f"{len(profile.groups)} groups merged {[list(g.layers) for g in profile.groups]}: KV memory -{saved:.1%} "
        f"(compression {measured.compression_ratio:.3f}x at {prefix_length} tokens), "
        f"perplexity {measured.ppl_increase:+.2%}, KL {measured.kl_mean:.4f}, top-1 {measured.top1_agreement:.1%} "
        f"on held-out data"
    )
    return CalibrationResult(profile=profile, statistics=stats, search=result_search, measured=measured,
                             summary=summary)


def _samples_sha(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(repr((s.text, s.messages, s.input_ids)).encode())
    return digest.hexdigest()


def resolve_output(out: str | os.PathLike) -> tuple[Path, Path]:
    """(profile file, report directory) for ``--out``: a .yaml file, or a directory (model dir too)."""
    out = Path(out)
    if out.suffix in (".yaml", ".yml"):
        return out, out.parent
    return out / PROFILE_FILENAME, out
