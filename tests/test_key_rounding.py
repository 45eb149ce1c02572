"""Keys rounded for the queries (``Quantization.key_rounding: queries``, error feedback; issue 18)."""

import dataclasses

import pytest
import torch

from minicache import MergeProfile
from minicache.calibrate.key_weights import query_energies
from minicache.profile import KEY_WEIGHTS_TENSOR, ModelFingerprint, ProfileError, Quantization
from minicache.quant import get_quantizer, quantize
from minicache.quant.packed import code_values, feedback_factor
from minicache.quant.rotated import rotation_matrix
from minicache.runtime.layers import QuantizedLayer, packing_input
from tests.test_cache import left_padded_batch, make_model, profile_for, sequence, sum_of_storages
from tests.test_quant import _feed, decode_on_both_torch_paths


def _keys(seed=0, shape=(2, 3, 64, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.linspace(0.2, 3.0, shape[-1])


def _weights(heads=3, dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(heads, dim, generator=g) ** 4 + 1e-3  # a few channels the queries read, most not


def _weighted_error(q, x, weights):
    return ((q.dequantize(torch.float32) - x).square() * weights[:, None, :]).sum()


@pytest.mark.parametrize("axis", ["tokens", "channels"])
@pytest.mark.parametrize("scale_bits", [None, 8])
def test_feedback_rounds_to_the_same_levels_and_lowers_the_weighted_error(axis, scale_bits):
    x, weights, rotation = _keys(), _weights(), rotation_matrix(32)
    nearest = quantize(x, 3, 16, axis, rotation, scale_bits=scale_bits)
    steered = quantize(x, 3, 16, axis, rotation, scale_bits=scale_bits, weights=weights)
    # only the codes differ: the same groups, scales, zero points and bytes
    assert torch.equal(steered.scale, nearest.scale) and torch.equal(steered.zero, nearest.zero)
    assert steered.nbytes == nearest.nbytes and not torch.equal(steered.data, nearest.data)
    assert int(code_values(steered.data, 3).max()) <= 7
    assert _weighted_error(steered, x, weights) < 0.6 * _weighted_error(nearest, x, weights)
    # the plain squared error is what it pays with
    mse = (steered.dequantize(torch.float32) - x).square().sum()
    assert mse > (nearest.dequantize(torch.float32) - x).square().sum()


def test_even_weights_or_no_rotation_leave_nothing_to_push():
    x, rotation = _keys(2), rotation_matrix(32)
    nearest = quantize(x, 2, 16, "tokens", rotation, scale_bits=8)
    even = quantize(x, 2, 16, "tokens", rotation, scale_bits=8, weights=torch.full((3, 32), 0.7))
    assert torch.equal(even.data, nearest.data)
    # without a rotation every channel's error is its own: the factor is diagonal, the codes nearest
    factor = feedback_factor(_weights())
    assert torch.equal(factor, torch.diag_embed(factor.diagonal(dim1=-2, dim2=-1)))
    assert torch.equal(quantize(x, 3, 16, "tokens", weights=_weights()).data, quantize(x, 3, 16, "tokens").data)
    with pytest.raises(ValueError, match="even levels"):
        quantize(x, 2, 16, "tokens", rotation, levels=torch.tensor([0.0, 1.2, 1.8, 3.0]), weights=_weights())


def test_only_rotated_schemes_round_by_weights():
    for name, supported in (("kivi", False), ("rotated", True), ("rotated-mse", True), ("rotated-lloyd", False)):
        assert get_quantizer(name).weighted_rounding is supported, name
        if supported:
            q = get_quantizer(name).quantize(_keys(), "keys", 3, 16, 8, weights=_weights())
            assert q.rotation is not None
        else:
            with pytest.raises(ProfileError, match="does not round keys by weights") as info:
                Quantization(bits=3, scheme=name, key_rounding="queries")
            assert info.value.path == "key_rounding"
    with pytest.raises(ProfileError, match="not a key rounding"):
        Quantization(bits=3, scheme="rotated", key_rounding="query")
    with pytest.raises(ValueError, match="does not round by weights"):
        get_quantizer("kivi").quantize(_keys(), "keys", 3, 16, weights=_weights())


def _profile_with_weights(weights, model=None, **quant):
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", key_rounding="queries", **quant)
    fingerprint = None if model is None else ModelFingerprint.from_config(model.config)
    return MergeProfile(model=fingerprint, quantization=spec, tensors={KEY_WEIGHTS_TENSOR: weights})


def test_profiles_carry_the_key_weights_in_the_sidecar_and_check_them(tmp_path):
    model = make_model("llama")
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    weights = torch.rand(layers, heads, dim) + 0.1
    profile = _profile_with_weights(weights, model)
    assert "rounded for the queries" in profile.quantization.describe()
    assert profile.quantization.to_dict()["key_rounding"] == "queries"
    profile.save(tmp_path)
    loaded = MergeProfile.load(tmp_path)
    assert loaded.quantization.key_rounding == "queries" and torch.equal(loaded.key_weights(1), weights[1])
    bad = {"shape": weights[:, :, :-1], "negative": -weights, "nan": weights.clone().fill_(float("nan")),
           "silent head": weights * torch.tensor([0.0] + [1.0] * (heads - 1))[None, :, None]}
    for what, tensor in bad.items():
        with pytest.raises(ProfileError, match="key_weights") as info:
            _profile_with_weights(tensor, model)
        assert info.value.path.startswith("tensors"), what
    with pytest.raises(ProfileError, match="needs the tensor") as info:
        MergeProfile(quantization=profile.quantization)
    assert info.value.path == "quantization.key_rounding"
    # another storage: the weights go with the rounding that uses them, and stay while it does
    nearest = profile.with_quantization(dataclasses.replace(profile.quantization, key_rounding="nearest"))
    assert nearest.tensors is None and nearest.key_weights(0) is None
    two_bit = profile.with_quantization(dataclasses.replace(profile.quantization, bits=2))
    assert torch.equal(two_bit.key_weights(0), weights[0])
    with pytest.raises(ProfileError, match="needs the tensor"):
        nearest.with_quantization(profile.quantization)


def test_a_layer_packs_its_keys_by_its_weights_and_its_values_as_before():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 40, 16).half(), torch.randn(1, 2, 40, 16).half()
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2, scale_bits=8)
    weights = _weights(2, 16)
    steered = QuantizedLayer(dataclasses.replace(spec, key_rounding="queries"), key_weights=weights)
    nearest = QuantizedLayer(spec)
    for layer in (steered, nearest):
        _feed(layer, keys, values, [13, 1, 9, 17])
    assert steered.quantized_length == 32
    expected = quantize(packing_input(keys[..., :32, :], "keys", 0, 2, None), 3, 8, "tokens", rotation_matrix(16),
                        scale_bits=8, weights=weights)
    assert torch.equal(steered.qkeys.data, expected.data) and not torch.equal(steered.qkeys.data, nearest.qkeys.data)
    assert torch.equal(steered.qvalues.data, nearest.qvalues.data)
    assert steered.memory_parts() == nearest.memory_parts()
    with pytest.raises(ValueError, match="key weights"):
        QuantizedLayer(dataclasses.replace(spec, key_rounding="queries"))
    with pytest.raises(ValueError, match="key weights"):
        QuantizedLayer(spec, key_weights=weights)


def test_a_cache_rounds_keys_by_the_profile_weights_on_every_torch_path():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 29])
    c = model.config
    weights = torch.rand(c.num_hidden_layers, c.num_key_value_heads, c.head_dim) ** 4 + 1e-3
    quant = Quantization(bits=2, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2,
                         pre_rope_keys=True, window_bits=8, scale_bits=8, key_rounding="queries")
    profile = profile_for(model, groups=((0, 1),)).with_quantization(dataclasses.replace(quant, key_rounding="nearest"))
    profile = MergeProfile(groups=profile.groups, defaults=profile.defaults, quantization=quant,
                           tensors={KEY_WEIGHTS_TENSOR: weights})
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    layer = sequence(restore).layers[2]
    assert layer.quantized_length > 0 and torch.equal(layer.key_weights, weights[2])
    assert restore.memory_report()["kv_bytes"] == sum_of_storages(restore)


def test_query_energies_are_the_queries_mean_squares_per_kv_head_with_rope_pairs_shared():
    model = make_model("llama")
    c = model.config
    ids = torch.randint(3, c.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    weights = query_energies(model, ids, batch_size=2, sink_tokens=1, progress=False)
    assert weights.shape == (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    torch.testing.assert_close(weights.mean(-1), torch.ones(c.num_hidden_layers, c.num_key_value_heads))
    half = c.head_dim // 2
    torch.testing.assert_close(weights[..., :half], weights[..., half:])
    # by hand from layer 0's pre-RoPE queries (RoPE keeps each pair's energy)
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    group = c.num_attention_heads // c.num_key_value_heads
    q = seen[0][:, 1:].reshape(3, 23, c.num_key_value_heads, group, c.head_dim).square().mean((0, 1, 3))
    pair = (q[:, :half] + q[:, half:]) / 2
    expected = torch.cat([pair, pair], -1)
    torch.testing.assert_close(weights[0], (expected / expected.mean(-1, keepdim=True)).float(), rtol=1e-4, atol=1e-5)


def test_calibration_fits_the_key_weights_ships_them_and_predicts_with_them(tmp_path):
    from minicache.calibrate.bits import fisher_damage
    from tests.test_bits import WIDTHS, calibrate_auto_bits
    from tests.test_plugins import _model, _windows

    model = _model()
    quant = Quantization(bits=2, group_size=16, residual_length=16, scheme="rotated", key_rounding="queries")
    result = calibrate_auto_bits(tmp_path, model, quant)
    saved = MergeProfile.load(result.profile.save(tmp_path / "profile"))
    c = model.config
    weights = saved.tensors[KEY_WEIGHTS_TENSOR]
    assert saved.quantization.key_rounding == "queries"
    assert weights.shape == (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    torch.testing.assert_close(weights.mean(-1), torch.ones(weights.shape[:2]))
    # the widths were predicted as the runtime packs: by the weights
    windows = _windows(2, 64, seed=3)
    by_weights = fisher_damage(model, windows, quant, WIDTHS, batch_size=2, key_weights=weights)
    nearest = fisher_damage(model, windows, dataclasses.replace(quant, key_rounding="nearest"), WIDTHS, batch_size=2)
    assert torch.equal(by_weights[:, 1], nearest[:, 1]) and not torch.equal(by_weights[:, 0], nearest[:, 0])
    with pytest.raises(ValueError, match="key_weights"):
        fisher_damage(model, windows, quant, WIDTHS, batch_size=2)


def test_the_option_needs_kv_bits_and_sets_the_field():
    import argparse

    from minicache.cli_options import add_kv_options, quantization_from_args

    parser = argparse.ArgumentParser()
    add_kv_options(parser, auto=True, scheme="rotated")
    args = parser.parse_args(["--kv-bits", "3", "--kv-key-rounding", "queries"])
    assert quantization_from_args(args).key_rounding == "queries"
    assert quantization_from_args(parser.parse_args(["--kv-bits", "3"])).key_rounding == "nearest"
    with pytest.raises(ProfileError, match="needs --kv-bits") as info:
        quantization_from_args(parser.parse_args(["--kv-key-rounding", "queries"]))
    assert info.value.path == "--kv-key-rounding"
    with pytest.raises(ProfileError, match="does not round keys by weights") as info:
        quantization_from_args(parser.parse_args(["--kv-bits", "3", "--kv-scheme", "kivi", "--kv-key-rounding",
                                                  "queries"]))
    assert info.value.path == "--kv-key-rounding"


def test_storage_specs_round_keys_for_the_queries_only_on_a_profile_with_weights(tmp_path):
    from minicache.evaluate.compare import MethodSpec, parse_storage

    spec = parse_storage("rotated:2/64+s4+prerope+w8+z8+qk")
    assert spec.key_rounding == "queries" and spec.scale_bits == 8 and spec.window_bits == 8
    assert parse_storage("rotated:2/64+s4+prerope+w8+z8").key_rounding == "nearest"
    model = make_model("llama")
    c = model.config
    weights = torch.rand(c.num_hidden_layers, c.num_key_value_heads, c.head_dim) + 0.1
    _profile_with_weights(weights, model).save(tmp_path)
    method = MethodSpec.parse(f"{tmp_path}@rotated:2/8+qk")
    profile, _ = method.build(c)
    assert torch.equal(profile.key_weights(0), weights[0]) and profile.quantization.bits == 2
    assert method.quantized["kv_key_rounding"] == "queries"
    assert MethodSpec.parse(f"{tmp_path}@rotated:2/8").build(c)[0].tensors is None
    with pytest.raises(ProfileError, match="needs the tensor"):
        MethodSpec.parse("none@rotated:2/8+qk").build(c)


def test_weights_must_fit_the_heads_and_channels():
    with pytest.raises(ValueError, match="do not fit"):
        quantize(_keys(), 3, 16, "tokens", rotation_matrix(32), weights=_weights(2, 32))
