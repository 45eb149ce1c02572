"""The exact method: one layer's component kept as it is beside a compressed other component."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.methods import get_method
from minicache.profile import Defaults, MergeGroup, ProfileError
from tests.test_lowrank import LOWRANK, _fitted, _model, _windows, assert_generation_paths_agree, calibrate_tiny

EXACT = get_method("exact")


def _keys_only(model, layers=(1, 3), rank=3, defaults=None) -> MergeProfile:
    """Keys of ``layers`` low rank (one basis per layer), their values exact."""
    d = defaults or Defaults(residual_length=8, block_size=4, gamma=0.3)
    keys, values = d.settings("lowrank", rank=rank, heads="joint"), d.settings("exact")
    groups, tensors = [], {}
    for layer in layers:
        group = MergeGroup((layer,), keys, values)
        fitted = _fitted(model, (layer,), _windows(4, 64, seed=11))["keys"]
        for local, t in LOWRANK.tensors_for(keys.params, fitted).items():
            tensors[f"{local}.{group.label}.keys"] = t
        groups.append(group)
    return MergeProfile(groups=tuple(groups), defaults=d, tensors=tensors)


def test_values_stay_exact_keys_compress_and_bytes_are_counted(tmp_path):
    model = _model()
    profile = _keys_only(model)
    loaded = MergeProfile.load(profile.save(tmp_path / "p"))
    assert loaded == profile and "method: exact" in (tmp_path / "p" / "minicache_config.yaml").read_text()
    ids = _windows(2, 40, seed=3)
    cache, full = MiniCache(loaded, model), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
        model(input_ids=ids, cache=full)
    for layer in (1, 3):
        keys, values = cache.views(layer)
        assert values.merged_length > 0 and values.retained_count == 0, "an exact store retains nothing"
        assert keys.retained_count > 0, "the low-rank keys beside it still retain (gamma 0.3)"
        torch.testing.assert_close(values.materialize(), full.layers[layer].values, rtol=0, atol=0)
        err = (keys.materialize() - full.layers[layer].keys).norm() / full.layers[layer].keys.norm()
        assert 0 < float(err) < 1
    report = cache.memory_report()
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())
    merged = report["groups"][0]["merged_tokens"]
    b, h, d = ids.shape[0], model.config.num_key_value_heads, model.config.head_dim
    assert report["parts"]["exact"] == 2 * b * h * merged * d * 4  # two layers' values, float32
    assert EXACT.saved_layers(EXACT.params(), 1, d) == 0.0


def test_exact_stores_single_layers_only_with_a_clear_message():
    d = Defaults()
    with pytest.raises(ProfileError, match=r"exact stores one layer's vectors as they are, not a group of 2"):
        MergeGroup((4, 5), d.settings("slerp"), d.settings("exact"))
    assert EXACT.param_options(1, False, {}) == [EXACT.params()]
    assert EXACT.param_options(2, True, {}) == []


def test_generate_plain_blockwise_and_quantized_paths_agree():
    model = _model()
    profile = _keys_only(model, layers=(1, 2, 4), rank=4)
    assert_generation_paths_agree(model, profile, _windows(2, 30, seed=3))


def test_the_search_offers_keys_alone_beside_exact_values(tmp_path):
    from minicache.evaluate.quality import evaluate_profile

    model = _model()
    result = calibrate_tiny(model, tmp_path, ("lowrank", "exact"))
    candidates = list(result.search.candidates.values())
    # single layers: keys low rank beside exact values (pairs: beside their least-error values)
    keys_alone = [c for c in candidates if c.variant.startswith("k") and c.size == 1]
    assert keys_alone and all(c.values.method == "exact" and c.keys.method == "lowrank" for c in keys_alone)
    assert all(c.restore_error[1] == 0 and c.saved_layers > 0 for c in keys_alone)
    assert not any(c.keys.method == c.values.method == "exact" for c in candidates), "saves nothing"
    assert all(c.values.method != "exact" for c in candidates if c.size > 1), "exact stores single layers only"
    profile = MergeProfile.load(result.profile.save(tmp_path / "profile"))
    assert evaluate_profile(model, _windows(4, 96, seed=7), 64, profile).compression_ratio > 1.0
