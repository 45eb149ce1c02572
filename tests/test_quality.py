"""Quality measurement: the calibrator's replayed prefill gives the same numbers as running the prefix."""

import pytest
import torch
import transformers

from minicache import MergeProfile
from minicache.evaluate.quality import evaluate_profile, reference_run
from minicache.profile import Defaults
from tests.tiny_configs import tiny_config


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config(arch, num_hidden_layers=4, **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_replayed_prefix_matches_running_the_prefix(arch):
    model = tiny_model(arch)
    windows = torch.randint(3, 128, (5, 96), generator=torch.Generator().manual_seed(1))
    profile = MergeProfile.preset("paper", model.config)
    profile = MergeProfile(groups=profile.groups, defaults=Defaults(residual_length=8, block_size=8))
    plain = reference_run(model, windows, 64, batch_size=2)
    kept = reference_run(model, windows, 64, batch_size=2, keep_prefix_kv=True)
    assert plain.prefix_kv is None
    assert kept.prefix_kv is not None and len(kept.prefix_kv) == 3  # batches of 2, 2, 1
    assert kept.prefix_kv[0][0][0].shape == (2, 2, 64, 16)  # [B, KV heads, prefix, head_dim]
    torch.testing.assert_close(plain.nll, kept.nll)
    ran = evaluate_profile(model, windows, 64, profile, reference=plain, batch_size=2, chunk_size=16)
    replayed = evaluate_profile(model, windows, 64, profile, reference=kept, batch_size=2, chunk_size=16)
    assert ran.compression_ratio > 1.0  # something was merged, so the comparison means something
    assert replayed.kv_bytes == ran.kv_bytes
    assert replayed.ppl == pytest.approx(ran.ppl, rel=1e-4)
    assert replayed.kl_mean == pytest.approx(ran.kl_mean, rel=1e-3, abs=1e-6)
    assert replayed.top1_agreement == pytest.approx(ran.top1_agreement, abs=0.02)


def test_sliding_window_models_are_not_replayed():
    # A sliding layer keeps only its window: its cache cannot stand in for the prefix.
    model = tiny_model("mistral", sliding_window=16)
    windows = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    assert reference_run(model, windows, 32, batch_size=2, keep_prefix_kv=True).prefix_kv is None
