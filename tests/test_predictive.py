"""The predictive-residual method: each layer predicted from the one below (``minicache.methods.predictive``)."""

from __future__ import annotations

import pytest
import torch

from minicache import MergeProfile, MiniCache
from minicache.methods import get_method
from minicache.methods.lowrank import SecondMoments
from minicache.methods.predictive import PredictiveParams, fit_predictors
from minicache.profile import Defaults, MergeGroup, ProfileError, Quantization
from minicache.quant import get_quantizer
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from tests.test_lowrank import _kv, _model, _windows  # the same tiny Llama and random windows

PREDICTIVE = get_method("predictive_residual")
KIVI = get_quantizer("kivi")


def _profile(model, groups, heads="joint", quantization=None, weight_dtype=torch.float32) -> MergeProfile:
    d = Defaults(residual_length=8, block_size=4, gamma=0.0)
    kv = _kv(model, _windows(4, 64, seed=11))
    stat = SecondMoments(len(kv), kv[0][0].shape[1], kv[0][0].shape[-1], max_offset=1)
    stat.add(kv, sink_tokens=1)
    out, tensors = [], {}
    for layers in groups:
        settings = d.settings("predictive_residual", heads=heads)
        group = MergeGroup(tuple(layers), settings, settings)
        for name, fitted in fit_predictors(stat, tuple(layers)).items():
            for local, t in PREDICTIVE.tensors_for(settings.params, fitted).items():
                tensors[f"{local}.{group.label}.{name}"] = t.to(weight_dtype) if local == "weight" else t
        out.append(group)
    return MergeProfile(groups=tuple(out), defaults=d, tensors=tensors, quantization=quantization)


def _roundtrip(bits: int, group: int):
    return lambda r: KIVI.dequantize(KIVI.quantize(r.to(torch.float32), "vectors", bits, group), torch.float32)


def test_the_fit_recovers_a_linear_map_between_layers():
    g = torch.Generator().manual_seed(0)
    h, d, n = 2, 4, 4000
    w = torch.randn(h * d, h * d, generator=g, dtype=torch.float64) / (h * d) ** 0.5
    below = torch.randn(1, n, h * d, generator=g, dtype=torch.float64) + 3.0  # an offset the means absorb
    above = below @ w + 0.5

    def layer(flat):  # [1, n, H·D] -> [B=1, H, T=n, D]
        return flat.reshape(1, n, h, d).permute(0, 2, 1, 3).float()

    kv = [(layer(below), layer(below)), (layer(above), layer(above))]
    stat = SecondMoments(2, h, d, max_offset=1)
    stat.add(kv, sink_tokens=0)
    fitted = fit_predictors(stat, (0, 1), ridge=1e-9)["keys"]
    torch.testing.assert_close(fitted["weight_joint"][0].double(), w, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fitted["mean"][1].reshape(-1).double(), (below.mean(1) @ w + 0.5)[0],
                               rtol=1e-4, atol=1e-4)
    # per-head maps see only their head's rows: the cross-head part of w is lost
    assert fitted["weight_each"].shape == (1, h, d, d)


def test_the_rope_map_commutes_with_rope_and_recovers_an_equivariant_map():
    g = torch.Generator().manual_seed(0)
    h, d, n = 2, 8, 3000
    half = d // 2
    c = torch.complex(torch.randn(half, h, h, generator=g, dtype=torch.float64),
                      torch.randn(half, h, h, generator=g, dtype=torch.float64))
    z = torch.complex(torch.randn(n, h, half, generator=g, dtype=torch.float64),
                      torch.randn(n, h, half, generator=g, dtype=torch.float64))
    y = torch.einsum("nhi,ihk->nki", z, c)

    def layer(w):  # complex [n, H, D/2] -> [1, H, n, D], channel pair (i, i + D/2) = (real, imaginary)
        return torch.cat([w.real, w.imag], dim=-1).permute(1, 0, 2).unsqueeze(0).float()

    stat = SecondMoments(2, h, d, max_offset=1)
    stat.add([(layer(z), layer(z)), (layer(y), layer(y))], sink_tokens=0)
    weight = fit_predictors(stat, (0, 1), ridge=1e-9)["keys"]["weight_rope"][0].double()
    flat = layer(z)[0].permute(1, 0, 2).reshape(n, h * d).double()
    want = layer(y)[0].permute(1, 0, 2).reshape(n, h * d).double()
    torch.testing.assert_close(flat @ weight, want, rtol=1e-3, atol=1e-3)
    # RoPE at any position p: the same turn of every head's pair i by p·θ_i; the map commutes with it
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    for p in (3.0, 5000.0):
        cos, sin = torch.cos(p * theta), torch.sin(p * theta)
        turn = torch.zeros(d, d, dtype=torch.float64)
        i = torch.arange(half)
        turn[i, i], turn[i + half, i + half] = cos, cos
        turn[i + half, i], turn[i, i + half] = -sin, sin  # x R: a' = a cos − b sin, b' = b cos + a sin
        rope = torch.block_diag(*[turn] * h)
        torch.testing.assert_close(rope @ weight, weight @ rope, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads", ["joint", "each"])
@pytest.mark.parametrize("rotate", [True, False])
def test_closed_loop_errors_do_not_add_up_along_the_group(heads, rotate):
    model = _model()
    profile = _profile(model, [(1, 2, 3, 4, 5)], heads=heads)
    group = profile.groups[0]
    params = PredictiveParams(heads=heads, rotate=rotate)
    tensors = profile.tensors_of(group, "values")
    kv = _kv(model, _windows(2, 40, seed=5))
    xs = [kv[layer][1][..., 1:, :] for layer in group.layers]
    roundtrip = _roundtrip(3, 16)
    encoded = PREDICTIVE.encode(params, xs, tensors, roundtrip=roundtrip)
    stored = {"residuals": roundtrip(encoded.fields["residuals"])}
    d = xs[0].shape[-1]
    for member, x in enumerate(xs):
        restored = PREDICTIVE.decode(params, stored, member, tensors, torch.float32)
        error = (restored - x).square().sum()
        # a member's error is its own residual's rounding, nothing inherited from below
        residual = encoded.fields["residuals"][..., member * d:(member + 1) * d]
        own = (roundtrip(residual) - residual).square().sum()
        torch.testing.assert_close(error, own, rtol=1e-3, atol=1e-6)
    # unquantized (float32 storage) it restores exactly
    plain = PREDICTIVE.encode(params, xs, tensors)
    for member, x in enumerate(xs):
        torch.testing.assert_close(PREDICTIVE.decode(params, plain.fields, member, tensors, torch.float32), x,
                                   rtol=1e-4, atol=1e-4)
    assert encoded.distance.shape == xs[0].shape[:3]
    assert float(encoded.distance.min()) >= 0 and float(encoded.distance.max()) <= 1


def test_prediction_leaves_less_to_store_than_the_layer_itself():
    model = _model()
    profile = _profile(model, [(2, 3)])
    tensors = profile.tensors_of(profile.groups[0], "keys")
    kv = _kv(model, _windows(4, 64, seed=11))  # the fitting data: in sample, the fit cannot do worse
    xs = [kv[2][0][..., 1:, :], kv[3][0][..., 1:, :]]
    residual = PREDICTIVE.encode(PredictiveParams(rotate=False), xs, tensors).fields["residuals"][..., 16:]
    centred = xs[1] - tensors["mean"][1][None, :, None, :]
    assert float(residual.square().sum()) < float(centred.square().sum())


def test_profile_round_trip_and_tensor_validation(tmp_path):
    model = _model()
    profile = _profile(model, [(1, 2, 3)], weight_dtype=torch.float16)
    path = profile.save(tmp_path / "p")
    assert "method: predictive_residual" in path.read_text()
    loaded = MergeProfile.load(path)
    assert loaded == profile
    loaded.check_model(model.config)
    data = profile.to_dict()
    tensors = {n: profile.tensors[n] for n in profile.tensors.names()}
    bad = dict(tensors, **{"weight.1-3.keys": tensors["weight.1-3.keys"][:1]})
    with pytest.raises(ProfileError, match=r"weight\.1-3\.keys has shape \[1, 32, 32\]; allowed: \[2, H\*D, H\*D\]"):
        MergeProfile.from_dict(data, tensors=bad).check_model(model.config)
    bad = dict(tensors, **{"mean.1-3.values": tensors["mean.1-3.values"].half()})
    with pytest.raises(ProfileError, match="dtype float16; allowed: float32"):
        MergeProfile.from_dict(data, tensors=bad)
    nan = tensors["weight.1-3.values"].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ProfileError, match="non-finite"):
        MergeProfile.from_dict(data, tensors=dict(tensors, **{"weight.1-3.values": nan}))
    with pytest.raises(ProfileError, match="rope: true needs heads: joint"):
        PredictiveParams(heads="each", rope=True)
    with pytest.raises(ProfileError, match="fewer than 2 layers"):
        MergeProfile.from_dict({"format_version": 2, "groups": [
            {"layers": [1], "keys": {"method": "predictive_residual"}, "values": {"method": "predictive_residual"}}]})


def test_quantized_cache_stores_packed_residuals_and_counts_the_maps():
    model = _model()
    quant = Quantization(bits=3, group_size=16, residual_length=8)
    profile = _profile(model, [(0, 1, 2), (3, 4, 5)], quantization=quant, weight_dtype=torch.float16)
    ids = _windows(2, 40, seed=3)
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    report = cache.memory_report()
    assert report["kv_bytes"] == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert report["groups"][0]["merged_tokens"] > 0
    assert report["parts"]["packed"] > 0 and report["parts"]["residuals"] == 0, "every residual is packed"
    maps = sum(t.numel() * t.element_size() for n in profile.tensors.names() for t in [profile.tensors[n]])
    assert report["parts"]["predictors"] == maps
    # 3-bit codes of k·D columns per token: 16 columns x 3 bits = 6 bytes per member and token, for
    # the merged tokens and for the sink token, kept exact in the retained list (packed too)
    merged = report["groups"][0]["merged_tokens"]
    h = model.config.num_key_value_heads
    assert report["parts"]["packed"] == 2 * 2 * 2 * h * (merged + 1) * 3 * 6  # groups, components, batch, members


def test_generate_through_the_cache_and_the_blockwise_path_agree():
    model = _model()
    ids = _windows(2, 30, seed=3)

    def generate(cache):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8,
                              do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    full = generate(None)
    for quantization in (None, Quantization(bits=4, group_size=16, residual_length=8)):
        profile = _profile(model, [(1, 2, 3, 4)], quantization=quantization)
        want = generate(MiniCache(profile, model))
        assert enable_fused_attention(model, backend="torch")
        cache = MiniCache(profile, model)
        got = generate(cache)
        disable_fused_attention(model)
        assert cache.memory_report()["groups"][0]["merged_tokens"] > 0
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if quantization is None:  # float32 storage of the residual: the full cache's tokens
            assert torch.equal(want.sequences, full.sequences)


def test_restoring_in_layer_order_reuses_the_member_below_and_keeps_nothing_after_the_step():
    model = _model()
    quant = Quantization(bits=3, group_size=16, residual_length=8)
    profile = _profile(model, [(1, 2, 3, 4)], quantization=quant)
    cache = MiniCache(profile, model)
    with torch.no_grad():
        model(input_ids=_windows(2, 40, seed=3), cache=cache)
    for component in cache.stores[0].components.values():
        assert component.length > 0 and component._chain is None, "the last member dropped the chain"
        for member in range(4):  # in layer order: each restore starts from the one below
            chained = component.restored(member)
            alone = component.view(member).materialize()  # the whole chain walked again
            torch.testing.assert_close(chained, alone, rtol=0, atol=1e-6)
        assert component._chain is None


@pytest.mark.parametrize(("scheme", "group_size", "match"), [
    ("rotated", 16, "mixes them"),  # the rotation spans every member's columns
    ("kivi", 32, "mixes them"),  # per-token groups of 32 channels span two members of 16
])
def test_packings_that_mix_members_are_refused(scheme, group_size, match):
    model = _model()
    quant = Quantization(bits=4, group_size=group_size, residual_length=8, scheme=scheme)
    profile = _profile(model, [(1, 2)], quantization=quant)
    cache = MiniCache(profile, model)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(input_ids=_windows(1, 40, seed=3), cache=cache)


def test_it_saves_nothing_unquantized_and_the_search_does_not_offer_it():
    assert PREDICTIVE.saved_layers(PredictiveParams(), 3, 64) == 0.0
    assert PREDICTIVE.stored_bytes_per_token(PredictiveParams(), 3, 64, torch.bfloat16) == 3 * 64 * 2
    assert PREDICTIVE.param_options(3, True, {"head_dim": 64}) == []
