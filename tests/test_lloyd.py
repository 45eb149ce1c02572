"""Uneven levels (``rotated-lloyd``, issue 18): the table's rules, the packing, and the runtime that reads it."""

import dataclasses

import pytest
import torch

from minicache.profile import Quantization
from minicache.quant import get_quantizer, quantizer_names
from minicache.quant.lloyd import FITTED, LEVELS, levels_table
from minicache.quant.packed import checked_levels, quantize
from minicache.runtime.kernels.support import packing_unsupported
from tests.test_cache import left_padded_batch, make_model, profile_for, sum_of_storages
from tests.test_quant import decode_on_both_torch_paths


def near_gaussian(shape=(2, 3, 128, 64), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.linspace(0.2, 3, shape[-1]) + torch.randn(shape[-1], generator=g))


@pytest.mark.parametrize(("values", "why"), [
    ((0.0, 1.0, 3.0), "4 ascending"),            # too few
    ((0.0, 2.0, 1.0, 3.0), "ascending"),         # not ascending
    ((0.5, 1.0, 2.0, 3.0), "from 0 to 3"),       # the minimum would not be restored
    ((0.0, 1.0, 2.0, 2.9), "from 0 to 3"),       # nor the maximum
    ((0.0, float("nan"), 2.0, 3.0), "finite"),
])
def test_a_level_table_must_keep_the_ends_and_ascend(values, why):
    with pytest.raises(ValueError, match="ascending finite values from 0 to 3"):
        checked_levels(values, 2)
    assert why  # the case's reason, for the reader


def test_the_fitted_tables_are_valid_and_symmetric_and_only_two_bits_is_used():
    assert set(LEVELS) == {2} and LEVELS[2] == FITTED[2], "3 and 4 bits measured worse uneven (module docstring)"
    for bits, values in FITTED.items():
        table = checked_levels(values, bits)
        top = (1 << bits) - 1
        torch.testing.assert_close(table + table.flip(0), torch.full_like(table, float(top)))
        # denser in the middle than even levels: the inner steps are shorter than the outer ones
        steps = table.diff()
        assert steps[len(steps) // 2] < 1 < steps[0]
    assert levels_table(2) is levels_table(2), "one table per width and device (memory counts it once)"
    assert levels_table(3) is None and levels_table(4) is None
    with pytest.raises(ValueError, match="need 8 levels"):
        quantize(near_gaussian(), 3, 64, "tokens", levels=levels_table(2))


@pytest.mark.parametrize("role", ["keys", "values", "vectors"])
def test_wider_codes_are_rotated_bit_for_bit(role):
    x = near_gaussian().to(torch.bfloat16)
    for bits in (3, 4):
        a, b = (get_quantizer(name).quantize(x, role, bits, 64) for name in ("rotated", "rotated-lloyd"))
        assert b.levels is None and all(torch.equal(u, v) for u, v in zip(a.tensors(), b.tensors(), strict=True))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("role", ["keys", "values", "vectors"])
def test_uneven_levels_pack_the_same_bytes_with_less_error(bits, role):
    """Every fitted table (the scheme packs 2 bits with its own; 3 and 4 bits as a table would)."""
    x = near_gaussian().to(torch.bfloat16)
    even = get_quantizer("rotated")
    a = even.quantize(x, role, bits, 64)
    table = checked_levels(FITTED[bits], bits)
    b = quantize(x, bits, a.group_size, a.axis, a.rotation, levels=table)
    if bits == 2:
        packed = get_quantizer("rotated-lloyd").quantize(x, role, bits, 64)
        assert packed.levels is levels_table(2) and torch.equal(packed.data, b.data)
        b = packed
    assert (b.nbytes, b.data.shape, b.scale.shape, b.axis) == (a.nbytes, a.data.shape, a.scale.shape, a.axis)
    assert torch.equal(b.scale, a.scale) and torch.equal(b.zero, a.zero), "the same ranges, other levels"
    assert a.levels is None
    err_a = (a.dequantize(torch.float32) - x.float()).square().sum()
    err_b = (b.dequantize(torch.float32) - x.float()).square().sum()
    assert err_b < 0.97 * err_a
    # every restored value is a table level, and each group's ends stay where even levels put them
    restored, reference = (t.dequantize(torch.float32, unrotate=False) for t in (b, a))
    steps = ((restored - b.zero.float().repeat_interleave(64, -2 if b.axis == "tokens" else -1))
             / b.scale.float().repeat_interleave(64, -2 if b.axis == "tokens" else -1))
    assert (steps.unsqueeze(-1) - table).abs().amin(-1).max() < 1e-3
    dim = -2 if b.axis == "tokens" else -1
    shape = (*x.shape[:-2], -1, 64, x.shape[-1]) if dim == -2 else (*x.shape[:-1], -1, 64)
    torch.testing.assert_close(restored.reshape(shape).amin(dim), reference.reshape(shape).amin(dim))
    torch.testing.assert_close(restored.reshape(shape).amax(dim), reference.reshape(shape).amax(dim))


def test_levels_travel_with_every_view_and_refuse_to_mix_with_even_codes():
    x = near_gaussian().to(torch.bfloat16)
    lloyd = get_quantizer("rotated-lloyd")
    q = lloyd.quantize(x, "keys", 2, 64)
    for view in (q.slice_tokens(64, 128), q.index_select(0, torch.tensor([1])), q.to("cpu"), q.cat(q)):
        assert view.levels is not None and torch.equal(view.levels, q.levels)
    torch.testing.assert_close(q.slice_tokens(64, 128).dequantize(torch.float32),
                               q.dequantize(torch.float32)[..., 64:128, :])
    with pytest.raises(ValueError, match="quantized differently"):
        q.cat(get_quantizer("rotated").quantize(x, "keys", 2, 64))
    with pytest.raises(ValueError, match="quantized differently"):
        q.cat(dataclasses.replace(q, levels=torch.linspace(0, 3, 4)))  # the same codes under even levels


def test_a_rotated_lloyd_profile_decodes_the_same_on_both_torch_paths_and_counts_its_tables():
    assert "rotated-lloyd" in quantizer_names()
    assert get_quantizer("rotated-lloyd").kernel_layout == "uniform_groups", "KIVI's layout, plus the table"
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 40])
    profile = profile_for(model, groups=((0, 1),)).with_quantization(
        Quantization(bits=(3, 3, 2, 4), value_bits=(2, 2, 2, 3), group_size=8, residual_length=8,
                     scheme="rotated-lloyd"))
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    assert restore.layers[2].qkeys.levels is not None and restore.layers[3].qkeys.levels is None
    keys_view, values_view = restore.layers[2].views_of()[:2]
    for view, role in ((keys_view, "keys"), (values_view, "values")):
        assert packing_unsupported(view, role) is None, "the Triton kernel reads a layer's table (test_kernels.py)"
    # ... and a merged group's rotated packing (uneven 2-bit retained lists too: test_kernels.py)
    merged_keys, merged_values = restore.views(0)[:2]
    assert merged_keys.qdirection.rotation is not None and merged_keys.retained_q is not None
    for view, role in ((merged_keys, "keys"), (merged_values, "values")):
        assert packing_unsupported(view, role) is None
    report = restore.memory_report()
    # one table of 4 float32 levels (2-bit codes), however many tensors use it
    assert report["parts"]["levels"] == 4 * 4
    assert report["kv_bytes"] == sum_of_storages(restore)
