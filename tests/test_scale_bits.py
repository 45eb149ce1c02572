"""8-bit scales and zero points of packed groups (``Quantization.scale_bits``, issue 18)."""

import dataclasses

import pytest
import torch

from minicache.profile import ProfileError, Quantization
from minicache.quant import get_quantizer, quantize
from minicache.quant.packed import ZERO_STEPS, decode_scales, encode_scales
from minicache.runtime.layers import QuantizedLayer
from tests.test_cache import left_padded_batch, make_model, profile_for, sequence, sum_of_storages
from tests.test_quant import _feed, decode_on_both_torch_paths


def _groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 64, 32, generator=g) * torch.logspace(-3, 1, 32)  # ranges over four decades
    x[0, 0] += 7.0  # channels whose offset lies far beyond their spread: their groups get coarser scales
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_8_bit_scales_round_within_their_bound_in_half_the_bytes(bits, axis):
    x = _groups()
    floats = quantize(x, bits, 16, axis)
    codes = quantize(x, bits, 16, axis, scale_bits=8)
    assert codes.scale.dtype == torch.uint8 and codes.zero.dtype == torch.int8 and codes.scale_bits == 8
    assert codes.data.shape == floats.data.shape
    assert codes.scale_bytes * 4 == floats.scale_bytes  # fp32 data: fp32 scales and zero points, 4 bytes each
    half = x.half()
    assert quantize(half, bits, 16, axis, scale_bits=8).scale_bytes * 2 == quantize(half, bits, 16, axis).scale_bytes
    top = (1 << bits) - 1
    dim = -2 if axis == "tokens" else -1
    grouped = x.reshape(3, 4, 4, 16, 32) if axis == "tokens" else x.reshape(3, 4, 64, 2, 16)
    true_step = (grouped.amax(dim) - grouped.amin(dim)) / top
    step, _ = codes.scales()
    widened = step > true_step * 2 ** (1 / 16) * 1.0001
    # Nearest of eight codes per octave, unless the zero point had to be reached with a coarser one.
    ratio = step[~widened] / true_step[~widened]
    assert ratio.min() >= 2 ** (-1 / 16) * 0.9999 and ratio.max() <= 2 ** (1 / 16) * 1.0001
    # Error: half a step, or what clamping the top of a group at a scale 4.4 % short costs, plus the zero's rounding.
    bound = torch.maximum(0.5 * step, (1 - 2 ** (-1 / 16)) * top * true_step + step / (2 * ZERO_STEPS))
    err = (codes.dequantize(torch.float32) - x).abs()
    err = err.reshape(grouped.shape).amax(dim)
    assert (err <= bound * 1.001 + 1e-6).all()
    # Near the float format's error: a few percent more on average.
    mse_codes = (codes.dequantize(torch.float32) - x).square().mean()
    mse_floats = (floats.dequantize(torch.float32) - x).square().mean()
    assert mse_floats < mse_codes < 1.35 * mse_floats


def test_a_group_far_from_zero_gets_a_coarser_scale_that_reaches_it():
    lo, hi = torch.tensor([100.0, -50.0, 0.0, 1e-9]), torch.tensor([101.0, -49.5, 0.0, 1e-9])
    scale, zero = encode_scales(lo, hi, 7)
    step, restored_zero = decode_scales(scale, zero)
    assert (zero.int().abs() <= 128).all() and (restored_zero <= lo + step / 2 + 1e-6).all()
    assert step[0] >= 100 * ZERO_STEPS / 127 * 0.999  # widened: 32 steps reach 100
    # The group still restores within half a (coarse) step of every value.
    x = torch.stack([torch.linspace(100.0, 101.0, 8), torch.linspace(-50.0, -49.5, 8)])
    q = quantize(x.unsqueeze(0), 3, 8, "channels", scale_bits=8)
    step, _ = q.scales()
    assert ((q.dequantize(torch.float32)[0] - x).abs() <= step[0] / 2 + step[0] / ZERO_STEPS).all()
    # A constant group restores its value.
    flat = quantize(torch.full((1, 1, 1, 8), 0.25), 2, 8, "channels", scale_bits=8)
    torch.testing.assert_close(flat.dequantize(torch.float32), torch.full((1, 1, 1, 8), 0.25), atol=2e-3, rtol=0)


def test_tensors_quantized_with_different_scale_widths_do_not_concatenate():
    x = _groups(1)
    a, b = quantize(x, 3, 16, "tokens"), quantize(x, 3, 16, "tokens", scale_bits=8)
    with pytest.raises(ValueError, match="differently"):
        a.cat(b)
    both = b.cat(b)
    assert both.scale_bits == 8 and both.slice_tokens(16, 48).scale_bits == 8
    torch.testing.assert_close(both.slice_tokens(64, 128).dequantize(torch.float32), b.dequantize(torch.float32))
    with pytest.raises(ValueError, match="scale_bits"):
        quantize(x, 3, 16, "tokens", scale_bits=4)


def test_every_built_in_scheme_packs_with_8_bit_scales():
    x = _groups(2)[..., :32, :]
    for name in ("kivi", "rotated", "rotated-mse", "rotated-lloyd"):
        q = get_quantizer(name)
        assert 8 in q.scale_widths
        for role in ("keys", "values", "vectors"):
            packed = q.quantize(x, role, 3, 16, 8)
            assert packed.scale_bits == 8 and packed.scale.dtype == torch.uint8
            err = (q.dequantize(packed, torch.float32) - x).square().mean() / x.square().mean()
            assert err < 0.05, (name, role)


def test_an_8_bit_scale_layer_stores_scales_in_half_the_bytes_and_restores_close():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 48, 16).half(), torch.randn(2, 3, 48, 16).half()
    spec = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2)
    floats, codes = QuantizedLayer(spec), QuantizedLayer(dataclasses.replace(spec, scale_bits=8))
    for layer in (floats, codes):
        _feed(layer, keys, values, [13, 1, 1, 9, 16, 8])
    assert codes.quantized_length == floats.quantized_length == 40
    parts_f, parts_c = floats.memory_parts(), codes.memory_parts()
    assert parts_c["scales"] * 2 == parts_f["scales"] > 0
    assert parts_c["packed"] == parts_f["packed"] and parts_c["residual"] == parts_f["residual"]
    assert sum(parts_c.values()) == sum(t.numel() * t.element_size() for t in codes.tensors())
    k_f, v_f = floats.update(keys[..., :0, :], values[..., :0, :])
    k_c, v_c = codes.update(keys[..., :0, :], values[..., :0, :])
    assert torch.equal(k_c[..., 40:, :], keys[..., 40:, :])  # the window is untouched
    for got, want, ref in ((k_c, keys, k_f), (v_c, values, v_f)):
        err_c = (got.float() - want.float())[..., 2:40, :].square().mean()
        err_f = (ref.float() - want.float())[..., 2:40, :].square().mean()
        assert 0 < err_c < 1.5 * err_f


def test_8_bit_scales_decode_the_same_on_every_torch_path_and_are_counted():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 29])
    quant = Quantization(bits=3, group_size=8, residual_length=8, scheme="rotated", sink_tokens=2,
                         pre_rope_keys=True, window_bits=8, scale_bits=8)
    profile = profile_for(model, groups=((0, 1),)).with_quantization(quant)
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    layer = sequence(restore).layers[2]
    assert layer.quantized_length > 0 and layer.qkeys.scale_bits == 8 and layer.qkeys.scale.dtype == torch.uint8
    assert sequence(restore).views(0)[0].qdirection.scale_bits == 8  # the merged group's store too
    assert restore.memory_report()["kv_bytes"] == sum_of_storages(restore)


def test_a_scheme_without_8_bit_scales_refuses_them_by_name():
    """(The field in profiles, storage specs and options: ``tests/test_key_storage.py``.)"""
    from minicache.quant import register_quantizer, unregister_quantizer
    from minicache.quant.base import Quantizer
    from minicache.quant.kivi import KiviQuantizer

    @register_quantizer
    class FloatScalesOnly(Quantizer):
        name = "test-float-scales"
        bits = (4,)

        def quantize(self, x, role, bits, group_size, scale_bits=None):
            return KiviQuantizer().quantize(x, role, bits, group_size)

        def chunk_tokens(self, role, group_size):
            return KiviQuantizer().chunk_tokens(role, group_size)

    try:
        with pytest.raises(ProfileError, match="scale width of scheme 'test-float-scales'") as info:
            Quantization(bits=4, scheme="test-float-scales", scale_bits=8)
        assert info.value.path == "scale_bits"
        assert Quantization(bits=4, scheme="test-float-scales").scale_bits is None
    finally:
        unregister_quantizer("test-float-scales")
