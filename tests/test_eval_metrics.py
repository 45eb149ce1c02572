"""Quality metrics on cases with a known answer, and evaluate_profile built from them."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.evaluate.quality import (
    evaluate_profile,
    full_cache_factory,
    kl_divergence,
    perplexity,
    reference_run,
    token_nll,
    top1_agreement,
)
from minicache.profile import Defaults, MergeGroup, MergeSettings
from minicache.runtime.memory import cache_bytes, compression_ratio
from tests.tiny_configs import tiny_config


def log(p) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_kl_of_identical_distributions_is_zero():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 5, 17), dim=-1)
    kl = kl_divergence(lp, lp.clone())
    assert kl.shape == (3, 5)
    assert torch.equal(kl, torch.zeros(3, 5))


def test_kl_of_known_distributions_matches_the_closed_form():
    p, q = [0.5, 0.5], [0.25, 0.75]
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(log(p), log(q)).item() == pytest.approx(want, abs=1e-12)
    # Not symmetric: KL(Q ‖ P) is another number.
    want_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(log(q), log(p)).item() == pytest.approx(want_qp, abs=1e-12)
    # Bernoulli(a) vs Bernoulli(b), batched.
    a, b = torch.tensor([0.1, 0.9, 0.3]), torch.tensor([0.2, 0.5, 0.3])
    closed = a * (a / b).log() + (1 - a) * ((1 - a) / (1 - b)).log()
    got = kl_divergence(torch.stack([a, 1 - a], -1).log(), torch.stack([b, 1 - b], -1).log())
    torch.testing.assert_close(got, closed.clamp_min(0.0))
    # A reference token of (almost) zero probability contributes (almost) nothing.
    assert kl_divergence(log([1 - 1e-30, 1e-30]), log([0.5, 0.5])).item() == pytest.approx(math.log(2), abs=1e-9)


def test_top1_agreement_known_cases():
    ref = log([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    got = log([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    assert top1_agreement(ref, got).tolist() == [True, False, True]
    assert top1_agreement(ref, got).double().mean().item() == pytest.approx(2 / 3)


def test_token_nll_and_perplexity_known_answers():
    uniform = torch.full((2, 4, 8), -math.log(8.0))
    nll = token_nll(uniform, torch.zeros(2, 4, dtype=torch.long))
    torch.testing.assert_close(nll, torch.full((2, 4), math.log(8.0)))
    assert perplexity(nll) == pytest.approx(8.0)  # a uniform guess over V tokens has perplexity V
    lp = log([[0.5, 0.25, 0.25], [0.125, 0.5, 0.375]])
    nll = token_nll(lp, torch.tensor([0, 0]))
    torch.testing.assert_close(nll, torch.tensor([math.log(2), math.log(8)], dtype=torch.float64))
    assert perplexity(nll) == pytest.approx(4.0)  # exp(mean(ln 2, ln 8)) = exp(ln 4)
    assert perplexity(torch.zeros(5)) == 1.0


def test_compression_ratio():
    assert compression_ratio(1000, 250) == 4.0
    assert compression_ratio(0, 0) == 1.0


def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def test_cache_bytes_of_dynamic_and_mini_caches():
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    cfg = model.config
    dynamic = DynamicCache(config=cfg)
    with torch.inference_mode():
        model(input_ids=ids, cache=dynamic)
    full = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 24 * cfg.head_dim * 4
    assert cache_bytes(dynamic) == (full, full)
    s = MergeSettings.create(gamma=0.1)
    cache = MiniCache(MergeProfile(groups=(MergeGroup((0, 1), s, s),), defaults=Defaults(residual_length=4,
                                                                                        block_size=4)), model)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache)
    report = cache.memory_report()
    assert cache_bytes(cache) == (report["kv_bytes"], report["kv_bytes_full"])
    assert report["kv_bytes_full"] == full and report["kv_bytes"] < full


def windows_of(model, n=3, length=48):
    return torch.randint(3, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(1))


def test_reference_run_nll_is_the_true_tokens_nll():
    model = tiny_model()
    windows = windows_of(model)
    ref = reference_run(model, windows, prefix_length=32, batch_size=2)
    assert ref.nll.shape == (3, 16) and [lp.shape[0] for lp in ref.log_probs] == [2, 1]
    with torch.inference_mode():
        logits = model(input_ids=windows).logits[:, 31:-1].float()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 32:].reshape(-1),
                                             reduction="none").view(3, 16)
    torch.testing.assert_close(ref.nll, want, atol=1e-5, rtol=1e-5)


def test_full_cache_scores_zero_loss():
    model = tiny_model()
    windows = windows_of(model)
    result = evaluate_profile(model, windows, 32, MergeProfile(), batch_size=2, chunk_size=5,
                              cache_factory=full_cache_factory)
    assert result.ppl_increase == pytest.approx(0.0, abs=1e-5)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6) and result.kl_q95 == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.compression_ratio == 1.0 and result.kv_bytes == result.kv_bytes_full
    assert (result.tokens_scored, result.windows, result.continuation_length) == (48, 3, 16)
    assert result.ppl_full == pytest.approx(perplexity(reference_run(model, windows, 32).nll))


def test_merged_profile_scores_are_the_metrics_of_its_log_probs():
    # evaluate_profile's numbers are exactly the metric helpers applied to the merged cache's
    # log-probs, fed the same way (prefix, then teacher-forced chunks).
    model = tiny_model()
    windows = windows_of(model, n=2)
    s = MergeSettings.create(t=0.5, gamma=0.0, sink_tokens=0, method="average")
    profile = MergeProfile(groups=(MergeGroup((1, 2), s, s),), defaults=Defaults(residual_length=0, block_size=8))
    result = evaluate_profile(model, windows, 32, profile, batch_size=2, chunk_size=16)
    ref = reference_run(model, windows, 32, batch_size=2)
    cache = MiniCache(profile, model)
    with torch.inference_mode():
        first = model(input_ids=windows[:, :32], cache=cache).logits[:, -1:]
        rest = model(input_ids=windows[:, 32:47], cache=cache).logits
    lp = torch.log_softmax(torch.cat([first, rest], 1).float(), -1)
    kl = kl_divergence(ref.log_probs[0], lp)
    assert result.kl_mean == pytest.approx(kl.double().mean().item(), rel=1e-6)
    assert result.top1_agreement == pytest.approx(top1_agreement(ref.log_probs[0], lp).double().mean().item())
    assert result.ppl == pytest.approx(perplexity(token_nll(lp, windows[:, 32:])), rel=1e-6)
    assert result.ppl_increase == pytest.approx(result.ppl / result.ppl_full - 1)
    assert result.kl_mean > 0 and result.compression_ratio > 1.0
    # Per window, the NLL increase over the full cache: equal tokens per window, so their mean is the increase.
    per_window = token_nll(lp, windows[:, 32:]).double().mean(1) - ref.nll.double().mean(1)
    assert result.window_nll_increase == pytest.approx(per_window.tolist(), abs=1e-6)
    assert math.expm1(sum(result.window_nll_increase) / 2) == pytest.approx(result.ppl_increase, abs=1e-6)
    assert result.to_dict()["window_nll_increase"] == list(result.window_nll_increase)


# ---- the 95 % interval of the perplexity increase --------------------------------------------------
def test_ppl_increase_interval_is_paired_and_shrinks_with_more_windows():
    from minicache.evaluate.quality import ppl_increase_interval

    g = torch.Generator().manual_seed(0)
    full = torch.rand(64, 32, generator=g, dtype=torch.float64) * 4  # windows of very different difficulty
    assert ppl_increase_interval(full, full.clone()) == (0.0, 0.0), "identical runs: no increase, no spread"
    # +1 % perplexity on average, varying by window (as a merge's damage does).
    damage = 0.01 + 0.02 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    worse = full + torch.log1p(damage)
    low, high = ppl_increase_interval(full, worse)
    point = torch.expm1((worse - full).mean()).item()
    assert low < point < high and low > 0.0 and high < 0.02
    few_low, few_high = ppl_increase_interval(full[:8], worse[:8])
    assert few_high - few_low > high - low, "fewer windows, wider interval"
    # Paired: a text-difficulty offset shared by both runs does not widen the interval.
    offset = torch.rand(64, 1, generator=g, dtype=torch.float64) * 10
    assert ppl_increase_interval(full + offset, worse + offset) == pytest.approx((low, high))
    assert ppl_increase_interval(full[:1], worse[:1]) is None
    with pytest.raises(ValueError, match="one shape"):
        ppl_increase_interval(full, worse[:, :5])


def test_paired_difference_of_two_profiles_cancels_what_their_windows_share():
    from minicache.evaluate.quality import paired_ppl_difference, ppl_increase_interval

    g = torch.Generator().manual_seed(2)
    full = torch.rand(48, 16, generator=g, dtype=torch.float64) * 4
    a = full + torch.log1p(0.006 + 0.01 * torch.randn(48, 1, generator=g, dtype=torch.float64))
    b = a + torch.log1p(0.002 + 0.001 * torch.randn(48, 1, generator=g, dtype=torch.float64))  # B: 0.2 % above A
    increase = [(x.mean(1) - full.mean(1)).tolist() for x in (a, b)]
    point, (low, high) = paired_ppl_difference(*increase)
    assert point == pytest.approx(torch.expm1((b - a).mean()).item())
    assert 0.0 < low < point < high < 0.004, "B's extra damage is resolved..."
    a_high = ppl_increase_interval(full, a)[1]
    b_low = ppl_increase_interval(full, b)[0]
    assert b_low < a_high, "...where the two intervals against the full cache overlap"
    assert paired_ppl_difference(increase[0], increase[0]) == (0.0, (0.0, 0.0))
    assert paired_ppl_difference(increase[1], increase[0])[0] < 0, "A costs less than B"
    assert paired_ppl_difference([0.1], [0.2])[1] is None
    with pytest.raises(ValueError, match="one length"):
        paired_ppl_difference(increase[0], increase[1][:5])


def test_window_mean_interval_covers_the_mean_and_needs_two_windows():
    from minicache.evaluate.quality import window_mean_interval

    g = torch.Generator().manual_seed(1)
    kl = (0.01 + 0.01 * torch.rand(64, 1, generator=g, dtype=torch.float64)) * torch.ones(64, 16)
    low, high = window_mean_interval(kl)
    assert 0.01 < low < kl.mean().item() < high < 0.02
    few_low, few_high = window_mean_interval(kl[:8])
    assert few_high - few_low > high - low, "fewer windows, wider interval"
    assert window_mean_interval(torch.full((8, 4), 0.5)) == pytest.approx((0.5, 0.5)), "no spread, no width"
    assert window_mean_interval(kl[:1]) is None
    with pytest.raises(ValueError, match="windows, tokens"):
        window_mean_interval(kl.flatten())
