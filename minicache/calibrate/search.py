"""The search: which groups of adjacent layers to merge, how, within a quality budget.

One loop over candidates, whatever merge methods supply them:

* **Candidates**: every run of adjacent layers (``2..max_group_size``; from 1 where a method stores
  single layers); per component (keys, values), the option with the least measured restore error
  among every method's parameter options (:meth:`~minicache.methods.MergeMethod.param_options`:
  SLERP offers its ``t`` grid for pairs, with and without calibrated alignment), at the profile's
  retention ``γ``. Where options of one run save different amounts (low-rank at several ranks),
  the run also gets *variants*: per error level, the option saving most within it
  (:func:`minicache.calibrate.api.choose_candidates`). Variants of one run overlap; at most one is chosen.
* **Probes**: a few single-candidate profiles, spread over depth, sizes and variants, measured with
  the real runtime on held-out windows.
* **Prediction**: the statistics cannot tell alone how much a group hurts the model (restore errors
  are similar across depth while deeper layers matter less), so a Ridge regression of log damage on
  depth, the log restore errors of keys and values and ``log(saved layers)``, fitted on the probes,
  predicts every candidate.
* **Selection**: cheapest predicted damage per saved layer first (ties: deeper, then larger groups),
  non-overlapping, summed within 90 % of the budget; a run with variants climbs its convex hull of
  (saved, damage) step by step in the same order (a greedy multiple-choice knapsack). The prediction
  is of the point estimate; a scale turns it into the upper end of the interval, which is what must
  fit (:class:`Budget`).
* **Verification**: the chosen set is measured and the scale corrected, a few times.
* **Extension**: from the best set that fits, groups are added (or a chosen run moved one variant
  up, to a lower rank), cheapest predicted step first, and kept while the set stays within the
  budget: damage does not add up exactly across groups, so a measured step from the best set beats
  trusting the prediction. Steps are taken galloping: one, then twice as many per measurement after
  each set that fits, half as many after one that does not, down to a single step, which is then
  ruled out.

Every decision reads the upper end of the measured 95 % interval, so a set is accepted only when the
held-out windows resolve it within the budget; one they cannot resolve is refused, never accepted on
its point estimate.

A search costs a handful of evaluation passes, not one per candidate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from minicache.evaluate.quality import QualityResult
from minicache.profile import MergeGroup, MergeProfile, MergeSettings

__all__ = [
    "METRICS",
    "Budget",
    "Candidate",
    "SearchResult",
    "SearchStep",
    "cheapest_first",
    "predict_damage",
    "probe_candidates",
    "search",
    "select_groups",
]

METRICS = ("ppl_increase", "kl_mean")
#: Verification rounds and single-group extensions of a search (see :func:`search`).
MAX_VERIFY, EXTEND = 4, 6


@dataclass(frozen=True)
class Budget:
    """Largest acceptable quality loss on held-out data (``ppl_increase`` 0.01 = +1 %).

    A result fits when the upper end of its 95 % interval (bootstrap over the held-out windows) is
    within ``max``, not merely its point estimate: the search measures many candidates on the same
    windows and keeps the one that saves most, so a point estimate that happened to come out low
    would be picked for its luck (the winner's curse). A result without an interval (a single
    window) cannot resolve the budget and never fits.

    Attributes
    ----------
    metric : str
        ``"ppl_increase"`` (relative) or ``"kl_mean"`` (nats per token).
    max : float
        The budget, in the metric's unit.
    kl_guard : float
        Perplexity budgets only; 0 turns it off. The held-out interval covers text like the calibration
        data; on a kind of text the data lacks, the loss rose up to about 3.7 times the held-out KL's upper
        end on the texts we measured: the KL itself moves, and the loss rises faster than the KL there
        (README, "What a profile promises"). With a guard ``R``, ``expm1(R * KL)`` (the perplexity
        increase if the loss rose ``R`` times the KL) must fit the budget as well: a promise meant for
        text nobody measured.
    """

    metric: str = "ppl_increase"
    max: float = 0.01
    kl_guard: float = 0.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"budget metric {self.metric!r} is not one of {METRICS}")
        if not (self.max > 0 and math.isfinite(self.max)):
            raise ValueError(f"budget max must be a positive number, got {self.max}")
        if not (self.kl_guard >= 0 and math.isfinite(self.kl_guard)):
            raise ValueError(f"the KL guard must be a number >= 0 (0: off), got {self.kl_guard}")
        if self.kl_guard and self.metric != "ppl_increase":
            raise ValueError("the KL guard bounds a perplexity budget; a KL budget needs none")

    def guard_bound(self, kl: float) -> float:
        """``expm1(kl_guard * kl)``: the perplexity increase if the loss rose ``kl_guard`` times ``kl``."""
        return math.expm1(min(self.kl_guard * kl, 700.0))  # 700: no overflow for absurd guards

    def _guarded(self, ppl: float, kl: float) -> float:
        return max(ppl, self.guard_bound(kl)) if self.kl_guard else ppl

    def value(self, result: QualityResult) -> float:
        """The point estimate of the budget's metric (with a KL guard: the larger of the two)."""
        return self._guarded(float(getattr(result, self.metric)), float(result.kl_mean))

    def upper(self, result: QualityResult) -> float:
        """The upper end of the metric's 95 % interval (``inf`` without one; with a KL guard, the larger of
        it and the guard at the KL's upper end)."""
        interval = getattr(result, f"{self.metric}_ci95")
        if interval is None:
            return math.inf
        if not self.kl_guard:
            return float(interval[1])
        kl_interval = result.kl_mean_ci95
        return math.inf if kl_interval is None else self._guarded(float(interval[1]), float(kl_interval[1]))

    def fits(self, result: QualityResult) -> bool:
        return self.upper(result) <= self.max

    def describe(self, result: QualityResult) -> str:
        """``"ppl_increase +0.0041 (upper +0.0072)"``: the point and the bound the decision uses."""
        text = f"{self.metric} {self.value(result):+.4f} (upper {self.upper(result):+.4f})"
        if self.kl_guard:  # the value is the larger of the two: say what each was
            text = (f"guarded {text} [ppl {result.ppl_increase:+.4f}, expm1({self.kl_guard:g} x KL "
                    f"{result.kl_mean:.4f}) {self.guard_bound(result.kl_mean):+.4f}]")
        return text

    def to_dict(self) -> dict:
        """As the profile records it (``calibration.budget``)."""
        return {"metric": self.metric, "max": self.max, **({"kl_guard": self.kl_guard} if self.kl_guard else {})}


@dataclass(frozen=True)
class Candidate:
    """One run of adjacent layers with the settings the statistics chose for its keys and values.

    Attributes
    ----------
    restore_error : tuple[float, float]
        Relative restore error (error energy / KV energy) of keys and values at these settings.
    saved_layers : float
        Layers' worth of KV merging saves (SLERP: ``k − 1``; low rank: ``k − rank / head_dim``).
    variant : str
        ``""`` for the run's least-error settings; otherwise the error level of a cheaper variant
        (``"e0.04"``: both components at that level; ``"k0.04"`` / ``"v0.04"``: keys / values alone).
        The search's dictionaries key a variant by ``(layers, variant)``.
    """

    layers: tuple[int, ...]
    keys: MergeSettings
    values: MergeSettings
    restore_error: tuple[float, float]
    saved_layers: float
    variant: str = ""

    @property
    def size(self) -> int:
        return len(self.layers)

    @property
    def key(self) -> tuple:
        """Its key in the search's dictionaries: the layers, or ``(layers, variant)`` for a variant."""
        return self.layers if not self.variant else (self.layers, self.variant)

    def group(self) -> MergeGroup:
        return MergeGroup(self.layers, self.keys, self.values)

    def describe(self) -> str:
        """``"25-26[KV]"``: layers, and which components use fitted tensors (e.g. alignment)."""
        flags = "".join(c for c, s in (("K", self.keys), ("V", self.values)) if s.tensor_names)
        methods = {s.method for s in (self.keys, self.values)}
        text = f"{self.layers[0]}-{self.layers[-1]}" + (f"[{flags}]" if flags else "")
        if methods <= {"slerp", "average"}:
            shown = "" if methods == {"slerp"} else "/".join(sorted(methods))
            return f"{text}({shown})" if shown else text
        return f"{text}(K {_short(self.keys)}, V {_short(self.values)})"


def _short(settings: MergeSettings) -> str:
    """``"lowrank r16 joint"`` / ``"slerp"``: a component's method in a few words."""
    params = settings.params
    if hasattr(params, "rank"):
        return f"{settings.method} r{params.rank} {params.heads}"
    return settings.method


@dataclass
class SearchStep:
    """One evaluation pass of the search: the groups' layers and how each was stored."""

    kind: str  # "probe", "verify" or "extend"
    groups: tuple[tuple[int, ...], ...]
    result: QualityResult
    settings: tuple[str, ...] = ()  # Candidate.describe() of each group

    def to_dict(self) -> dict:
        keys = ("ppl_increase", "ppl_increase_ci95", "kl_mean", "kl_mean_ci95", "top1_agreement", "compression_ratio")
        return {"kind": self.kind, "groups": [list(g) for g in self.groups], "settings": list(self.settings),
                **{k: self.result.to_dict()[k] for k in keys}}


@dataclass
class SearchResult:
    chosen: tuple[Candidate, ...]
    final: QualityResult | None
    steps: list[SearchStep] = field(default_factory=list)
    predicted: dict[Hashable, float] = field(default_factory=dict)
    candidates: dict[Hashable, Candidate] = field(default_factory=dict)

    @property
    def predicted_damage(self) -> dict[int, float]:
        """Predicted (or measured) damage of merging each adjacent pair alone (its least-error
        settings), by its first layer."""
        out = {}
        for g, v in self.predicted.items():
            c = self.candidates.get(g)
            layers, variant = (c.layers, c.variant) if c is not None else (tuple(g), "")  # keyed by layers
            if len(layers) == 2 and not variant:
                out[layers[0]] = v
        return out


def _order(candidates: dict[Hashable, Candidate]):
    """Sort key of candidate keys: by layers, then variant (keys of mixed kinds never compare)."""
    return lambda g: (candidates[g].layers, candidates[g].variant)


#: Restore errors below this count as this in the prediction: a component kept ``exact`` (error 0)
#: would otherwise sit far outside the range the probes span (log 1e-9 against log 0.01..0.6) and the
#: linear model would extrapolate its damage to nothing.
ERROR_FLOOR = 1e-3


def _features(c: Candidate, num_layers: int) -> list[float]:
    depth = (c.layers[0] + c.layers[-1]) / 2 / max(num_layers - 1, 1)
    return [
        depth,
        math.log(max(c.restore_error[0], ERROR_FLOOR)),
        math.log(max(c.restore_error[1], ERROR_FLOOR)),
        math.log(c.saved_layers),
    ]


def predict_damage(
    candidates: dict[Hashable, Candidate],
    measured: dict[Hashable, float],
    num_layers: int,
    floor: float = 1e-6,
) -> dict[Hashable, float]:
    """Ridge fit of log damage on the probes; measured candidates keep their measurement.

    With fewer than 3 probes the prediction is the largest measured damage (conservative).
    """
    from sklearn.linear_model import Ridge

    order = sorted(candidates, key=_order(candidates))
    probes = [g for g in order if g in measured]
    if len(probes) < 3:
        worst = max(measured.values(), default=1.0)
        return {g: measured.get(g, worst) for g in candidates}
    model = Ridge(alpha=1e-2).fit(
        [_features(candidates[g], num_layers) for g in probes],
        [math.log(max(measured[g], floor)) for g in probes],
    )
    predicted = model.predict([_features(candidates[g], num_layers) for g in order])
    out = {g: float(math.exp(v)) for g, v in zip(order, predicted, strict=True)}
    out.update(measured)
    return out


def cheapest_first(
    candidates: dict[Hashable, Candidate],
    predicted: dict[Hashable, float],
    exclude: set[Hashable] = frozenset(),
) -> list[Hashable]:
    """Candidates by predicted damage per saved layer (ties: deeper, then larger groups first)."""
    return sorted(
        (g for g in candidates if g not in exclude),
        key=lambda g: (max(predicted[g], 0.0) / candidates[g].saved_layers, -candidates[g].layers[0],
                       -candidates[g].size, candidates[g].variant),
    )


def _increments(
    candidates: dict[Hashable, Candidate], predicted: dict[Hashable, float], exclude: set[Hashable]
) -> list[tuple[float, int, int, str, Hashable, float, float]]:
    """Every run's steps up its lower convex hull of (saved layers, predicted damage), from nothing.

    Returns ``(damage per saved layer, -first layer, -size, variant, key, Δdamage, Δsaved)`` per step,
    cheapest first (a run's steps come out in hull order because their efficiencies increase).
    """
    runs: dict[tuple[int, ...], list[Hashable]] = {}
    for g, c in candidates.items():
        if g not in exclude:
            runs.setdefault(c.layers, []).append(g)
    steps = []
    for layers, keys in runs.items():
        points = sorted(((*_point(g, candidates, predicted), g) for g in keys), key=lambda p: (p[0], p[1]))
        hull: list[tuple[float, float, Hashable | None]] = [(0.0, 0.0, None)]
        for point in points:
            if point[0] <= hull[-1][0]:
                continue  # saves no more than a cheaper variant already on the hull
            # drop the last hull point while it lies on or above the segment from the one before to this one
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0]) >= (
                    point[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
                hull.pop()
            hull.append(point)
        for (saved0, cost0, _), (saved, cost, g) in itertools.pairwise(hull):
            c = candidates[g]
            steps.append(((cost - cost0) / (saved - saved0), -layers[0], -c.size, c.variant, g, cost - cost0,
                          saved - saved0))
    steps.sort(key=lambda s: s[:4])
    return steps


def _point(g: Hashable, candidates: dict[Hashable, Candidate], predicted: dict[Hashable, float]):
    return candidates[g].saved_layers, max(predicted[g], 0.0)


def select_groups(
    candidates: dict[Hashable, Candidate],
    predicted: dict[Hashable, float],
    allowance: float,
    exclude: set[Hashable] = frozenset(),
) -> list[Hashable]:
    """Most saved layers within ``allowance`` of summed predicted damage, non-overlapping.

    A greedy multiple-choice knapsack: runs are taken cheapest damage per saved layer first (ties:
    deeper, then larger groups); a run with variants (several ranks) climbs its convex hull of
    (saved, damage) one step at a time, in the same order, so a cheap run is stored at the variant
    whose next step up is no longer worth its damage. With one variant per run this is "cheapest
    damage per saved layer first, non-overlapping".
    """
    used: set[int] = set()
    at: dict[tuple[int, ...], Hashable] = {}  # run -> its variant so far
    blocked: set[tuple[int, ...]] = set()
    total = 0.0
    for *_, g, d_cost, _ in _increments(candidates, predicted, set(exclude)):
        layers = candidates[g].layers
        if layers in blocked:
            continue
        if layers not in at and used.intersection(layers):
            blocked.add(layers)
            continue
        if total + d_cost > allowance:
            blocked.add(layers)  # its later steps cost more per layer: stop this run here
            continue
        at[layers] = g
        used.update(layers)
        total += d_cost
    return sorted(at.values(), key=_order(candidates))


def probe_candidates(candidates: dict[Hashable, Candidate], count: int) -> list[Hashable]:
    """Probes spread over depth, alternating kinds, always including the deepest run of the first kind.

    Kinds are group sizes; with variants (several ranks per run), every (variant, size) is a kind,
    the least-error ones first and the rest sampled evenly, and depth is spread over the probes as
    a whole (deepest first, down to the shallowest) so that the prediction sees both how damage grows
    with the variant and how it grows towards the shallow layers (a lower rank there is not
    predictable from the deep layers alone).
    """
    order = _order(candidates)
    kinds = sorted({(c.variant, c.size) for c in candidates.values()}, key=lambda k: (k[0] != "", k[0], k[1]))
    varied = any(variant for variant, _ in kinds)
    if varied and len(kinds) > count:  # the least-error kinds, then variants sampled evenly
        base = [k for k in kinds if not k[0]]
        rest = [k for k in kinds if k[0]]
        room = max(count - len(base), 1)
        kinds = list(dict.fromkeys(base + [rest[round(i * (len(rest) - 1) / max(room - 1, 1))] for i in range(room)]))
    by_kind = {k: sorted((g for g, c in candidates.items() if (c.variant, c.size) == k), key=order) for k in kinds}
    probes: list[Hashable] = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        runs = by_kind[kind]
        if varied:  # depth spread over all probes, deepest to shallowest
            pos = len(runs) - 1 - round(i * (len(runs) - 1) / max(count - 1, 1))
        else:
            per_kind = (count - 1 - i % len(kinds)) // len(kinds) + 1
            j = i // len(kinds)
            # deepest first, then spread towards the middle of the model
            pos = len(runs) - 1 - round(j * (len(runs) - 1) / max(per_kind, 1) / 2)
        g = runs[max(0, min(len(runs) - 1, pos))]
        if g not in probes:
            probes.append(g)
    return probes


def search(
    candidates: dict[Hashable, Candidate],
    evaluate: Callable[[MergeProfile], QualityResult],
    budget: Budget,
    num_layers: int,
    *,
    make_profile: Callable[[tuple[MergeGroup, ...]], MergeProfile],
    probes: int = 6,
    max_verify: int = MAX_VERIFY,
    extend: int = EXTEND,
    damage_floor: float = 1e-6,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Probe → predict → select → verify → extend (see the module docstring).

    Parameters
    ----------
    candidates : dict
        Candidate groups by key (:attr:`Candidate.key`; :func:`minicache.calibrate.api.choose_candidates`
        builds them).
    evaluate : callable
        Measures a profile on the held-out windows (the calibrator passes
        :func:`minicache.evaluate.quality.evaluate_profile` bound to its data).
    make_profile : callable
        Builds a full profile from groups (adds defaults, fitted tensors and the model fingerprint).
    extend : int
        After the verified selection, at most this many extended sets are measured (each adds one or
        more steps, galloping).
    damage_floor : float
        Measured damage below this counts as this in the prediction's log scale (a probe that
        measured -0.1 % on a few windows is noise, not a damage of 1e-6).
    """
    result = SearchResult(chosen=(), final=None, candidates=candidates)
    if not candidates:
        return result
    order = _order(candidates)

    seen: dict[tuple, QualityResult] = {}

    def overlaps(a: Hashable, b: Hashable) -> bool:
        return bool(set(candidates[a].layers) & set(candidates[b].layers))

    def run(kind: str, chosen: list[Hashable]) -> QualityResult:
        chosen = sorted(chosen, key=order)
        if tuple(chosen) in seen:  # e.g. an extension equal to a verified set: the same windows, the same figures
            return seen[tuple(chosen)]
        measured = seen[tuple(chosen)] = evaluate(make_profile(tuple(candidates[g].group() for g in chosen)))
        described = tuple(candidates[g].describe() for g in chosen)
        result.steps.append(SearchStep(kind, tuple(candidates[g].layers for g in chosen), measured, described))
        verdict = "fits" if budget.fits(measured) else "over"
        log(
            f"  {kind:6s} groups {list(described)}: "
            f"{budget.describe(measured)} {verdict}, compression {measured.compression_ratio:.3f}x"
        )
        return measured

    def bound(r: QualityResult) -> float:  # no interval (inf) counts as far over, not as infinitely over
        return min(budget.upper(r), 10 * budget.max)

    probe_results = {g: run("probe", [g]) for g in probe_candidates(candidates, probes)}
    measured = {g: budget.value(r) for g, r in probe_results.items()}
    predicted = predict_damage(candidates, measured, num_layers, floor=damage_floor)
    result.predicted = predicted

    # scale: predicted point damage -> upper end of the interval; the probes give a first ratio
    points = sum(max(v, 0.0) for v in measured.values())
    uppers = sum(bound(r) for r in probe_results.values())
    scale = max(uppers / points, 1.0) if points > 0 else 1.0
    excluded = {g for g, r in probe_results.items() if budget.value(r) > budget.max}
    best: tuple[list[Hashable], QualityResult] | None = None
    for g, r in probe_results.items():  # a probe that fits is a valid answer already
        if budget.fits(r) and (best is None or candidates[g].saved_layers > _saved(best[0], candidates)):
            best = ([g], r)
    tried: set[tuple] = set()
    for _ in range(max_verify):
        chosen = select_groups(candidates, {g: v * scale for g, v in predicted.items()}, budget.max * 0.9, excluded)
        if not chosen or tuple(chosen) in tried:
            break
        tried.add(tuple(chosen))
        outcome = run("verify", chosen)  # a probe's single group: its probe, not measured again
        predicted_sum = sum(predicted[g] for g in chosen)
        if budget.fits(outcome):
            if best is None or _saved(chosen, candidates) > _saved(best[0], candidates):
                best = (chosen, outcome)
            scale = max(bound(outcome), 1e-9) / max(predicted_sum, 1e-12)
        else:
            scale = bound(outcome) / max(predicted_sum, 1e-12) * 1.1
    if best is not None:
        measured_sets = 0
        failed: dict[tuple[int, ...], float] = {}  # run -> least saving that did not fit

        def step_onto(g: Hashable, chosen: list[Hashable]) -> list[Hashable] | None:
            """``chosen`` with step ``g`` taken (a new run, or a run of the set moved to a variant that
            saves more), or None where the step does not apply: a variant that did not fit rules out
            that run's variants saving as much or more, not the rest."""
            layers, saved = candidates[g].layers, candidates[g].saved_layers
            same = [c for c in chosen if candidates[c].layers == layers]
            if saved >= failed.get(layers, math.inf) or (same and candidates[same[0]].saved_layers >= saved):
                return None
            if not same and any(overlaps(g, c) for c in chosen):
                return None
            return [*(c for c in chosen if c not in same), g]

        # Cheapest predicted step first, galloping: after a measured set fits, the next measurement takes
        # twice as many steps at once; after one that does not, half as many from the same place; a single
        # step that does not fit is ruled out, as one step at a time would. With many small steps (a rank
        # per layer) this reaches the budget in a logarithmic number of measurements, not one per step.
        steps = cheapest_first(candidates, predicted, exclude=excluded)
        position, stride = 0, 1
        while position < len(steps) and measured_sets < extend:
            chosen, taken, index = list(best[0]), [], position
            while index < len(steps) and len(taken) < stride:
                moved = step_onto(steps[index], chosen)
                index += 1
                if moved is not None:
                    chosen = moved
                    taken.append(steps[index - 1])
            if not taken:
                break
            chosen = sorted(chosen, key=order)
            measured_sets += tuple(chosen) not in seen  # a set measured before costs nothing
            outcome = run("extend", chosen)
            if budget.fits(outcome):
                best, position, stride = (chosen, outcome), index, stride * 2
            elif len(taken) > 1:
                stride = max(1, len(taken) // 2)
            else:
                layers = candidates[taken[0]].layers
                failed[layers] = min(candidates[taken[0]].saved_layers, failed.get(layers, math.inf))
                position = index
        result.chosen = tuple(candidates[g] for g in sorted(best[0], key=order))
        result.final = best[1]
    return result


def _saved(chosen: list[Hashable], candidates: dict[Hashable, Candidate]) -> float:
    return sum(candidates[g].saved_layers for g in chosen)
