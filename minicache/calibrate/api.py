"""`calibrate()`: data → KV capture → statistics → search → profile (+ report)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from minicache.calibrate.bits import BitPoint, allocate_bits, bit_steps, fisher_damage, units_of
from minicache.calibrate.capture import CalibrationCapture, candidate_runs, prefill_batches, progress_bar
from minicache.calibrate.corpus import DEFAULT_CORPUS, SOURCES, kinds
from minicache.calibrate.data_check import DataCheck
from minicache.calibrate.defaults import CALIBRATION_DEFAULTS as D
from minicache.calibrate.defaults import KEY_ROPE_CHOICES, KEY_ROPE_DEFAULT
from minicache.calibrate.key_weights import query_energies
from minicache.calibrate.search import EXTEND, MAX_VERIFY, Budget, Candidate, SearchResult, search
from minicache.calibrate.statistics import PairStatistics
from minicache.data import DataError, Sample, file_sha256, read_samples, split_samples, token_windows
from minicache.evaluate.quality import QualityResult, evaluate_profile, reference_run
from minicache.fileio import check_writable_directory
from minicache.methods import COMPONENTS
from minicache.methods.base import process_group, tensor_name
from minicache.model_spec import ModelSpec
from minicache.profile import (
    KEY_WEIGHTS_TENSOR,
    PROFILE_FILENAME,
    Defaults,
    MergeGroup,
    MergeProfile,
    MergeSettings,
    ModelFingerprint,
    Quantization,
)
from minicache.runtime.rope import RopeAngles


@dataclass(frozen=True)
class CalibrationResult:
    profile: MergeProfile
    statistics: PairStatistics
    search: SearchResult | None
    measured: QualityResult
    summary: str
    #: per group label and component, the share of calibration variance kept at each stored width
    #: (methods with such a curve: low rank) and the width chosen
    spectra: dict[str, dict[str, tuple[torch.Tensor, int]]] = field(default_factory=dict)
    #: ``auto_bits``: every measured point of the width allocation (the report's frontier)
    bit_points: list[BitPoint] = field(default_factory=list)


#: Share of the budget the merge search may spend when the widths are chosen too (``auto_bits``):
#: lowering widths saves more bytes per unit of damage than merging on the models measured so far.
MERGE_SHARE_WITH_AUTO_BITS = 0.25
#: Calibration windows of the sensitivity pass (forward and backward).
FISHER_WINDOWS = 8


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
    budget: Budget = Budget(D.budget_metric, D.budget),
    preset: str | None = None,
    num_samples: int = D.num_samples,
    max_length: int = D.max_length,
    prefix_length: int | None = None,
    eval_windows: int = D.eval_windows,
    held_out: float = D.held_out,
    seed: int = D.seed,
    defaults: Defaults = Defaults(),
    batch_size: int = D.batch_size,
    probes: int = D.probes,
    progress: bool = True,
    log: Callable[[str], None] = print,
    align: bool = D.align,
    max_group_size: int = D.max_group_size,
    quantization: Quantization | None = None,
    methods: Sequence[str] = D.methods,
    allow_small_data: bool = False,
    auto_bits: bool = False,
    method_options: Mapping[str, Any] | None = None,
    key_rope: str = KEY_ROPE_DEFAULT,
) -> CalibrationResult:
    """Measure KV similarity on sample data and choose a merge profile within a quality budget.

    The defaults are ``minicache-calibrate``'s (:data:`~minicache.calibrate.defaults.CALIBRATION_DEFAULTS`):
    aligned groups of up to 3 layers, budget +1 % perplexity.

    Parameters
    ----------
    data : path, optional
        JSON Lines (``text`` / ``messages`` / ``input_ids``) or ``.txt``. None: the built-in corpus
        (:data:`minicache.calibrate.corpus.DEFAULT_CORPUS`: prose, documentation, code and chat).
    budget : Budget
        Largest quality loss accepted on the held-out part (default: perplexity +1 %, no KL guard;
        ``minicache-calibrate`` without ``--data`` adds ``kl_guard=4``, see :class:`Budget`).
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
        Fit the methods' tensors on the calibration windows (SLERP: an orthogonal alignment per
        group, KV head and K/V). With ``preset``: the preset's groups, all aligned. Without: the
        search also considers the fitted variants and keeps, per component, whichever restores better.
    max_group_size : int
        Largest group the search considers (2 = pairs only, as in the paper).
    quantization : Quantization, optional
        Quantized storage for every candidate profile and the result: quality is measured with it
        on, so the budget covers quantization and merging together.
    methods : sequence of str
        Registered merge methods the search may choose from, per group and component
        (:func:`minicache.methods.method_names`).
    auto_bits : bool
        Choose the code width of every layer's keys and values (:mod:`~minicache.calibrate.bits`):
        ``quantization`` gives the scheme, group size and window. The merge search runs first, at
        the scheme's widest width, on :data:`MERGE_SHARE_WITH_AUTO_BITS` of the budget; the widths
        are then lowered, in the order a Fisher estimate predicts is cheapest, as far as the whole
        budget allows (measured).
    method_options : mapping, optional
        Settings handed to the methods' :meth:`~minicache.methods.MergeMethod.param_options`, e.g.
        ``{"lowrank_basis": "query"}``: low-rank key bases fitted for the logits of the calibration
        queries instead of the least restore error (:mod:`minicache.methods.moments`).
    key_rope : str
        Keys of methods whose stored form depends on RoPE (low rank): offered as the cache receives them
        (``"post"``), with RoPE removed (``"pre"``: the profile stores them so, ``pre_rope: true``), or both
        ways (``"both"``, the search picks per group); ``"auto"`` (default): ``"pre"`` where the model's RoPE
        can be removed and the key bases are PCA, else ``"post"``. See :mod:`minicache.calibrate.capture`.
    allow_small_data : bool
        Calibrate even below the floor of :mod:`~minicache.calibrate.data_check` (4 calibration and 4
        held-out windows); shortfalls against ``num_samples`` / ``eval_windows`` are logged as warnings.

    Returns
    -------
    CalibrationResult
        The profile (with provenance and measured quality), statistics, search trace, summary.
    """
    if auto_bits:
        if quantization is None:
            raise ValueError("auto_bits chooses widths for a quantization scheme: give quantization too")
        top = max(quantization.quantizer.bits)
        quantization = replace(quantization, bits=top, value_bits=None)
    prefix_length = prefix_length or (2 * max_length) // 3
    if not 0 < prefix_length < max_length:
        raise ValueError(f"prefix_length must be in (0, max_length={max_length}), got {prefix_length}")
    if max_group_size < 2:
        raise ValueError(f"max_group_size must be at least 2, got {max_group_size}")
    if not methods:
        raise ValueError("give at least one merge method")
    merge_methods = [_known_method(name) for name in methods]
    if preset is None and not align:
        unfitted = [m.name for m in merge_methods if not m.param_options(2, False, {"head_dim": 1})]
        if unfitted:
            raise ValueError(f"method {unfitted[0]!r} stores only with tensors fitted on the data: "
                             "calibrate with alignment/fitting on (drop --no-align)")
    spec = ModelSpec.from_config(model)
    if key_rope not in (KEY_ROPE_DEFAULT, *KEY_ROPE_CHOICES):
        raise ValueError(f"key_rope {key_rope!r}; allowed: {', '.join((KEY_ROPE_DEFAULT, *KEY_ROPE_CHOICES))}")
    rope = None
    query_bases = (method_options or {}).get("lowrank_basis") == "query"
    if key_rope == "auto":
        key_rope = "post"
        if any(m.rope_sensitive for m in merge_methods) and preset is None and not query_bases:
            try:
                rope = RopeAngles.of_model(model)
                key_rope = "pre"
            except ValueError as err:
                log(f"low-rank keys after RoPE: {err}")
    elif key_rope != "post":
        if query_bases:
            raise ValueError("query-weighted key bases are fitted for the queries' post-RoPE logits: use "
                             "key_rope 'post' with them")
        rope = RopeAngles.of_model(model)  # ValueError: no RoPE, or one whose angles depend on the length

    group = process_group()  # (rank, world size) when data-parallel
    if data is None:
        described = _kinds_text()
        log(f"no --data: the built-in corpus ({described}; {DEFAULT_CORPUS.name}, see {SOURCES.name} beside it)")
        samples = read_calibration_data(DEFAULT_CORPUS)
        data_info = {"path": None, "source": f"built-in corpus ({described})", "sha256": file_sha256(DEFAULT_CORPUS)}
    else:
        samples = read_calibration_data(data)
        data_info = {"path": str(data), "sha256": file_sha256(data)}
    calib, held = split_samples(samples, held_out, seed)
    # spread over each part: data of several kinds (the built-in corpus) is represented by all of them
    calib_windows = token_windows(calib, tokenizer, max_length, max_windows=num_samples, spread=True)
    held_windows = token_windows(held, tokenizer, max_length, max_windows=eval_windows, spread=True)
    if calib_windows.shape[0] == 0 or held_windows.shape[0] == 0:
        raise DataError(
            f"not enough text: {calib_windows.shape[0]} calibration and {held_windows.shape[0]} held-out windows "
            f"of {max_length} tokens; add samples or lower --max-length"
        )
    log(
        f"{len(samples)} samples -> {calib_windows.shape[0]} calibration windows, {held_windows.shape[0]} held-out "
        f"windows of {max_length} tokens (seed {seed})"
    )
    # windows were cut up to what was asked for: fewer means the data ran out (exact counts now)
    check = DataCheck(
        available_calibration=int(calib_windows.shape[0]), available_held_out=int(held_windows.shape[0]),
        wanted_calibration=num_samples, wanted_held_out=eval_windows,
        calibration_tokens=int(calib_windows.numel()), held_out_tokens=int(held_windows.numel()),
        max_length=max_length, held_out=held_out,
    )
    check.enforce(allow_small_data, log)

    # One capture loop: layer-similarity statistics, the methods' fit statistics over every window,
    # and (for a search) the candidates' restore errors on the second half with tensors fitted on the first.
    started = time.perf_counter()
    smallest = min(m.min_members for m in merge_methods)
    runs = None if preset is not None else candidate_runs(spec.num_layers, max_group_size, smallest)
    span = max_group_size if preset is None else 2
    stats = PairStatistics(num_layers=spec.num_layers, num_heads=spec.kv_heads, window=defaults.block_size)
    capture = CalibrationCapture(
        merge_methods, runs, fit=align, num_layers=spec.num_layers,
        num_heads=spec.kv_heads, head_dim=spec.head_dim, max_offset=span - 1, gamma=defaults.gamma,
        window=defaults.block_size, defaults=dict(method_options or {}), rope=rope, key_rope=key_rope,
    )
    # Two phases with a progress bar each, because their batches cost very different amounts of work:
    # the second half also measures every candidate group under every option.
    num_batches = -(-calib_windows.shape[0] // batch_size)
    split = capture.measure_from(num_batches)
    phases = [(0, "capturing KV statistics" + (" (1/2)" if split < num_batches else ""))]
    if split < num_batches:
        phases.append((split, f"measuring {capture.option_count()} candidate options (2/2)"))
    if group is not None:  # data-parallel: this process's share of each phase
        _capture_data_parallel(model, calib_windows, stats, capture, group, phases, split=split,
                               batch_size=batch_size, sink_tokens=defaults.sink_tokens, progress=progress, log=log)
    else:
        for phase, (first, desc) in enumerate(phases):
            last = phases[phase + 1][0] if phase + 1 < len(phases) else num_batches
            part = calib_windows[first * batch_size : last * batch_size]
            if first == split and split < num_batches:
                log(f"measuring the restore error of {len(runs)} candidate groups × their options on "
                    f"{part.shape[0]} windows (the second half; the first half fitted the tensors)")
            for batch, _, kv in prefill_batches(model, part, batch_size=batch_size, progress=progress, desc=desc,
                                                on_queries=capture.query_listener(defaults.sink_tokens)):
                stats.add(kv, defaults.sink_tokens)
                capture.add(kv, first + batch, num_batches, defaults.sink_tokens)
    capture.all_reduce()
    stats.all_reduce()
    elapsed = time.perf_counter() - started
    log(f"statistics of {int(calib_windows.numel())} tokens in {elapsed:.0f}s "
        f"({calib_windows.numel() / max(elapsed, 1e-9):.0f} tokens/s)")

    key_weights = None
    if quantization is not None and quantization.key_rounding == "queries":
        began = time.perf_counter()
        sample = _measurement_sample(calib_windows, batch_size)
        key_weights = query_energies(model, sample, batch_size=batch_size, sink_tokens=defaults.sink_tokens,
                                     progress=progress)
        log(f"query energies per key channel (keys rounded for the queries) from {sample.shape[0]} windows in "
            f"{time.perf_counter() - began:.0f}s")

    # Quality on the held-out windows: data-parallel, rank 0 measures and every process gets its figures,
    # so that every process takes the same search decisions.
    started = time.perf_counter()
    reference = None
    if group is None or group[0] == 0:
        reference = reference_run(model, held_windows, prefix_length, batch_size, keep_prefix_kv=True)
    passes = [time.perf_counter() - started]
    extend, floor = EXTEND, 1e-6
    if preset is None:
        # what a candidate saves in the measured caches: the merged share of the prefix, less its tensors
        merged = (prefix_length - defaults.residual_length) // defaults.block_size * defaults.block_size
        candidates = choose_candidates(capture, defaults, spec.head_dim, num_heads=spec.kv_heads,
                                       amortized_over=prefix_length * min(batch_size, held_windows.shape[0]),
                                       merged_share=max(merged, defaults.block_size) / prefix_length)
        if any(c.variant for c in candidates.values()):
            # Several ranks per run: more kinds to predict from, and the regression is rougher, so
            # more probes and more measured steps; damage below 2 % of the budget is noise.
            probes, extend, floor = max(probes, VARIANT_PROBES), max(EXTEND, VARIANT_EXTEND), budget.max / 50
            log(f"runs come in several variants (ranks): {probes} probes, up to {extend} extension steps")
        # the search's time: at most this many passes, each cheaper than the reference's
        most = probes + MAX_VERIFY + extend
        by = time.strftime("%H:%M:%S", time.localtime(time.time() + most * passes[0]))
        log(f"held-out reference pass {passes[0]:.0f}s; the search measures at most {most} profiles: "
            f"done in at most ~{most * passes[0]:.0f}s (by {by})")

    def evaluate(profile: MergeProfile) -> QualityResult:
        # Every quality measurement of the search goes through here: timed, so the log says where time goes.
        began = time.perf_counter()

        def measure() -> QualityResult:
            return evaluate_profile(model, held_windows, prefix_length, profile, reference=reference,
                                    batch_size=batch_size)

        result = measure() if group is None else _from_rank0(measure)
        passes.append(time.perf_counter() - began)
        return result

    fingerprint = ModelFingerprint.from_spec(spec, name_or_path=model_name)

    def make_profile(groups: tuple[MergeGroup, ...], calibration: dict | None = None,
                     quant: Quantization | None = None) -> MergeProfile:
        # Components whose parameters use fitted tensors carry them, fitted on every calibration window.
        tensors = {}
        for g in groups:
            for name, settings in g.components():
                if settings.tensor_names:
                    fitted = capture.fitted(settings.merge_method, g.layers, pre_rope=settings.pre_rope)[name]
                    for local, tensor in settings.merge_method.tensors_for(settings.params, fitted).items():
                        tensors[tensor_name(local, g.label, name)] = tensor
        quant = quant or quantization
        if quant is not None and quant.key_rounding == "queries":
            tensors[KEY_WEIGHTS_TENSOR] = key_weights
        return MergeProfile(groups=groups, defaults=defaults, model=fingerprint, calibration=calibration,
                            tensors=tensors or None, quantization=quant)

    result_search: SearchResult | None = None
    if preset is not None:
        profile = MergeProfile.preset(preset, spec)
        groups = profile.groups
        if align:
            groups = tuple(
                MergeGroup(g.layers, _fitted_settings(g.keys), _fitted_settings(g.values)) for g in groups
            )
        profile = make_profile(groups)
        measured = evaluate(profile)
    else:
        shown = "/".join(methods)
        log(f"searching groups of {smallest}..{max_group_size} layers ({shown}{', fitted or not' if align else ''}) "
            f"within {budget.metric} <= {budget.max:g} on held-out data"
            + (f", KL guard {budget.kl_guard:g}: expm1({budget.kl_guard:g} x KL) too" if budget.kl_guard else ""))
        merge_budget = replace(budget, max=budget.max * MERGE_SHARE_WITH_AUTO_BITS) if auto_bits else budget
        if auto_bits:
            log(f"merging first, at {quantization.describe()}, on {MERGE_SHARE_WITH_AUTO_BITS:.0%} of the budget "
                f"({merge_budget.metric} <= {merge_budget.max:g}); the widths take the rest")
        result_search = search(candidates, evaluate, merge_budget, spec.num_layers, make_profile=make_profile,
                               probes=probes, extend=extend, damage_floor=floor, log=log)
        profile = make_profile(tuple(c.group() for c in result_search.chosen))
        measured = result_search.final if result_search.final is not None else evaluate(profile)

    bit_points: list[BitPoint] = []
    if auto_bits:
        quantization, measured, bit_points = _choose_widths(
            model, calib_windows, profile, quantization, budget, spec.num_layers, evaluate, make_profile,
            batch_size=batch_size, progress=progress, log=log, key_weights=key_weights)
    log(f"quality: reference pass {passes[0]:.0f}s + {len(passes) - 1} evaluation passes "
        f"{sum(passes[1:]):.0f}s on {held_windows.shape[0]} held-out windows")
    calibration = {
        "data": {**data_info, "samples": len(samples), "tokens": int(calib_windows.numel()), "seed": seed,
                 "held_out_windows": int(held_windows.shape[0]), "max_length": max_length,
                 "prefix_length": prefix_length},
        "budget": budget.to_dict(),
        "measured": {
            k: (_round(v) if isinstance(v, float) else [_round(x) for x in v] if isinstance(v, list) else v)
            for k, v in measured.to_dict().items()
            if k != "window_nll_increase"  # per-window numbers: in minicache-eval's JSON, not in the profile
        },
        "method": "preset:" + preset if preset else "search",
    }
    if align or max_group_size > 2:
        calibration["alignment"] = {
            "fitted": bool(align), "max_group_size": max_group_size,
            "aligned_groups": [g.label for g in profile.groups if any(s.tensor_names for _, s in g.components())],
        }
    if tuple(methods) != ("slerp",):
        calibration["methods"] = list(methods)
    if any(m.rope_sensitive for m in merge_methods) and preset is None:
        calibration["key_rope"] = key_rope  # which keys the low-rank options were offered on
    if auto_bits:
        calibration["bits"] = {
            "method": "auto: Fisher-ordered steps, longest prefix measured within the budget",
            "merge_budget_share": MERGE_SHARE_WITH_AUTO_BITS,
            "frontier": [p.to_dict() for p in bit_points],
        }
    profile = make_profile(profile.groups, calibration)
    saved = 1 - 1 / measured.compression_ratio if measured.compression_ratio else 0.0
    if not profile.groups and preset is None:
        log(
            f"no group fits the budget {budget.metric} <= {budget.max:g}: the profile merges nothing "
            "(a valid profile; the cache then behaves as a full cache). Try a larger --budget"
            + (f", or a smaller --kl-guard than {budget.kl_guard:g} (and calibrate on text like what you will run)."
               if budget.kl_guard else ".")
        )
    summary = (
        f"{len(profile.groups)} groups merged {[list(g.layers) for g in profile.groups]}: KV memory -{saved:.1%} "
        f"(compression {measured.compression_ratio:.3f}x at {prefix_length} tokens), "
        f"perplexity {measured.ppl_increase:+.2%} ({measured.interval_text()}), KL {measured.kl_mean:.4f}, "
        f"top-1 {measured.top1_agreement:.1%} on held-out data"
    )
    if result_search is not None and profile.groups:
        summary += (f"; within the budget {budget.metric} <= {budget.max:g} at the upper end of its interval "
                    f"({budget.upper(measured):+.4f}"
                    + (f", the larger of perplexity and expm1({budget.kl_guard:g} x KL)" if budget.kl_guard else "")
                    + ")")
    spectra: dict[str, dict[str, tuple[torch.Tensor, int]]] = {}
    for g in profile.groups:
        for name, settings in g.components():
            method = settings.merge_method
            if capture.fittable(method) and settings.tensor_names:
                fitted = capture.fitted(method, g.layers, pre_rope=settings.pre_rope)[name]
                curve = method.kept_variance(settings.params, fitted)
                if curve is not None:
                    spectra.setdefault(g.label, {})[name] = (curve, int(getattr(settings.params, "rank", 0)))
    return CalibrationResult(profile=profile, statistics=stats, search=result_search, measured=measured,
                             summary=summary, spectra=spectra, bit_points=bit_points)


def _measurement_sample(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The calibration windows that per-layer measurements (query energies, Fisher damage) run on: the first
    :data:`FISHER_WINDOWS`, at least a batch."""
    return windows[: max(batch_size, min(len(windows), FISHER_WINDOWS))]


def _choose_widths(model, windows, profile, quantization, budget, num_layers, evaluate, make_profile, *,
                   batch_size, progress, log, key_weights=None):
    """``(quantization, measured result, frontier points)`` of :mod:`~minicache.calibrate.bits` for the
    merge groups of ``profile``."""
    widths = sorted(quantization.quantizer.bits, reverse=True)
    sample = _measurement_sample(windows, batch_size)
    began = time.perf_counter()
    bar = progress_bar(int(sample.numel()), progress, "sensitivity (forward + backward)")
    try:
        damage = fisher_damage(model, sample, quantization, widths, batch_size=batch_size, progress=bar.update,
                               key_weights=key_weights)
    finally:
        bar.close()
    steps = bit_steps(damage, widths, units_of(profile, num_layers))
    log(f"predicted the damage of {widths} bits per layer and K/V on {sample.shape[0]} windows in "
        f"{time.perf_counter() - began:.0f}s; {len(steps)} steps down from {widths[0]} bits, measuring about "
        f"{2 + max(len(steps), 1).bit_length()} profiles")
    measured: dict[Quantization, QualityResult] = {}

    def measure(q: Quantization) -> tuple[float, float, float]:
        r = measured[q] = evaluate(make_profile(profile.groups, quant=q))
        return budget.value(r), budget.upper(r), r.compression_ratio

    quant, points = allocate_bits(steps, quantization, num_layers, measure, lambda upper: upper <= budget.max, log)
    if not any(p.fits for p in points):
        log(f"even {widths[0]} bits everywhere exceed the budget: the profile keeps {widths[0]} bits "
            "(raise the budget, or calibrate without --kv-bits)")
    log(f"widths: keys {list(quant.bits) if isinstance(quant.bits, tuple) else quant.bits}, "
        f"values {list(quant.value_bits) if isinstance(quant.value_bits, tuple) else quant.bits_of(0, 'values')} "
        f"(mean {quant.mean_bits(num_layers):.2f} bits)")
    return quant, measured[quant], points


def _capture_data_parallel(model, windows: torch.Tensor, stats: PairStatistics, capture: CalibrationCapture,
                           group: tuple[int, int], phases: list[tuple[int, str]], *, split: int, batch_size: int,
                           sink_tokens: int, progress: bool, log: Callable[[str], None]) -> None:
    """This process's share of the capture loop: every ``world``-th window of each phase, from ``rank`` on.

    The phases are those of one process (the fit on the first ``split`` batches' windows, the
    candidates' restore errors on the rest), so the all-reduced sums are the single process's, added
    in another order. With a single batch the fit and the measurement share its windows, as on one
    process: they are prefilled once for the fit and once more for the measurement.
    """
    rank, world = group
    measuring = len(phases) > 1
    fit_part = windows[: max(split, 1) * batch_size] if measuring else windows
    measured_part = windows[split * batch_size :] if measuring else windows[:0]
    shared = measuring and split == 0
    own_fit, own_measured = fit_part[rank::world], measured_part[rank::world]
    own = own_fit.shape[0] + (0 if shared else own_measured.shape[0])
    log(f"data-parallel: process {rank} of {world} captures {own} of {windows.shape[0]} calibration windows")
    listener = capture.query_listener(sink_tokens)
    for _, _, kv in prefill_batches(model, own_fit, batch_size=batch_size, progress=progress, desc=phases[0][1],
                                    on_queries=listener):
        stats.add(kv, sink_tokens)
        capture.add_fit(kv, sink_tokens)
    if not measuring:
        return
    capture.start_measurement()  # collective: the first half's fit statistics all-reduce
    log(f"measuring the restore error of {len(capture.runs)} candidate groups × their options on "
        f"{measured_part.shape[0]} windows ({own_measured.shape[0]} here; the first half fitted the tensors)")
    for _, _, kv in prefill_batches(model, own_measured, batch_size=batch_size, progress=progress,
                                    desc=phases[1][1], on_queries=None if shared else listener):
        if not shared:
            stats.add(kv, sink_tokens)
        capture.add_measured(kv, sink_tokens)
        if not shared:
            capture.add_fit(kv, sink_tokens)


def _from_rank0(compute: Callable[[], object]):
    """``compute()`` on rank 0, its (picklable) result on every process of ``torch.distributed``."""
    import torch.distributed as dist

    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_calibration_data(data: str | os.PathLike) -> list[Sample]:
    """The samples of a calibration data file, checked before any model loads.

    A ``.txt`` file is split into samples of whole paragraphs.

    Raises
    ------
    DataError
        Bad records (naming file and line), or fewer than 2 samples: one part calibrates, a held-out
        part verifies quality.
    """
    samples = read_samples(data, split_text_files=True)
    if len(samples) < 2:
        what = "text" if str(data).endswith(".txt") else "records"
        raise DataError(
            f"{data}: {len(samples)} sample; calibration needs at least 2 (one part calibrates, a held-out part "
            f"verifies quality): add {what}"
        )
    return samples


#: Probes and extension steps of a search whose runs come in variants (several ranks).
VARIANT_PROBES, VARIANT_EXTEND = 10, 16
#: Relative restore errors at which a run whose options save different amounts (low rank at several
#: ranks) gets a variant: per component, the option saving most within the level.
ERROR_LEVELS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.32, 0.48, 0.64)


def choose_candidates(capture: CalibrationCapture, defaults: Defaults, head_dim: int, *,
                      amortized_over: int | None = None, num_heads: int = 1,
                      merged_share: float = 1.0) -> dict[object, Candidate]:
    """Candidates of every run, by :attr:`Candidate.key`.

    ``amortized_over``: sequence-tokens a measured cache holds per layer (prefix length × batch). A
    method's sidecar tensors (e.g. a low-rank basis) are held once per cache; their float32 values,
    counted in layers' worth of KV of that many tokens, are subtracted from what an option saves
    (None: not counted). ``merged_share``: the share of those tokens a group stores merged (the
    rest is its exact residual window), which scales what an option saves. Both apply only when some
    run's options save different amounts (they decide between ranks there).

    Per run and component, the option with the least restore error at the profile's γ (the first one
    on ties, in the order the methods offer them): the run's candidate. Where a run's options save
    different amounts, one variant per level of :data:`ERROR_LEVELS`: per component, among the
    options within the level, the one that saves most (least error among those), or the least-error
    option when none is within it: both components at the level (variant ``"e0.04"``), and each
    component at the level beside the other's least-error option (``"k0.04"``, ``"v0.04"``: keys low
    rank beside values kept ``exact``, where the ``exact`` method is offered). Variants equal to an
    earlier candidate of the run are dropped.
    """
    errors = capture.errors
    # Counting the window and the tensors matters where it decides between ranks. Where every option
    # of a run saves alike (SLERP alone) it is left out: the window scales every candidate alike, and
    # alignment matrices cost 0.06-0.09 layers of 512 x 4 tokens; searches stay as they were.
    varied = any(len({o.method.saved_layers(o.params, len(key[0]), head_dim) for o in options}) > 1
                 for key, options in errors.options.items())
    if not varied:
        amortized_over, merged_share = None, 1.0
    out: dict[object, Candidate] = {}
    for layers in capture.runs:
        if (layers, "keys") not in errors.options:  # no method stores a group of this size here
            continue
        per_component = []
        for component in COMPONENTS:
            options = errors.options[layers, component]
            rel = [float(v) for v in errors.relative_error(layers, component)]
            saved = [o.method.saved_layers(o.params, len(layers), head_dim) * merged_share
                     - _tensor_layers(o, amortized_over, num_heads, head_dim) for o in options]
            least = min(range(len(options)), key=lambda i: rel[i])
            picks = [least]
            for level in ERROR_LEVELS:
                within = [i for i in range(len(options)) if rel[i] <= level]
                picks.append(max(within, key=lambda i: (saved[i], -rel[i], -i)) if within else least)
            per_component.append((options, rel, saved, picks))
        # Both components at one error level, then one component at each level beside the other's
        # least-error option (keys low rank beside exact values: keys compress far better).
        (k_least, *k_levels), (v_least, *v_levels) = per_component[0][3], per_component[1][3]
        picks = [("", (k_least, v_least))]
        picks += [(f"e{level:g}", pick) for level, pick in zip(ERROR_LEVELS, zip(k_levels, v_levels, strict=True),
                                                                strict=True)]
        picks += [(f"k{level:g}", (k, v_least)) for level, k in zip(ERROR_LEVELS, k_levels, strict=True)]
        picks += [(f"v{level:g}", (k_least, v)) for level, v in zip(ERROR_LEVELS, v_levels, strict=True)]
        seen: set[tuple[int, int]] = set()
        for variant, pick in picks:
            if pick in seen:
                continue
            seen.add(pick)
            chosen = []
            for (options, rel, saved, _), i in zip(per_component, pick, strict=True):
                settings = MergeSettings(params=options[i].params, method=options[i].method.name,
                                         gamma=defaults.gamma, retention=defaults.retention,
                                         sink_tokens=defaults.sink_tokens, pre_rope=options[i].pre_rope)
                chosen.append((settings, rel[i], saved[i]))
            (keys, k_err, k_saved), (values, v_err, v_saved) = chosen
            if (k_saved + v_saved) / 2 <= 0:
                continue
            candidate = Candidate(layers, keys, values, (k_err, v_err), (k_saved + v_saved) / 2, variant)
            out[candidate.key] = candidate
    return out


def _tensor_layers(option, tokens: int | None, num_heads: int, head_dim: int) -> float:
    """An option's sidecar values in layers' worth of KV (float32 against the float32 statistics)."""
    if not tokens or not option.tensors:
        return 0.0
    return sum(t.numel() for t in option.tensors.values()) / (tokens * num_heads * head_dim)


def _fitted_settings(settings: MergeSettings) -> MergeSettings:
    """The same settings with the method's fitted tensors switched on (SLERP: ``align``)."""
    return replace(settings, params=replace(settings.params, align=True))


def _known_method(name: str):
    from minicache.methods import get_method

    try:
        return get_method(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def _kinds_text() -> str:
    """``"16 prose, 16 docs, 16 code, 16 chat records"``."""
    return ", ".join(f"{n} {kind}" for kind, n in kinds().items()) + " records"


def resolve_output(out: str | os.PathLike) -> tuple[Path, Path]:
    """(profile file, report directory) for ``--out``: a .yaml file, or a directory (model dir too).

    Raises
    ------
    OSError
        ``out`` cannot take a profile: an existing file that is not YAML, a directory (or the nearest
        existing ancestor) that is not writable. Checked before any work.
    """
    out = Path(out)
    if out.suffix in (".yaml", ".yml"):
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory; allowed: a .yaml file or a directory path")
        check_writable_directory(out.parent, "--out")
        return out, out.parent
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is an existing file; allowed: a .yaml file or a directory")
    check_writable_directory(out, "--out")
    return out / PROFILE_FILENAME, out
