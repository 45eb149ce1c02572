"""Keys stored before RoPE (``pre_rope: true``): a merged group's method sees the keys with RoPE removed at
their cache indices, and every restore turns them back; the calibration offers such key options."""

from __future__ import annotations

import itertools

import pytest
import torch

from minicache import MergeProfile, MiniCache
from minicache.calibrate.capture import without_rope
from minicache.methods import get_method
from minicache.methods.lowrank import SecondMoments, fit_bases
from minicache.profile import Defaults, MergeGroup, MergeSettings, ProfileError
from minicache.runtime.rope import RopeAngles
from tests.test_lowrank import (
    _kv,
    _model,
    _windows,
    assert_generation_paths_agree,
    calibrate_tiny,
    greedy_with_scores,
)

LOWRANK = get_method("lowrank")


def _profile(model, groups, rank=4, pre_rope=True, defaults=None) -> MergeProfile:
    """Low-rank keys (bases fitted before RoPE when ``pre_rope``) and low-rank values, per group."""
    d = defaults or Defaults(residual_length=8, block_size=4, gamma=0.05)
    kv = _kv(model, _windows(4, 64, seed=11) % model.config.vocab_size)
    if pre_rope:
        kv = without_rope(kv, RopeAngles.of_model(model))
    h, dim = kv[0][0].shape[1], kv[0][0].shape[-1]
    stat = SecondMoments(len(kv), h, dim, max_offset=max(len(g) for g in groups) - 1)
    stat.add(kv, sink_tokens=1)
    out, tensors = [], {}
    for layers in groups:
        keys = d.settings("lowrank", rank=rank, pre_rope=pre_rope)
        values = d.settings("lowrank", rank=rank)
        group = MergeGroup(tuple(layers), keys, values)
        for name, fitted in fit_bases(stat, tuple(layers)).items():
            settings = keys if name == "keys" else values
            for local, t in LOWRANK.tensors_for(settings.params, fitted).items():
                tensors[f"{local}.{group.label}.{name}"] = t
        out.append(group)
    return MergeProfile(groups=tuple(out), defaults=d, tensors=tensors)


def test_restored_keys_are_the_projection_before_rope_turned_back():
    model = _model()
    profile = _profile(model, [(2, 3)], rank=4)
    rope = RopeAngles.of_model(model)
    ids = _windows(2, 40, seed=5) % model.config.vocab_size
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    store = cache.stores[0]
    merged = store.merged_length
    assert merged > 0
    kv = _kv(model, ids)
    tensors = profile.tensors_of(profile.groups[0], "keys")
    for member, layer in enumerate((2, 3)):
        want_all = kv[layer][0]
        # by hand: centre, project on the basis, restore, put RoPE back
        x = torch.stack([rope.remove(kv[m][0][..., :merged, :], 0) for m in (2, 3)], dim=3)  # [B, H, N, k, D]
        b, h, n, k, d = x.shape
        centred = x - tensors["mean"].permute(1, 0, 2).unsqueeze(1)
        basis = tensors["basis"].reshape(k * h * d, -1)
        flat = centred.permute(0, 2, 3, 1, 4).reshape(b, n, k * h * d)
        restored = (flat @ basis @ basis.T).reshape(b, n, k, h, d).permute(0, 3, 1, 2, 4) + tensors["mean"].permute(
            1, 0, 2).unsqueeze(1)
        want = rope.apply(restored[..., member, :], 0)
        got = store.components["keys"].restored(member)
        assert got.shape == want_all.shape
        # retained tokens (sinks, gamma) are exact; every other merged key is the pre-RoPE projection
        exact = (got[..., :merged, :] - want_all[..., :merged, :]).abs().amax(-1) < 1e-6
        assert exact[..., 0].all(), "the sink token is kept exact"
        torch.testing.assert_close(got[..., :merged, :][~exact], want[~exact], rtol=1e-4, atol=1e-4)
        assert torch.equal(got[..., merged:, :], want_all[..., merged:, :]), "the residual window is exact"
    # before RoPE is not after RoPE: the same layers stored post-RoPE restore other keys
    post = MiniCache(_profile(model, [(2, 3)], rank=4, pre_rope=False), model)
    with torch.no_grad():
        model(input_ids=ids, cache=post)
    assert not torch.allclose(post.stores[0].components["keys"].restored(0),
                              store.components["keys"].restored(0), atol=1e-3)


def test_generation_through_the_restore_and_blockwise_paths_agree_and_bytes_are_counted():
    model = _model()
    profile = _profile(model, [(1,), (3, 4, 5)], rank=4)
    assert_generation_paths_agree(model, profile, _windows(2, 30, seed=3))
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=_windows(1, 40, seed=4) % model.config.vocab_size, cache=cache)
    report = cache.memory_report()
    assert report["parts"]["rope"] == RopeAngles.of_model(model).inv_freq.numel() * 4, "the frequencies, once"
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors()) + report["parts"]["rope"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_left_padded_rows_store_what_they_store_alone(arch):
    from tests.test_cache import greedy, left_padded_batch

    model = _model(arch)
    profile = _profile(model, [(1,), (2, 3)], rank=4)
    lengths = [46, 31]
    ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=2)
    batch_out = greedy(model, ids, mask, MiniCache(profile, model), new_tokens=6)
    for row, n in enumerate(lengths):
        alone = greedy(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], MiniCache(profile, model),
                       new_tokens=6)
        assert torch.equal(batch_out[row, -6:], alone[0, -6:])


def test_profiles_say_pre_rope_for_keys_only_and_read_as_before_without_it(tmp_path):
    model = _model()
    profile = _profile(model, [(2, 3)], rank=4)
    assert profile.groups[0].keys.to_dict()["pre_rope"] is True
    assert "pre_rope" not in profile.groups[0].values.to_dict(), "written only where it is on"
    assert "pre-RoPE" in profile.groups[0].keys.summary()
    loaded = MergeProfile.load(profile.save(tmp_path / "p"))
    assert loaded.groups[0].keys.pre_rope and not loaded.groups[0].values.pre_rope
    settings = MergeSettings.create("lowrank", rank=4, pre_rope=True)
    with pytest.raises(ProfileError, match=r"values\.pre_rope.*only keys carry RoPE"):
        MergeGroup((2, 3), settings, settings)
    with pytest.raises(ProfileError, match="pre_rope"):
        MergeSettings.from_dict({"method": "lowrank", "rank": 4, "pre_rope": "yes"})


def test_a_model_without_rope_refuses_pre_rope_keys_clearly():
    model = _model()
    profile = _profile(model, [(2, 3)], rank=4)
    del model.model.rotary_emb
    with pytest.raises(ProfileError, match=r"groups\[0\]\.keys\.pre_rope.*no rotary embedding"):
        MiniCache(profile, model)


def test_calibration_offers_key_options_before_rope_and_ships_their_bases(tmp_path):
    model = _model()
    both = calibrate_tiny(model, tmp_path, ("lowrank",), key_rope="both").search.candidates.values()
    post = calibrate_tiny(model, tmp_path, ("lowrank",), key_rope="post").search.candidates.values()
    assert any(c.keys.pre_rope for c in both) and not any(c.values.pre_rope for c in both)
    assert not any(c.keys.pre_rope for c in post), "post offers keys as the cache receives them"
    only = calibrate_tiny(model, tmp_path, ("lowrank",))  # auto: before RoPE, the model's RoPE can be removed
    profile = only.profile
    assert profile.calibration["key_rope"] == "pre"
    keyed = [g for g in profile.groups if g.keys.method == "lowrank"]
    assert keyed and all(g.keys.pre_rope for g in keyed)
    # the shipped key bases are the ones fitted before RoPE: they restore the calibration keys turned back
    loaded = MergeProfile.load(profile.save(tmp_path / "pre"))
    cache = MiniCache(loaded, model)
    with torch.no_grad():
        model(input_ids=_windows(1, 64, seed=8) % model.config.vocab_size, cache=cache)
    assert cache.memory_report()["compression_ratio"] > 1.0
    with pytest.raises(ValueError, match="query-weighted"):
        calibrate_tiny(model, tmp_path, ("lowrank",), key_rope="pre", method_options={"lowrank_basis": "query"})
    # auto with query-weighted bases (fitted for post-RoPE logits) offers keys after RoPE
    queried = calibrate_tiny(model, tmp_path, ("lowrank",), method_options={"lowrank_basis": "query"})
    assert queried.profile.calibration["key_rope"] == "post"
    assert not any(g.keys.pre_rope for g in queried.profile.groups)


def test_the_capture_fits_and_measures_key_options_on_keys_without_rope():
    from minicache.calibrate.capture import CalibrationCapture

    model = _model()
    rope = RopeAngles.of_model(model)
    h, d, layers = model.config.num_key_value_heads, model.config.head_dim, model.config.num_hidden_layers
    capture = CalibrationCapture([LOWRANK], [(2,), (2, 3)], fit=True, num_layers=layers, num_heads=h, head_dim=d,
                                 max_offset=1, gamma=0.0, window=4, rope=rope, key_rope="both")
    batches = [_kv(model, _windows(2, 32, seed=s) % model.config.vocab_size) for s in (1, 2)]
    for i, kv in enumerate(batches):
        capture.add(kv, i, len(batches))
    options = capture.errors.options
    assert {o.pre_rope for o in options[(2,), "keys"]} == {False, True}
    assert {o.pre_rope for o in options[(2,), "values"]} == {False}
    # the fit before RoPE is the statistic of the keys turned back: its mean is theirs (sinks left out)
    fitted = capture.fitted(LOWRANK, (2,), pre_rope=True)["keys"]["mean"]
    turned = torch.cat([without_rope(kv, rope)[2][0][..., 1:, :] for kv in batches], dim=0)
    torch.testing.assert_close(fitted[0], turned.mean(dim=(0, 2)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(capture.fitted(LOWRANK, (2,))["keys"]["mean"], fitted, atol=1e-3)
    # the pre-RoPE options are measured on the keys they encode: error falls as the rank grows
    rel = capture.errors.relative_error((2,), "keys")
    joint = sorted((o.params.rank, float(rel[i])) for i, o in enumerate(options[(2,), "keys"])
                   if o.pre_rope and o.params.heads == "joint")
    assert all(b <= a + 1e-9 for (_, a), (_, b) in itertools.pairwise(joint)) and 0 < joint[0][1] < 1
    with pytest.raises(ValueError, match="needs the model's RoPE"):
        CalibrationCapture([LOWRANK], None, fit=True, num_layers=layers, num_heads=h, head_dim=d, max_offset=0,
                           gamma=0.0, window=4, key_rope="pre")


def test_the_shipped_pre_rope_lowrank_profile_fits_smollm2_and_stores_less(smollm2):
    from pathlib import Path

    model, tokenizer = smollm2
    profile = MergeProfile.load(Path(__file__).parent.parent / "profiles" / "smollm2-135m-instruct-lowrank-prerope")
    profile.check_model(model.config)
    keyed = [g for g in profile.groups if g.keys.method == "lowrank"]
    assert keyed and all(g.keys.pre_rope for g in keyed) and not any(g.values.pre_rope for g in profile.groups)
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]
    cache = MiniCache(profile, model)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache).logits
    report = cache.memory_report()
    assert torch.isfinite(logits).all() and report["compression_ratio"] > 1.1  # its bases count, once per cache
    assert report["parts"]["rope"] > 0


def test_a_closed_loop_method_restores_pre_rope_keys_in_layer_order_exactly():
    """The predictive residual stores every member exactly when unquantized: with its keys before RoPE,
    the restore path and the blockwise path must still give the full cache's tokens (RoPE turned back
    on the chain it restores, layer after layer)."""
    from dataclasses import replace

    from tests.test_predictive import _profile as predictive_profile

    model = _model()
    plain = predictive_profile(model, [(1, 2, 3, 4)])
    groups = tuple(replace(g, keys=replace(g.keys, pre_rope=True)) for g in plain.groups)
    profile = replace(plain, groups=groups)
    ids = _windows(2, 30, seed=3)
    (restored,) = assert_generation_paths_agree(model, profile, ids, quantizations=(None,))
    assert torch.equal(restored.sequences, greedy_with_scores(model, ids, None).sequences)


@pytest.mark.parametrize("scheme", ["kivi", "rotated"])
def test_a_direction_method_with_pre_rope_keys_reads_alike_on_both_paths(scheme):
    """Averaging (direction and magnitudes, the kernels' layout) with keys before RoPE: the blockwise path
    restores them per block even where a rotated packing would otherwise be read in its frame."""
    from minicache.profile import Quantization

    model = _model()
    d = Defaults(residual_length=8, block_size=4, gamma=0.05)
    group = MergeGroup((2, 3), d.settings("average", pre_rope=True), d.settings("average"))
    quantization = Quantization(bits=4, group_size=8, residual_length=8, scheme=scheme)
    assert_generation_paths_agree(model, MergeProfile(groups=(group,), defaults=d), _windows(2, 30, seed=3),
                                  quantizations=(quantization,))
