"""Calibrated code widths (``--kv-bits auto``, :mod:`minicache.calibrate.bits`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from minicache.calibrate.bits import allocate_bits, bit_steps, fisher_damage, units_of, widths_after
from minicache.profile import Defaults, MergeGroup, MergeProfile, Quantization
from tests.test_plugins import TinyTokenizer, _model, _windows

WIDTHS = (4, 3, 2)


def _damage(table: dict[tuple[int, int], tuple[float, float, float]], layers: int) -> torch.Tensor:
    d = torch.zeros(layers, 2, 3, dtype=torch.float64)
    for (layer, role), values in table.items():
        d[layer, role] = torch.tensor(values, dtype=torch.float64)
    return d


def test_steps_follow_the_lower_hull_cheapest_first():
    damage = _damage({
        (0, 0): (0.0, 1.0, 10.0),   # convex: 4 -> 3 (rate 1), then 3 -> 2 (rate 9)
        (1, 0): (0.0, 5.0, 6.0),    # 3 bits lie above the chord: 4 -> 2 directly (rate 3)
        (1, 1): (0.0, 0.5, 1.0),    # values of layer 1: cheap
    }, layers=2)
    steps = bit_steps(damage, WIDTHS, [(0,), (1,)])
    summary = [(s.layers, s.role, s.before, s.after) for s in steps]
    assert summary[:3] == [((0,), "values", 4, 3), ((0,), "values", 3, 2), ((1,), "values", 4, 3)]
    assert ((1,), "keys", 4, 3) not in summary and ((1,), "keys", 4, 2) in summary
    rates = [s.rate for s in steps]
    assert rates == sorted(rates)
    assert summary.index(((0,), "keys", 4, 3)) < summary.index(((1,), "keys", 4, 2)) < summary.index(
        ((0,), "keys", 3, 2))
    # A merged group is one unit: its members' damages add, and both take the step together.
    grouped = bit_steps(damage, WIDTHS, [(0, 1)])
    key_steps = [s for s in grouped if s.role == "keys"]
    assert [(s.layers, s.after, s.damage) for s in key_steps] == [((0, 1), 3, 6.0), ((0, 1), 2, 10.0)]
    keys, values = widths_after(grouped, len(grouped), 2, 4)
    assert keys == (2, 2) and values == (2, 2)


def test_allocation_takes_the_longest_prefix_that_fits_with_few_measurements():
    damage = torch.rand(12, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    damage[..., 0] = 0
    damage[..., 2] += damage[..., 1]  # 2 bits always worse than 3
    steps = bit_steps(damage, WIDTHS, [(i,) for i in range(12)])
    quant = Quantization(bits=4, group_size=32, residual_length=16, scheme="rotated", sink_tokens=4)
    calls = []

    def measure(q: Quantization):
        calls.append(q)
        # the "real" damage: the predicted one, summed over what was lowered
        total = sum(float(damage[layer, r, WIDTHS.index(q.bits_of(layer, role))])
                    for layer in range(12) for r, role in enumerate(("keys", "values")))
        return total, total * 1.1, 16 / q.mean_bits(12)

    budget = 0.4 * float(sum(s.damage for s in steps))
    chosen, points = allocate_bits(steps, quant, 12, measure, lambda upper: upper <= budget, log=lambda _: None)
    taken = max(p.steps for p in points if p.fits)
    assert all(p.fits == (p.upper <= budget) for p in points)
    assert not any(p.fits for p in points if p.steps == taken + 1) and any(p.steps == taken + 1 for p in points)
    assert chosen == allocate_bits(steps, quant, 12, measure, lambda u: u <= budget, log=lambda _: None)[0]
    assert len(calls) // 2 <= 2 + len(steps).bit_length(), "a bisection, not a sweep"
    assert 2 < chosen.mean_bits(12) < 4 and chosen.widths() >= {4}
    assert (chosen.scheme, chosen.sink_tokens, chosen.residual_length) == ("rotated", 4, 16), "only widths change"
    # Nothing fits: every width at the widest (the caller says so); everything fits: all at the narrowest.
    assert allocate_bits(steps, quant, 12, measure, lambda u: False, log=lambda _: None)[0].widths() == {4}
    assert allocate_bits(steps, quant, 12, measure, lambda u: True, log=lambda _: None)[0].widths() == {2}


def test_fisher_damage_grows_as_widths_shrink():
    model = _model()
    quant = Quantization(bits=4, group_size=16, residual_length=8)
    damage = fisher_damage(model, _windows(4, 64, seed=3), quant, WIDTHS, batch_size=2)
    assert damage.shape == (6, 2, 3) and (damage >= 0).all()
    assert (damage[..., 2] > damage[..., 0]).all(), "2 bits move every layer's KV more than 4 bits"
    assert all(p.grad is None for p in model.parameters()), "weights get no gradient"
    # Long windows go fewer per pass (backward memory grows with the tokens in flight); same prediction.
    passes: list[int] = []
    one_at_a_time = fisher_damage(model, _windows(4, 64, seed=3), quant, WIDTHS, batch_size=2, max_tokens=100,
                                  progress=passes.append)
    assert passes == [64] * 4
    torch.testing.assert_close(one_at_a_time, damage, rtol=1e-3, atol=0)
    # Exact sinks: the runtime packs stand-ins there, so the prediction changes (no error at the sinks,
    # first groups' ranges no longer set by them), and the auto search keeps the field.
    sinks = fisher_damage(model, _windows(4, 64, seed=3), replace(quant, sink_tokens=4), WIDTHS, batch_size=2)
    assert sinks.shape == damage.shape and not torch.equal(sinks, damage)


def test_units_are_merged_groups_and_single_layers():
    d = Defaults(residual_length=16, block_size=16)
    profile = MergeProfile(groups=(MergeGroup((2, 3), d.settings(), d.settings()),), defaults=d)
    assert units_of(profile, 5) == [(2, 3), (0,), (1,), (4,)]


def calibrate_auto_bits(tmp_path, model, quantization: Quantization):
    """``--kv-bits auto`` on a tiny model: 24 samples of 96 token ids, budget KL 0.002."""
    from minicache.calibrate.api import calibrate
    from minicache.calibrate.search import Budget

    data = tmp_path / "ids.jsonl"
    stream = _windows(1, 24 * 96, seed=1)[0].tolist()
    data.write_text("".join(json.dumps({"input_ids": stream[i : i + 96]}) + "\n" for i in range(0, len(stream), 96)))
    return calibrate(
        model, TinyTokenizer(), data, budget=Budget("kl_mean", 0.002), num_samples=8, max_length=96,
        eval_windows=4, defaults=Defaults(residual_length=16, block_size=16), probes=2, max_group_size=2,
        quantization=quantization, auto_bits=True, progress=False, log=lambda _: None,
    )


def test_calibrate_with_auto_bits_writes_per_layer_widths_it_measured(tmp_path):
    model = _model()
    result = calibrate_auto_bits(tmp_path, model, Quantization(bits=2, group_size=16, residual_length=16))
    q = result.profile.quantization
    points = result.profile.calibration["bits"]["frontier"]
    assert len(points) >= 2 and {p["steps"] for p in points} >= {0}
    chosen = [p for p in points if p["mean_bits"] == pytest.approx(q.mean_bits(6))]
    assert chosen and chosen[0]["fits"], "the written widths are a measured point within the budget"
    assert result.measured.kl_mean_ci95[1] <= 0.002
    assert 2 <= q.mean_bits(6) <= 4 and len(q.widths()) >= 1
    assert result.bit_points and result.bit_points[0].steps == 0
    saved = MergeProfile.load(result.profile.save(tmp_path / "profile"))
    assert saved.quantization == q and saved.calibration["bits"]["frontier"] == points
    # The report shows the widths per layer and the measured frontier (a plot and a table).
    from minicache.calibrate.report import write_report

    written = write_report(tmp_path / "report", result.profile, result.statistics, result.search, "kl_mean",
                           0.002, result.summary)
    names = {p.name for p in written}
    assert "minicache_bits.png" in names or any(n.endswith("bits.png") for n in names)
    text = next(p for p in written if p.name.endswith("report.md")).read_text()
    assert "## Widths (--kv-bits auto)" in text and text.count("| yes |") + text.count("| no |") >= len(points)
