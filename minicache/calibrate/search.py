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
from minicache.runtime.cache import merged_bytes_per_token

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
    """One adjacent pair at one retention level γ, with the t the statistics chose per component.

    Attributes
    ----------
    restore_error : tuple[float, float]
        Relative restore error (error energy / KV energy) of keys and values at these settings.
    retained : float
        Fraction of tokens retention keeps exact at this γ (mean over heads, keys and values).
    """

    pair: int
    keys: MergeSettings
    values: MergeSettings
    restore_error: tuple[float, float]
    retained: float = 0.0

    @property
    def layers(self) -> tuple[int, int]:
        return (self.pair, self.pair + 1)

    def saving(self, head_dim: int = 64, dtype: torch.dtype = torch.float32) -> float:
        """Share of the pair's KV bytes that merging frees for merged tokens (negative: it costs).

        Uses the runtime's storage layout, so retained tokens and magnitudes are charged.
        """
        full = 2 * head_dim * torch.empty((), dtype=dtype).element_size()
        return 1.0 - merged_bytes_per_token(head_dim, dtype, self.retained) / full

    def group(self) -> MergeGroup:
        return MergeGroup(self.layers, self.keys, self.values)


@dataclass
class SearchStep:
    """One evaluation pass of the search."""

    kind: str  # "probe" or "verify"
    pairs: tuple[int, ...]
    result: QualityResult
    gammas: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "groups": [[p, p + 1] for p in self.pairs],
            "gammas": list(self.gammas),
            **{k: self.result.to_dict()[k] for k in ("ppl_increase", "kl_mean", "top1_agreement", "compression_ratio")},
        }


@dataclass
class SearchResult:
    chosen: tuple[Candidate, ...]
    final: QualityResult | None
    steps: list[SearchStep] = field(default_factory=list)
    predicted_damage: dict[int, float] = field(default_factory=dict)  # per pair, at the default γ
    candidates: dict[int, Candidate] = field(default_factory=dict)  # per pair, at the default γ


def _gamma_index(stats: PairStatistics, gamma: float) -> int:
    return min(range(len(stats.gammas)), key=lambda g: abs(stats.gammas[g] - gamma))


def choose_candidates(
    stats: PairStatistics, defaults: Defaults, gamma: float | None = None
) -> dict[int, Candidate]:
    """For every pair at retention ``gamma`` (default: the profile's), pick per component the t of
    the grid with the smallest restore error."""
    gamma_index = _gamma_index(stats, defaults.gamma if gamma is None else gamma)
    gamma = stats.gammas[gamma_index]
    errors = stats.relative_error()[:, :, gamma_index, :]  # [P, 2, T]
    retained = stats.retained_fraction()[..., gamma_index].mean(dim=(1, 2))  # [P]
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
        out[pair] = Candidate(pair, settings[0], settings[1], (restore_error[0], restore_error[1]),
                              float(retained[pair]))
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
    out = {p: float(math.exp(v)) for p, v in zip(sorted(candidates), predicted, strict=True)}
    out.update(measured)
    return out


def scale_to_gamma(base: Candidate, other: Candidate, damage: float) -> float:
    """Damage of ``other`` (same pair, another γ) from the damage of ``base``.

    Retaining more tokens removes their restore error; the damage is taken proportional to the
    remaining restore error energy, which the statistics give for every γ of the grid.
    """
    before = sum(base.restore_error)
    after = sum(other.restore_error)
    return damage * (after / before if before > 0 else 1.0)


Option = tuple[int, int]  # (pair, index into the γ grid)


def select_options(
    predicted: dict[Option, float],
    saving: dict[Option, float],
    allowance: float,
    exclude: set[Option] = frozenset(),
) -> list[Option]:
    """Non-overlapping pairs (one γ each) with the most memory saved per unit of predicted damage,
    greedily, while the summed predicted damage stays within ``allowance``."""
    chosen: list[Option] = []
    total = 0.0

    def value(option: Option) -> tuple[float, int, int]:
        damage = max(predicted[option], 1e-12)
        return (-saving[option] / damage, -option[0], option[1])

    for option in sorted(predicted, key=value):
        pair = option[0]
        if option in exclude or saving[option] <= 0.1 or any(abs(pair - c[0]) < 2 for c in chosen):
            continue
        if total + max(predicted[option], 0.0) > allowance:
            continue
        chosen.append(option)
        total += max(predicted[option], 0.0)
    return sorted(chosen)


def select_pairs(predicted: dict[int, float], allowance: float, exclude: set[int] = frozenset()) -> list[int]:
    """Cheapest-first non-overlapping pairs whose summed predicted damage stays within ``allowance``."""
    options = select_options(
        {(p, 0): v for p, v in predicted.items()},
        {(p, 0): 1.0 for p in predicted},
        allowance,
        {(p, 0) for p in exclude},
    )
    return [p for p, _ in options]


def search(
    stats: PairStatistics,
    evaluate: Callable[[MergeProfile], QualityResult],
    defaults: Defaults,
    budget: Budget,
    *,
    make_profile: Callable[[tuple[MergeGroup, ...]], MergeProfile],
    probes: int = 6,
    max_verify: int = 5,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run the probe → predict → select → verify search.

    1. Probes: a few single pairs, spread over depth, merged at the default γ and measured.
    2. Predict: a regression from depth and restore error to log damage predicts every pair at the
       default γ; other γ of the statistics' grid scale it by their remaining restore error.
    3. Select: non-overlapping pairs and one γ each, most memory per predicted damage first,
       within 90 % of the budget.
    4. Verify with the real runtime; rescale the predictions by what was measured and select again,
       keeping the measured set that fits the budget and saves the most.

    Parameters
    ----------
    evaluate : callable
        Measures a profile on the held-out windows (the calibrator passes
        :func:`minicache.evaluate.quality.evaluate_profile` bound to its data).
    make_profile : callable
        Builds a full profile from groups (adds defaults and the model fingerprint).
    """
    base_index = _gamma_index(stats, defaults.gamma)
    levels = [g for g in range(len(stats.gammas)) if stats.gammas[g] >= stats.gammas[base_index]]
    by_gamma = {g: choose_candidates(stats, defaults, stats.gammas[g]) for g in levels}
    candidates = by_gamma[base_index]
    result = SearchResult(chosen=(), final=None, candidates=candidates)

    def run(kind: str, options: list[Option]) -> QualityResult:
        chosen = [by_gamma[g][p] for p, g in sorted(options)]
        measured = evaluate(make_profile(tuple(c.group() for c in chosen)))
        gammas = tuple(stats.gammas[g] for _, g in sorted(options))
        result.steps.append(SearchStep(kind, tuple(p for p, _ in sorted(options)), measured, gammas))
        shown = ", ".join(f"{list(c.layers)}@γ{c.keys.gamma:g}" for c in chosen)
        log(
            f"  {kind:6s} {shown}: {budget.metric} {budget.value(measured):+.4f}, "
            f"compression {measured.compression_ratio:.3f}x"
        )
        return measured

    measured: dict[Option, QualityResult] = {}
    for pair in _probe_pairs(len(candidates), probes):
        measured[(pair, base_index)] = run("probe", [(pair, base_index)])
    base_predicted = predict_damage(candidates, {p: budget.value(r) for (p, _), r in measured.items()})
    result.predicted_damage = base_predicted
    predicted = {
        (p, g): scale_to_gamma(candidates[p], by_gamma[g][p], base_predicted[p]) for p in candidates for g in levels
    }
    for option, outcome in measured.items():
        predicted[option] = budget.value(outcome)
    saving = {(p, g): by_gamma[g][p].saving(head_dim, dtype) for p, g in predicted}

    fitting = [([o], r) for o, r in measured.items() if budget.fits(r)]
    best = max(fitting, key=lambda item: item[1].compression_ratio, default=None)
    # Damage is not exactly additive; aim below the budget and correct with measurements.
    scale = 1.0
    tried: set[tuple[Option, ...]] = set()
    for _ in range(max_verify):
        scaled = {o: v * (1.0 if o in measured else scale) for o, v in predicted.items()}
        options = select_options(scaled, saving, budget.max * 0.9)
        if not options or tuple(options) in tried:
            break
        tried.add(tuple(options))
        outcome = measured[options[0]] if len(options) == 1 and options[0] in measured else run("verify", options)
        predicted_sum = sum(scaled[o] for o in options)
        if budget.fits(outcome):
            if best is None or outcome.compression_ratio > best[1].compression_ratio:
                best = (options, outcome)
            # Room left: believe the measurement and try a larger set.
            scale *= max(budget.value(outcome), 1e-9) / max(predicted_sum, 1e-12)
        else:
            scale *= max(budget.value(outcome), 1e-9) / max(predicted_sum, 1e-12) * 1.1
    if best is not None:
        result.chosen = tuple(by_gamma[g][p] for p, g in best[0])
        result.final = best[1]
    return result
