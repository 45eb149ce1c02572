"""Search over groups of 2..k adjacent layers, aligned or not, within a quality budget (issue 7).

The same probe → predict → select → verify loop as :mod:`minicache.calibrate.search`, over a
larger candidate set: every run of ``2..max_group_size`` adjacent layers, with each component
merged as it is or in the calibrated aligned frame (whichever restores the calibration tokens
with less error, measured out-of-sample by :class:`~minicache.calibrate.alignment.GroupStatistics`).

* **Settings per candidate**: pairs take the ``t`` of the grid with the smallest restore error;
  larger groups use uniform weights; ``γ`` is the profile default.
* **Prediction**: a Ridge regression of log damage on depth, the log restore errors of keys and
  values and ``log(k − 1)``, fitted on the probes (single-group measurements).
* **Selection**: cheapest predicted damage per layer saved first (a group of ``k`` layers stores
  one direction instead of ``k``: ``k − 1`` layers saved), non-overlapping, within the budget.
* **Verification**: the chosen set is measured with the real runtime on held-out windows and the
  prediction scale corrected, as in the pair search.
* **Extension**: from the best set that fits, single groups are added one measurement at a time
  (cheapest predicted first) and kept while the set stays within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from minicache.calibrate.alignment import GroupKey, GroupStatistics
from minicache.calibrate.search import Budget
from minicache.evaluate.quality import QualityResult
from minicache.profile import Defaults, MergeGroup, MergeProfile, MergeSettings


@dataclass(frozen=True)
class GroupCandidate:
    """One run of adjacent layers with the settings the statistics chose for it."""

    layers: tuple[int, ...]
    keys: MergeSettings
    values: MergeSettings
    restore_error: tuple[float, float]

    @property
    def size(self) -> int:
        return len(self.layers)

    @property
    def saved_layers(self) -> int:
        return self.size - 1

    def group(self) -> MergeGroup:
        return MergeGroup(self.layers, self.keys, self.values)

    def describe(self) -> str:
        flags = "".join(c for c, s in (("K", self.keys), ("V", self.values)) if s.align)
        return f"{self.layers[0]}-{self.layers[-1]}" + (f"[{flags}]" if flags else "")


@dataclass
class GroupSearchStep:
    kind: str  # "probe", "verify" or "extend"
    groups: tuple[tuple[int, ...], ...]
    result: QualityResult

    @property
    def pairs(self) -> tuple[int, ...]:
        # Compatibility with reports of the pair search: the first layer of each group.
        return tuple(g[0] for g in self.groups)

    def to_dict(self) -> dict:
        keys = ("ppl_increase", "kl_mean", "top1_agreement", "compression_ratio")
        return {
            "kind": self.kind,
            "groups": [list(g) for g in self.groups],
            **{k: self.result.to_dict()[k] for k in keys},
        }


@dataclass
class GroupSearchResult:
    chosen: tuple[GroupCandidate, ...]
    final: QualityResult | None
    steps: list[GroupSearchStep] = field(default_factory=list)
    predicted_damage: dict[int, float] = field(default_factory=dict)  # pairs only, by first layer (report)
    predicted: dict[tuple[int, ...], float] = field(default_factory=dict)
    candidates: dict[tuple[int, ...], GroupCandidate] = field(default_factory=dict)


def choose_group_candidates(
    groups: GroupStatistics, defaults: Defaults
) -> dict[tuple[int, ...], GroupCandidate]:
    """Per run of layers and component: aligned or not, and ``t`` for pairs, by least restore error at γ."""
    gi = min(range(len(groups.gammas)), key=lambda g: abs(groups.gammas[g] - defaults.gamma))
    gamma = groups.gammas[gi]
    by_layers: dict[tuple[int, ...], list[GroupKey]] = {}
    for key in groups.keys:
        by_layers.setdefault(key.layers, []).append(key)
    out = {}
    for layers, keys in by_layers.items():
        settings, errors = [], []
        for c in range(2):
            best = None
            for key in keys:
                err = groups.relative_error(key, c)[gi]  # [T]
                o = int(err.argmin())
                if best is None or float(err[o]) < best[0]:
                    best = (float(err[o]), key, groups.t_options(key)[o])
            err, key, t = best
            settings.append(
                MergeSettings(
                    t=defaults.t if t is None else t,
                    gamma=gamma,
                    retention=defaults.retention,
                    sink_tokens=defaults.sink_tokens,
                    align=key.aligned,
                )
            )
            errors.append(err)
        out[layers] = GroupCandidate(layers, settings[0], settings[1], (errors[0], errors[1]))
    return out


def _features(c: GroupCandidate, num_layers: int) -> list[float]:
    depth = (c.layers[0] + c.layers[-1]) / 2 / max(num_layers - 1, 1)
    return [
        depth,
        math.log(max(c.restore_error[0], 1e-9)),
        math.log(max(c.restore_error[1], 1e-9)),
        math.log(c.saved_layers),
    ]


def predict_group_damage(
    candidates: dict[tuple[int, ...], GroupCandidate],
    measured: dict[tuple[int, ...], float],
    num_layers: int,
    floor: float = 1e-6,
) -> dict[tuple[int, ...], float]:
    """Ridge fit of log damage on the probes; measured groups keep their measurement."""
    from sklearn.linear_model import Ridge

    probes = sorted(measured)
    if len(probes) < 3:
        worst = max(measured.values(), default=1.0)
        return {g: measured.get(g, worst) for g in candidates}
    model = Ridge(alpha=1e-2).fit(
        [_features(candidates[g], num_layers) for g in probes],
        [math.log(max(measured[g], floor)) for g in probes],
    )
    order = sorted(candidates)
    predicted = model.predict([_features(candidates[g], num_layers) for g in order])
    out = {g: float(math.exp(v)) for g, v in zip(order, predicted, strict=True)}
    out.update(measured)
    return out


def cheapest_first(
    candidates: dict[tuple[int, ...], GroupCandidate],
    predicted: dict[tuple[int, ...], float],
    exclude: set[tuple[int, ...]] = frozenset(),
) -> list[tuple[int, ...]]:
    """Candidates by predicted damage per saved layer (ties: deeper, then larger groups first)."""
    return sorted(
        (g for g in candidates if g not in exclude),
        key=lambda g: (max(predicted[g], 0.0) / candidates[g].saved_layers, -g[0], -len(g)),
    )


def select_groups(
    candidates: dict[tuple[int, ...], GroupCandidate],
    predicted: dict[tuple[int, ...], float],
    allowance: float,
    exclude: set[tuple[int, ...]] = frozenset(),
) -> list[tuple[int, ...]]:
    """Cheapest damage per saved layer first, non-overlapping, summed damage within ``allowance``."""
    used: set[int] = set()
    chosen, total = [], 0.0
    for g in cheapest_first(candidates, predicted):
        if g in exclude or used.intersection(g):
            continue
        cost = max(predicted[g], 0.0)
        if total + cost > allowance:
            continue
        chosen.append(g)
        used.update(g)
        total += cost
    return sorted(chosen)


def _probe_groups(candidates: dict[tuple[int, ...], GroupCandidate], count: int) -> list[tuple[int, ...]]:
    """Probes spread over depth, alternating sizes, always including the deepest pair."""
    sizes = sorted({len(g) for g in candidates})
    by_size = {s: sorted(g for g in candidates if len(g) == s) for s in sizes}
    probes: list[tuple[int, ...]] = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        runs = by_size[size]
        per_size = (count - 1 - i % len(sizes)) // len(sizes) + 1
        j = i // len(sizes)
        # deepest first, then spread towards the middle of the model
        pos = len(runs) - 1 - round(j * (len(runs) - 1) / max(per_size, 1) / 2)
        g = runs[max(0, min(len(runs) - 1, pos))]
        if g not in probes:
            probes.append(g)
    return probes


def group_search(
    groups: GroupStatistics,
    evaluate: Callable[[MergeProfile], QualityResult],
    defaults: Defaults,
    budget: Budget,
    num_layers: int,
    *,
    make_profile: Callable[[tuple[MergeGroup, ...]], MergeProfile],
    probes: int = 6,
    max_verify: int = 4,
    extend: int = 6,
    log: Callable[[str], None] = print,
) -> GroupSearchResult:
    """Probe → predict → select → verify → extend over groups of 2..k layers (see the module docstring).

    ``extend``: after the verified selection, at most this many single-group additions are
    measured, cheapest predicted damage per saved layer first; each one that keeps the set within
    the budget is kept. Damage does not add up exactly across groups, so a measured step from the
    best set found beats trusting the prediction for the whole set.
    """
    candidates = choose_group_candidates(groups, defaults)
    result = GroupSearchResult(chosen=(), final=None, candidates=candidates)

    def run(kind: str, chosen: list[tuple[int, ...]]) -> QualityResult:
        chosen = sorted(chosen)
        measured = evaluate(make_profile(tuple(candidates[g].group() for g in chosen)))
        result.steps.append(GroupSearchStep(kind, tuple(chosen), measured))
        log(
            f"  {kind:6s} groups {[candidates[g].describe() for g in chosen]}: "
            f"{budget.metric} {budget.value(measured):+.4f}, compression {measured.compression_ratio:.3f}x"
        )
        return measured

    measured: dict[tuple[int, ...], float] = {}
    for g in _probe_groups(candidates, probes):
        measured[g] = budget.value(run("probe", [g]))
    predicted = predict_group_damage(candidates, measured, num_layers)
    result.predicted = predicted
    result.predicted_damage = {g[0]: v for g, v in predicted.items() if len(g) == 2}

    scale = 1.0
    excluded = {g for g, v in measured.items() if v > budget.max}
    best: tuple[list[tuple[int, ...]], QualityResult] | None = None
    for g, v in measured.items():  # a probe that fits is a valid answer already
        if v <= budget.max and (best is None or candidates[g].saved_layers > _saved(best[0], candidates)):
            best = ([g], next(s.result for s in result.steps if s.groups == (g,)))
    tried: set[tuple[tuple[int, ...], ...]] = set()
    for _ in range(max_verify):
        chosen = select_groups(
            candidates, {g: v * scale for g, v in predicted.items()}, budget.max * 0.9, excluded
        )
        if not chosen or tuple(chosen) in tried:
            break
        tried.add(tuple(chosen))
        if len(chosen) == 1 and chosen[0] in measured:
            outcome = next(s.result for s in result.steps if s.groups == (chosen[0],))
        else:
            outcome = run("verify", chosen)
        predicted_sum = sum(predicted[g] for g in chosen)
        if budget.fits(outcome):
            if best is None or _saved(chosen, candidates) > _saved(best[0], candidates):
                best = (chosen, outcome)
            scale = max(budget.value(outcome), 1e-9) / max(predicted_sum, 1e-12)
        else:
            scale = budget.value(outcome) / max(predicted_sum, 1e-12) * 1.1
    if best is not None:
        tried_groups = 0
        for g in cheapest_first(candidates, predicted, exclude=excluded):
            if tried_groups >= extend:
                break
            if any(set(g) & set(c) for c in best[0]):
                continue
            tried_groups += 1
            chosen = sorted([*best[0], g])
            outcome = run("extend", chosen)
            if budget.fits(outcome):
                best = (chosen, outcome)
        result.chosen = tuple(candidates[g] for g in sorted(best[0]))
        result.final = best[1]
    return result


def _saved(chosen: list[tuple[int, ...]], candidates: dict[tuple[int, ...], GroupCandidate]) -> int:
    return sum(candidates[g].saved_layers for g in chosen)
