"""Calibration: statistics (incl. data-parallel reduction), search logic, and the CLI end to end."""

import json
import math
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from minicache.calibrate.search import Budget, Candidate, cheapest_first, search, select_groups
from minicache.calibrate.statistics import PairStatistics
from minicache.evaluate.quality import QualityResult
from minicache.profile import MergeProfile, MergeSettings


def random_kv(seed: int, layers: int = 4, batch: int = 2, heads: int = 2, tokens: int = 40, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(layers)]


# -- statistics ------------------------------------------------------------------------------------
def test_statistics_known_answers():
    stats = PairStatistics(num_layers=3, num_heads=2, window=4)
    x = random_kv(0, layers=1)[0]
    stats.add_pair(0, 0, x, x.clone())  # identical layers
    stats.add_pair(1, 0, x, -x)  # opposite layers
    tokens_per_head = 2 * (40 - 1)  # batch 2, sink token excluded
    assert torch.equal(stats.tokens[0, 0], torch.full((2,), float(tokens_per_head), dtype=torch.float64))
    torch.testing.assert_close(stats.mean_cosine()[0, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(stats.mean_cosine()[1, 0], -torch.ones(2, dtype=torch.float64))
    # identical layers restore without error at every t and γ; opposite ones lose everything at t = 0.5
    assert stats.relative_error()[0, 0].abs().max() < 1e-6
    t_half = stats.ts.index(0.5)
    gamma0 = stats.gammas.index(0.0)
    assert math.isclose(float(stats.relative_error()[1, 0, gamma0, t_half]), 2.0, rel_tol=1e-5)
    assert stats.angle_quantiles((0.5,))[0, 0, :, 0].max() < 0.05
    assert stats.angle_quantiles((0.5,))[1, 0, :, 0].min() > 0.95
    mean, std = stats.magnitude_log_ratio()
    assert mean[0, 0].abs().max() < 1e-6 and std[0, 0].abs().max() < 1e-3


def test_statistics_add_across_batches():
    kv = random_kv(1)
    whole = PairStatistics(num_layers=4, num_heads=2, window=4)
    parts = PairStatistics(num_layers=4, num_heads=2, window=4)
    for p in range(3):
        whole.add_pair(p, 1, kv[p], kv[p + 1])
        parts.add_pair(p, 1, kv[p][:1], kv[p + 1][:1])
        parts.add_pair(p, 1, kv[p][1:], kv[p + 1][1:])
    for name, tensor in whole.sums().items():
        torch.testing.assert_close(parts.sums()[name], tensor, rtol=1e-5, atol=1e-4, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        kv = random_kv(2)
        stats = PairStatistics(num_layers=4, num_heads=2, window=4)
        for p in range(3):  # each process sees its own sequence of the batch
            stats.add_pair(p, 0, kv[p][rank : rank + 1], kv[p + 1][rank : rank + 1])
        stats.all_reduce()
        torch.save(stats.sums(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes(tmp_path):
    mp.spawn(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    kv = random_kv(2)
    expected = PairStatistics(num_layers=4, num_heads=2, window=4)
    for p in range(3):
        expected.add_pair(p, 0, kv[p], kv[p + 1])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, tensor in expected.sums().items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-4, msg=f"rank {rank}: {name}")


# -- search ------------------------------------------------------------------------------------------
def _candidates(errors: dict[tuple[int, ...], float]) -> dict:
    s = MergeSettings.create()
    return {g: Candidate(g, s, s, (e, e), len(g) - 1) for g, e in errors.items()}


def test_select_groups_never_overlaps_and_respects_allowance():
    candidates = _candidates({(0, 1): 0.1, (1, 2): 0.1, (2, 3): 0.1, (3, 4): 0.1, (4, 5): 0.1, (3, 4, 5): 0.1})
    predicted = {(0, 1): 0.001, (1, 2): 0.0005, (2, 3): 0.002, (3, 4): 0.004, (4, 5): 0.0001, (3, 4, 5): 0.0008}
    chosen = select_groups(candidates, predicted, allowance=0.003)
    used = [layer for g in chosen for layer in g]
    assert len(used) == len(set(used)), "groups never overlap"
    assert sum(predicted[g] for g in chosen) <= 0.003
    # per saved layer: (4, 5) 0.0001, (3, 4, 5) 0.0004, (1, 2) 0.0005, ...: (3, 4, 5) overlaps (4, 5)
    assert chosen == [(1, 2), (4, 5)]
    assert select_groups(candidates, predicted, allowance=1e-6) == []
    assert cheapest_first(candidates, {g: 0.001 for g in candidates})[:2] == [(3, 4, 5), (4, 5)], (
        "ties: the larger saving, then the deeper group"
    )


def _fake_result(damage: float, groups: int, spread: float = 0.0) -> QualityResult:
    """A measurement of ``damage`` whose 95 % interval is ``damage ± spread``."""
    ratio = 1 / (1 - 0.45 * groups / 8) if groups else 1.0
    interval = (damage - spread, damage + spread)
    return QualityResult(
        ppl_full=10.0, ppl=10.0 * (1 + damage), ppl_increase=damage, kl_mean=damage, kl_q95=damage,
        top1_agreement=1.0, kv_bytes_full=1000, kv_bytes=int(1000 / ratio), compression_ratio=ratio,
        tokens_scored=100, windows=4, prefix_length=10, continuation_length=10,
        ppl_increase_ci95=interval, kl_mean_ci95=interval,
    )


def test_budget_decides_on_the_upper_end_of_the_interval():
    budget = Budget("ppl_increase", 0.01)
    assert budget.fits(_fake_result(0.006, 1, spread=0.003))
    assert not budget.fits(_fake_result(0.006, 1, spread=0.005)), "point within, upper end over: refused"
    single = replace(_fake_result(0.001, 1), windows=1, ppl_increase_ci95=None, kl_mean_ci95=None)
    assert not budget.fits(single), "one window cannot resolve the budget"
    assert budget.upper(single) == float("inf")
    assert Budget("kl_mean", 0.01).upper(_fake_result(0.004, 1, spread=0.002)) == pytest.approx(0.006)
    assert "upper +0.0090" in budget.describe(_fake_result(0.006, 1, spread=0.003))


def test_a_kl_guard_also_holds_the_kl_to_a_perplexity_budget():
    """A set whose held-out perplexity fits but whose KL, R times over, would not is refused with a guard."""
    calm = replace(_fake_result(0.002, 1, spread=0.001), kl_mean=0.004, kl_mean_ci95=(0.003, 0.005))
    plain, guarded = Budget("ppl_increase", 0.01), Budget("ppl_increase", 0.01, kl_guard=3.0)
    assert plain.fits(calm) and plain.upper(calm) == pytest.approx(0.003)
    assert guarded.upper(calm) == pytest.approx(math.expm1(3 * 0.005)), "the guard at the KL's upper end"
    assert guarded.value(calm) == pytest.approx(math.expm1(3 * 0.004))
    assert not guarded.fits(calm)
    assert Budget("ppl_increase", 0.02, kl_guard=3.0).fits(calm)
    loud = replace(calm, ppl_increase=0.015, ppl_increase_ci95=(0.012, 0.018))
    assert guarded.upper(loud) == pytest.approx(0.018), "the guard never loosens the perplexity bound"
    assert guarded.upper(replace(calm, kl_mean_ci95=None)) == float("inf"), "an unresolved KL never fits"
    assert "expm1(3 x KL 0.0040)" in guarded.describe(calm) and "guard" not in plain.describe(calm)
    assert guarded.to_dict() == {"metric": "ppl_increase", "max": 0.01, "kl_guard": 3.0}
    assert plain.to_dict() == {"metric": "ppl_increase", "max": 0.01}, "profiles without a guard read as before"


def test_search_keeps_less_when_the_measurements_are_uncertain():
    """The winner's curse: with wide intervals, a set whose point estimate fits is not accepted."""
    layers = 8
    damage = {p: 0.02 * 0.5**p for p in range(layers - 1)}
    candidates = _candidates({(p, p + 1): 0.5**p for p in range(layers - 1)})

    def run(relative_spread: float):
        def evaluate(profile: MergeProfile) -> QualityResult:
            d = sum(damage[g.layers[0]] for g in profile.groups)
            return _fake_result(d, len(profile.groups), spread=relative_spread * d)

        budget = Budget("ppl_increase", 0.01)
        result = search(candidates, evaluate, budget, layers, make_profile=lambda g: MergeProfile(groups=g),
                        probes=4, log=lambda _: None)
        assert result.final is not None and budget.fits(result.final)
        assert all(budget.fits(s.result) or s.result is not result.final for s in result.steps)
        return sum(damage[c.layers[0]] for c in result.chosen)

    sure, unsure = run(0.05), run(1.0)
    assert unsure <= 0.005 + 1e-12, "point + spread within 1 %: the point at most half the budget"
    assert unsure < sure


def test_search_finds_a_set_within_budget_and_measures_few_profiles():
    layers = 8
    # Restore errors that predict the damage: deeper pairs restore better and hurt less; damage adds up.
    damage = {p: 0.02 * 0.5**p for p in range(layers - 1)}
    candidates = _candidates({(p, p + 1): 0.5**p for p in range(layers - 1)})
    calls = []

    def evaluate(profile: MergeProfile) -> QualityResult:
        calls.append(profile)
        return _fake_result(sum(damage[g.layers[0]] for g in profile.groups), len(profile.groups))

    budget = Budget("ppl_increase", 0.01)
    result = search(candidates, evaluate, budget, layers, make_profile=lambda g: MergeProfile(groups=g),
                    probes=4, log=lambda _: None)
    assert result.final is not None and budget.fits(result.final)
    firsts = [c.layers[0] for c in result.chosen]
    assert len(firsts) >= 2 and all(abs(a - b) >= 2 for a in firsts for b in firsts if a != b)
    assert sum(damage[p] for p in firsts) <= 0.01
    assert len(calls) <= 4 + 4 + 6  # probes + verifications + extensions, not one per candidate
    assert set(result.predicted_damage) == set(range(layers - 1)), "every pair gets a predicted damage"

    impossible = search(candidates, evaluate, Budget("ppl_increase", 1e-9),
                        layers, make_profile=lambda g: MergeProfile(groups=g), probes=4, log=lambda _: None)
    assert impossible.chosen == () and impossible.final is None
    assert search({}, evaluate, budget, layers, make_profile=MergeProfile, log=lambda _: None).chosen == ()


def test_budget_validation():
    with pytest.raises(ValueError, match="not one of"):
        Budget("accuracy", 0.01)
    with pytest.raises(ValueError, match="positive"):
        Budget("ppl_increase", 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        Budget("ppl_increase", 0.01, kl_guard=-1.0)
    with pytest.raises(ValueError, match="needs none"):
        Budget("kl_mean", 0.01, kl_guard=3.0)


# -- the CLI on the real model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_data(tmp_path_factory, license_text):
    path = tmp_path_factory.mktemp("data") / "sample.jsonl"
    chunks = [license_text[i : i + 2500] for i in range(0, 60000, 2500)]
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    return path


SMALL = ["--num-samples", "3", "--max-length", "256", "--eval-windows", "2", "--probes", "3",
         "--residual-length", "16", "--block-size", "16", "--no-progress", "--allow-small-data"]


def run_cli(args, capsys):
    from minicache.calibrate.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_refuses_bad_data_before_loading_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    out = tmp_path / "out"
    code, _, err = run_cli(["--model", "/nonexistent/model", "--data", str(bad), "--out", str(out)], capsys)
    assert code == 2 and f"{bad}:2" in err and "'text' is empty" in err
    assert not out.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(["--model", "/nonexistent/model", "--data", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "no records" in err and not out.exists()


def test_cli_refuses_existing_output_without_force(tmp_path, capsys, calib_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "minicache_config.yaml").write_text("keep me\n")
    code, _, err = run_cli(["--data", str(calib_data), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
    assert (out / "minicache_config.yaml").read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == ["minicache_config.yaml"]


@pytest.mark.slow  # two calibrations: ~1 min on an idle 2-core machine
def test_cli_same_seed_gives_byte_identical_profile(tmp_path, capsys, calib_data, smollm2):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, err = run_cli(["--data", str(calib_data), "--out", str(out), "--budget", "0.05", *SMALL], capsys)
        assert code == 0, err
        assert f"profile written to {out / 'minicache_config.yaml'}" in stdout
        outputs.append(out)
    a, b = ((o / "minicache_config.yaml").read_bytes() for o in outputs)
    assert a == b
    assert (outputs[0] / "minicache_report.md").read_bytes() == (outputs[1] / "minicache_report.md").read_bytes()
    profile = MergeProfile.load(outputs[0])
    cal = profile.calibration
    assert cal["data"]["seed"] == 0 and len(cal["data"]["sha256"]) == 64
    assert cal["measured"]["ppl_increase"] <= 0.05
    profile.check_model(smollm2[0].config)


def test_cli_impossible_budget_gives_valid_empty_profile(tmp_path, capsys, calib_data):
    out = tmp_path / "p.yaml"
    # KL, not perplexity: a merge can lower the perplexity of 2 windows, never make KL negative
    code, stdout, _ = run_cli(["--data", str(calib_data), "--out", str(out), "--budget-metric", "kl_mean",
                               "--budget", "1e-9", *SMALL], capsys)
    assert code == 0
    assert "no group fits the budget" in stdout
    profile = MergeProfile.load(out)
    assert profile.groups == ()
    assert (tmp_path / "p_report.md").exists(), "named after the profile file"


def test_kl_guard_auto_guards_the_built_in_corpus_only():
    from minicache.calibrate.cli import budget_from_args, build_parser

    def budget(*argv):
        return budget_from_args(build_parser().parse_args(list(argv)))

    assert budget().kl_guard == 4.0, "no --data: the promise is for text nobody has seen"
    assert budget("--data", "x.jsonl").kl_guard == 0.0, "your own data: text like what you will run"
    assert budget("--budget-metric", "kl_mean").kl_guard == 0.0, "a KL budget needs no guard"
    assert budget("--kl-guard", "0").kl_guard == 0.0 and budget("--data", "x", "--kl-guard", "2.5").kl_guard == 2.5
    assert budget("--kl-guard", "auto", "--data", "x").kl_guard == 0.0


def test_cli_kl_guard_is_recorded_and_refused_with_a_kl_budget(tmp_path, capsys, calib_data):
    out = tmp_path / "g"
    code, _, err = run_cli(["--data", str(calib_data), "--out", str(out), "--budget-metric", "kl_mean",
                            "--kl-guard", "3", *SMALL], capsys)
    assert code == 2 and "needs none" in err and not out.exists()
    # a guard no merge can meet (any KL times 1e6): nothing merged, the guard recorded and reported
    code, stdout, err = run_cli(["--data", str(calib_data), "--out", str(out), "--budget", "0.05",
                                 "--kl-guard", "1e6", *SMALL], capsys)
    assert code == 0, err
    assert "KL guard 1e+06" in stdout and "no group fits the budget" in stdout
    profile = MergeProfile.load(out)
    assert profile.groups == ()
    assert profile.calibration["budget"] == {"metric": "ppl_increase", "max": 0.05, "kl_guard": 1e6}
    assert "KL guard 1e+06: the search also held" in (out / "minicache_report.md").read_text()


def test_cli_kv_bits_writes_the_default_storage_and_measures_it(tmp_path, capsys, calib_data):
    out = tmp_path / "q"
    code, _, err = run_cli(["--data", str(calib_data), "--out", str(out), "--preset", "none", "--kv-bits", "4",
                            *SMALL], capsys)
    assert code == 0, err
    profile = MergeProfile.load(out)
    q = profile.quantization
    assert (q.scheme, q.bits, q.sink_tokens, q.pre_rope_keys) == ("rotated", 4, 4, False)
    assert profile.calibration["measured"]["compression_ratio"] > 1.5  # measured with that storage on


# -- runs with variants (several ranks per run) ---------------------------------------------------------
def _variant(layers, saved, variant="", error=0.1):
    s = MergeSettings.create()
    return Candidate(tuple(layers), s, s, (error, error), saved, variant)


def test_select_groups_climbs_each_runs_convex_hull_within_the_allowance():
    cands = [_variant((0, 1), 0.5), _variant((0, 1), 1.5, "e0.1"), _variant((0, 1), 1.9, "e0.3"),
             _variant((2,), 0.8)]
    candidates = {c.key: c for c in cands}
    predicted = {((0, 1)): 0.001, ((0, 1), "e0.1"): 0.002, ((0, 1), "e0.3"): 0.02, (2,): 0.004}
    # (0,1) at 0.5 lies above the hull: its e0.1 variant saves three times as much for twice the damage
    assert select_groups(candidates, predicted, allowance=0.01) == [((0, 1), "e0.1"), (2,)]
    # a larger allowance takes the run one more step up its hull, never two variants of one run
    assert select_groups(candidates, predicted, allowance=0.03) == [((0, 1), "e0.3"), (2,)]
    assert select_groups(candidates, predicted, allowance=0.001) == []
    # a run overlapping a chosen one is not taken at any variant
    cands.append(_variant((1, 2), 3.0, "e0.3"))
    candidates = {c.key: c for c in cands}
    predicted[((1, 2), "e0.3")] = 0.0001
    chosen = select_groups(candidates, predicted, allowance=0.03)
    layers = [layer for g in chosen for layer in candidates[g].layers]
    assert len(layers) == len(set(layers)) and chosen[0] == ((1, 2), "e0.3")


def test_search_moves_a_run_to_a_cheaper_variant_when_the_measurement_allows():
    """Extension steps try a chosen run at a variant that saves more, and back off after a miss."""
    true = {((4, 5)): 0.0005, ((4, 5), "e0.1"): 0.002, ((4, 5), "e0.3"): 0.02,
            ((2, 3)): 0.0008, ((2, 3), "e0.1"): 0.004, ((0, 1)): 0.03}
    saved = {((4, 5)): 0.5, ((4, 5), "e0.1"): 1.5, ((4, 5), "e0.3"): 1.9, ((2, 3)): 0.5,
             ((2, 3), "e0.1"): 1.5, ((0, 1)): 0.5}
    candidates = {}
    for key, s in saved.items():
        layers, variant = (key, "") if isinstance(key[0], int) else key
        candidates[key] = _variant(layers, s, variant, error=true[key] * 10)
    by_settings = {}

    def evaluate(profile: MergeProfile) -> QualityResult:
        d = 0.0
        for g in profile.groups:
            d += by_settings[g]
        return _fake_result(d, len(profile.groups), spread=0.1 * d)

    def make_profile(groups):
        return MergeProfile(groups=groups)

    # each candidate's group must be told apart: give each a distinct retention γ
    for i, (key, c) in enumerate(sorted(candidates.items(), key=lambda kv: (kv[1].layers, kv[1].variant))):
        s = MergeSettings.create(gamma=0.01 * (i + 1))
        candidates[key] = Candidate(c.layers, s, s, c.restore_error, c.saved_layers, c.variant)
        by_settings[candidates[key].group()] = true[key]
    budget = Budget("ppl_increase", 0.01)
    result = search(candidates, evaluate, budget, 6, make_profile=make_profile, probes=3, extend=8,
                    log=lambda _: None)
    chosen = {c.layers: c.variant for c in result.chosen}
    assert budget.fits(result.final)
    assert chosen.get((4, 5)) == "e0.1" and chosen.get((2, 3)) == "e0.1", chosen
    assert (0, 1) not in chosen


def test_extension_gallops_past_many_small_steps_and_rules_out_the_one_that_does_not_fit():
    """16 pairs that each cost little, one of them far over the budget, predicted alike: the extension
    takes steps in growing bundles, halves a bundle that does not fit, rules out the single bad step
    and still adds every other pair, in fewer measurements than there are pairs."""
    bad = 7
    true = {pair: (0.05 if pair == bad else 0.0002) for pair in range(16)}
    candidates, by_settings = {}, {}
    for pair in range(16):
        s = MergeSettings.create(gamma=0.01 * (pair + 1))  # tells each candidate's group apart
        layers = (2 * pair, 2 * pair + 1)
        candidates[layers] = Candidate(layers, s, s, (0.1, 0.1), 0.5, "")
        by_settings[candidates[layers].group()] = true[pair]

    def evaluate(profile: MergeProfile) -> QualityResult:
        d = sum(by_settings[g] for g in profile.groups)
        return _fake_result(d, len(profile.groups), spread=0.1 * d)

    steps = []
    budget = Budget("ppl_increase", 0.01)
    # two probes (0.0002 each) and no verification: the pessimistic scale leaves everything to extension
    result = search(candidates, evaluate, budget, 32, make_profile=lambda g: MergeProfile(groups=g), probes=2,
                    max_verify=0, extend=10, log=steps.append)
    chosen = {c.layers[0] // 2 for c in result.chosen}
    assert budget.fits(result.final)
    assert chosen == set(range(16)) - {bad}, sorted(chosen)
    extensions = [s for s in steps if s.lstrip().startswith("extend")]
    # at most the 10 allowed; one step at a time would have needed 15 (14 good pairs + the bad one)
    assert len(extensions) <= 10, extensions
