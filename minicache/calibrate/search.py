"""Search: which adjacent pairs to merge, with which t and γ, within a quality budget.

The statistics cannot tell alone how much a pair hurts the model: restore errors are similar across
depth while deeper layers matter less. So the search measures a few single-pair merges (probes),
fits a regression from statistics and depth to measured damage (scikit-learn), predicts the damage
of every other pair, picks the cheapest non-overlapping pairs whose predicted damage fits the
budget, and verifies the choice with the real runtime on held-out data, dropping or adding pairs
until the measurement fits. A search costs a handful of evaluation passes, not one per pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minicache.calibrate.statistics import PairStatistics
from minicache.evaluate.quality import QualityResult
from minicache.profile import Defaults, MergeGroup, MergeProfile, MergeSettings

METRICS = ("ppl_increase", "kl_mean")


@dataclass(frozen=True)
class Budget:
    """Largest acceptable quality loss on held-out data (``ppl_increase`` 0.01 = +1 %)."""

    metric: str = "ppl_increase"
    max: float = 0.01

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"budget metric {self.metric!r} is not one of {METRICS}")
        if not (self.max > 0 and math.isfinite(self.max)):
            raise ValueError(f"budget max must be a positive number, got {self.max}")

    def value(self, result: QualityResult) -> float:
        return float(getattr(result, self.metric))

    def fits(self, result: QualityResult) -> bool:
        return self.value(result) <= self.max


@dataclass(frozen=True)
class Candidate:
    """One adjacent pair with the settings the statistics chose for it."""

    pair: int
    keys: MergeSettings
    values: MergeSettings
    restore_error: tuple[float, float]  # relative restore error of keys and values at these settings

    @property
    def layers(self) -> tuple[int, int]:
        return (self.pair, self.pair + 1)

    def group(self) -> MergeGroup:
        return MergeGroup(self.layers, self.keys, self.values)


@dataclass
class SearchStep:
    """One evaluation pass of the search."""

    kind: str  # "probe" or "verify"
    pairs: tuple[int, ...]
    result: QualityResult

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "groups": [[p, p + 1] for p in self.pairs],
            **{k: self.result.to_dict()[k] for k in ("ppl_increase", "kl_mean", "top1_agreement", "compression_ratio")},
        }


@dataclass
class SearchResult:
    chosen: tuple[Candidate, ...]
    final: QualityResult | None
    steps: list[SearchStep] = field(default_factory=list)
    predicted_damage: dict[int, float] = field(default_factory=dict)
    candidates: dict[int, Candidate] = field(default_factory=dict)


def choose_candidates(stats: PairStatistics, defaults: Defaults) -> dict[int, Candidate]:
    """For every pair, pick per component the t of the grid with the smallest restore error at γ."""
    gamma_index = min(range(len(stats.gammas)), key=lambda g: abs(stats.gammas[g] - defaults.gamma))
    gamma = stats.gammas[gamma_index]
    errors = stats.relative_error()[:, :, gamma_index, :]  # [P, 2, T]
    out = {}
    for pair in range(errors.shape[0]):
        settings, restore_error = [], []
        for component in range(2):
            best = int(torch.argmin(errors[pair, component]))
            settings.append(
                MergeSettings(
                    t=stats.ts[best], gamma=gamma, retention=defaults.retention, sink_tokens=defaults.sink_tokens
                )
            )
            restore_error.append(float(errors[pair, component, best]))
        out[pair] = Candidate(pair, settings[0], settings[1], (restore_error[0], restore_error[1]))
    return out


def _features(candidate: Candidate, num_pairs: int) -> list[float]:
    depth = candidate.pair / max(num_pairs - 1, 1)
    return [depth, math.log(max(candidate.restore_error[0], 1e-9)), math.log(max(candidate.restore_error[1], 1e-9))]


def _probe_pairs(num_pairs: int, count: int) -> list[int]:
    if count >= num_pairs:
        return list(range(num_pairs))
    # Spread over depth, always including the deepest pair (usually the cheapest to merge).
    return sorted({round(i * (num_pairs - 1) / (count - 1)) for i in range(count)}) if count > 1 else [num_pairs - 1]


def predict_damage(
    candidates: dict[int, Candidate], measured: dict[int, float], floor: float = 1e-6
) -> dict[int, float]:
    """Fit log(damage) ~ depth + log restore errors on the probes; predict every pair.

    Measured pairs keep their measurement. With fewer than 3 probes, the prediction is the
    largest measured damage (conservative).
    """
    from sklearn.linear_model import Ridge

    num_pairs = len(candidates)
    pairs = sorted(measured)
    if len(pairs) < 3:
        worst = max(measured.values(), default=1.0)
        return {p: measured.get(p, worst) for p in candidates}
    x = [_features(candidates[p], num_pairs) for p in pairs]
    y = [math.log(max(measured[p], floor)) for p in pairs]
    model = Ridge(alpha=1e-3).fit(x, y)
    predicted = model.predict([_features(candidates[p], num_pairs) for p in sorted(candidates)])
    out = {p: float(math.exp(v)) for p, v in zip(sorted(candidates), predicted)}
    out.update(measured)
    return out


def select_pairs(predicted: dict[int, float], allowance: float, exclude: set[int] = frozenset()) -> list[int]:
    """Cheapest-first non-overlapping pairs whose summed predicted damage stays within ``allowance``."""
    chosen: list[int] = []
    total = 0.0
    for pair in sorted(predicted, key=lambda p: (predicted[p], -p)):
        if pair in exclude or any(abs(pair - c) < 2 for c in chosen):
            continue
        if total + max(predicted[pair], 0.0) > allowance:
            continue
        chosen.append(pair)
        total += max(predicted[pair], 0.0)
    return sorted(chosen)


def search(
    stats: PairStatistics,
    evaluate: Callable[[MergeProfile], QualityResult],
    defaults: Defaults,
    budget: Budget,
    *,
    make_profile: Callable[[tuple[MergeGroup, ...]], MergeProfile],
    probes: int = 6,
    max_verify: int = 4,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run the probe → predict → select → verify search.

    Parameters
    ----------
    evaluate : callable
        Measures a profile on the held-out windows (the calibrator passes
        :func:`minicache.evaluate.quality.evaluate_profile` bound to its data).
    make_profile : callable
        Builds a full profile from groups (adds defaults and the model fingerprint).
    """
    candidates = choose_candidates(stats, defaults)
    result = SearchResult(chosen=(), final=None, candidates=candidates)

    def run(kind: str, pairs: list[int]) -> QualityResult:
        groups = tuple(candidates[p].group() for p in sorted(pairs))
        measured = evaluate(make_profile(groups))
        result.steps.append(SearchStep(kind, tuple(sorted(pairs)), measured))
        log(
            f"  {kind:6s} groups {[list(candidates[p].layers) for p in sorted(pairs)]}: "
            f"{budget.metric} {budget.value(measured):+.4f}, compression {measured.compression_ratio:.3f}x"
        )
        return measured

    measured: dict[int, float] = {}
    for pair in _probe_pairs(len(candidates), probes):
        measured[pair] = budget.value(run("probe", [pair]))
    predicted = predict_damage(candidates, measured)
    result.predicted_damage = predicted

    # Damage is not exactly additive; aim below the budget and correct with measurements.
    scale = 1.0
    excluded: set[int] = {p for p, v in measured.items() if v > budget.max}
    best: tuple[list[int], QualityResult] | None = None
    tried: set[tuple[int, ...]] = set()
    for _ in range(max_verify):
        scaled = {p: v * scale for p, v in predicted.items()}
        pairs = select_pairs(scaled, budget.max * 0.9, excluded)
        if not pairs or tuple(pairs) in tried:
            break
        tried.add(tuple(pairs))
        if len(pairs) == 1 and pairs[0] in measured:
            outcome = next(s.result for s in result.steps if s.pairs == (pairs[0],))
        else:
            outcome = run("verify", pairs)
        predicted_sum = sum(predicted[p] for p in pairs)
        if budget.fits(outcome):
            if best is None or len(pairs) > len(best[0]):
                best = (pairs, outcome)
            # Room left: believe the measurement and try a larger set.
            scale = max(budget.value(outcome), 1e-9) / max(predicted_sum, 1e-12)
        else:
            scale = budget.value(outcome) / max(predicted_sum, 1e-12) * 1.1
    if best is not None:
        result.chosen = tuple(candidates[p] for p in best[0])
        result.final = best[1]
    return result
