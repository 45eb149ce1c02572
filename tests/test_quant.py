"""Quantized storage (issue 6): packing, round-trip error, block-at-a-time quantization, accounting, CLIs."""

import json

import pytest
import torch
from transformers import DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.profile import MergeGroup, MergeSettings, ProfileError, Quantization
from minicache.quant import get_quantizer
from minicache.quant.packed import code_values, pack, quantize, unpack
from minicache.runtime.layers import QuantizedLayer
from minicache.runtime.store import GroupStore, PaddingInfo
from tests.test_cache import greedy, left_padded_batch, make_model, profile_for, sequence, sum_of_storages


# ---- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])  # unpack shifts bytes for these widths, words for 3
def test_pack_round_trip_and_bit_layout(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (3, 5, 16), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    # The first code of a byte sits in its lowest bits.
    per = 8 // bits
    want = sum(int(codes[0, 0, j]) << (j * bits) for j in range(per))
    assert int(packed[0, 0, 0]) == want
    with pytest.raises(ValueError, match="whole bytes"):
        pack(codes[..., :3], 2 if bits == 4 else 4)
    assert unpack(packed[:, :0], bits).shape == (3, 0, 16)  # no rows


@pytest.mark.parametrize(("bits", "per"), [(3, 8), (6, 4)])
def test_words_spanning_bytes_round_trip_with_the_stream_little_endian(bits, per):
    # 3- and 6-bit codes fill whole bytes only as words of `per` codes (3 bytes); code j of a row sits in bits
    # [j * bits, (j + 1) * bits) of the row's little-endian stream, whichever word it is in.
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 16), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    stream = sum(int(b) << (8 * i) for i, b in enumerate(packed[1, 2].tolist()))
    assert [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(16)] == codes[1, 2].tolist()
    with pytest.raises(ValueError, match=f"a multiple of {per}"):
        pack(codes[..., : per + 2], bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_code_values_look_bytes_up_as_unpacking_would(bits):
    # code_values reads 1- and 2-bit codes a byte at a time from a table, wider ones by unpacking; every
    # width must mean what unpack says.
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 16), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert code_values(packed, bits).dtype == torch.float32
    assert torch.equal(code_values(packed, bits), codes.float())
    levels = torch.cumsum(torch.rand(1 << bits, generator=g) + 0.1, 0)  # uneven, ascending
    assert torch.equal(code_values(packed, bits, levels), levels[codes.long()])
    assert code_values(packed[..., :0, :], bits, levels).shape == (2, 3, 0, 16)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_large_tensors_pack_in_slices_of_rows_with_the_same_bytes(bits, monkeypatch):
    import minicache.quant.packed as packed_module

    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 1 << bits, (3, 7, 32), generator=g, dtype=torch.uint8)
    whole = pack(codes, bits)
    monkeypatch.setattr(packed_module, "CONVERT_CHUNK", 64)  # two rows of 32 codes at a time: 11 slices
    sliced = pack(codes, bits)
    assert torch.equal(sliced, whole)
    assert torch.equal(unpack(sliced, bits), codes)


def test_three_bit_codes_form_a_little_endian_bit_stream():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (2, 4, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.shape == (2, 4, 24) and torch.equal(unpack(packed, 3), codes)
    # Code j sits in bits [3j, 3j + 3) of the row: codes 2 and 5 cross a byte boundary.
    stream = sum(int(b) << (8 * i) for i, b in enumerate(packed[1, 2].tolist()))
    assert [(stream >> (3 * j)) & 7 for j in range(64)] == codes[1, 2].tolist()
    # 4-bit data keep the byte layout they always had (the stream reads the same).
    four = torch.randint(0, 16, (3, 16), generator=g, dtype=torch.uint8)
    assert int(pack(four, 4)[0, 0]) == int(four[0, 0]) | int(four[0, 1]) << 4
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(codes[..., :12], 3)



@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_three_bit_words_read_the_same_on_either_path(byteorder, monkeypatch):
    # Little-endian hosts read a 3-byte word as an int32 after a pad byte; others shift bytes into words.
    # Both must give the stream's codes, whole and in slices of rows, as uint8 (unpack) and float (code_values).
    import minicache.quant.packed as packed_module

    monkeypatch.setattr(packed_module.sys, "byteorder", byteorder)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 8, (3, 7, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, 3)
    assert torch.equal(unpack(packed, 3), codes)
    assert torch.equal(code_values(packed, 3), codes.float())
    monkeypatch.setattr(packed_module, "CONVERT_CHUNK", 128)  # two rows of 64 codes at a time
    assert torch.equal(unpack(packed, 3), codes)
    assert torch.equal(code_values(packed, 3), codes.float())



def test_rotated_packings_rotate_back_in_the_half_dtype_asked_for_where_its_products_are_native(monkeypatch):
    # bf16 restores multiply in bf16 on CPUs with bf16 kernels (float32 accumulation; the rotation is exact in
    # bf16): within bf16 rounding of the float32 product, which every other CPU keeps.
    import minicache.quant.packed as packed_module
    from minicache.quant.rotated import rotation_matrix

    rotation = rotation_matrix(64)
    assert torch.equal(rotation.bfloat16().float(), rotation), "±1/8: exact in bf16"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    q = quantize(x, 3, 64, "channels", rotation=rotation)
    exact = q.dequantize(torch.float32)
    monkeypatch.setattr(packed_module, "_cpu_bf16", lambda: True)
    half = q.dequantize(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), exact, atol=0.02, rtol=0.01)  # bf16 keeps 8 bits of mantissa
    monkeypatch.setattr(packed_module, "_cpu_bf16", lambda: False)
    assert torch.equal(q.dequantize(torch.bfloat16), exact.bfloat16()), "float32 product, rounded once"
    assert torch.equal(q.dequantize(torch.float32), exact)


# ---- quantize / dequantize ------------------------------------------------------------------------
def _error_bound(q, x):
    """Per-element bound: half a step, plus the zero point's rounding, broadcast to ``x``."""
    scale, zero = q.scale.float(), q.zero.float()
    slack = zero.abs() * 2.0**-10 + 1e-6
    if q.axis == "tokens":
        *lead, n, d = x.shape
        bound = (scale / 2 + slack).unsqueeze(-2).expand(*lead, n // q.group_size, q.group_size, d)
    else:
        *lead, n, d = x.shape
        bound = (scale / 2 + slack).unsqueeze(-1).expand(*lead, n, d // q.group_size, q.group_size)
    return bound.reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["tokens", "channels"])
def test_round_trip_error_is_within_half_a_step(bits, axis):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 16) * 3 + torch.linspace(-5, 5, 16)  # channels with different offsets
    x[0, 0, 5, 2] = 40.0  # an outlier only inflates its own group's step
    q = quantize(x, bits, 8, axis)
    back = q.dequantize(torch.float32)
    err = (back - x).abs()
    assert (err <= _error_bound(q, x)).all()
    # A float reference of the same grid: codes of the min and max are 0 and 2^bits - 1.
    codes = unpack(q.data, bits)
    assert int(codes.max()) == (1 << bits) - 1 and int(codes.min()) == 0
    if axis == "tokens":
        assert q.scale.shape == (2, 3, 4, 16)
    else:
        assert q.scale.shape == (2, 3, 32, 2)
    # Half-precision models keep fp16 scales and zero points; the model dtype comes back.
    half = quantize(x.to(torch.bfloat16), bits, 8, axis)
    assert half.scale.dtype == torch.float16 and half.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_constant_groups_and_zeros_round_trip_exactly():
    x = torch.zeros(1, 1, 8, 4)
    x[..., 1] = 2.5
    for axis in ("tokens", "channels"):
        back = quantize(x, 4, 4, axis).dequantize(torch.float32)
        assert torch.isfinite(back).all()
    assert torch.equal(quantize(x, 4, 4, "tokens").dequantize(torch.float32), x)


def test_group_shape_errors():
    with pytest.raises(ValueError, match="multiple of 8 tokens"):
        quantize(torch.zeros(1, 1, 12, 16), 4, 8, "tokens")
    with pytest.raises(ValueError, match="divisible by 6"):
        quantize(torch.zeros(1, 1, 12, 16), 4, 6, "channels")
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(1, 1, 8, 16), 5, 8, "tokens")
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(torch.zeros(1, 1, 8, 12), 3, 4, "channels")


def test_rotated_scheme_is_orthogonal_seeded_and_undone_on_dequantize():
    from minicache.quant.rotated import rotation_matrix

    for d in (64, 96):  # Hadamard, and the QR fallback for a head size that is not a power of two
        r = rotation_matrix(d)
        torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-5, rtol=0)
        assert torch.equal(r, rotation_matrix(d)), "the rotation is part of the format: fixed"
    rotated = get_quantizer("rotated")
    torch.manual_seed(0)
    x = torch.randn(2, 2, 40, 64)
    x[..., 7] *= 30  # an outlier channel: without the rotation it takes every per-token group's range
    for role in ("keys", "values", "vectors"):
        axis = "tokens" if role == "keys" else "channels"  # KIVI's groups
        assert rotated.chunk_tokens(role, 8) == (8 if role == "keys" else 1)
        q = rotated.quantize(x, role, 3, 8)
        assert q.axis == axis and q.rotation is not None and q.data.shape[-1] == 24
        back = q.dequantize(torch.float32)
        plain = quantize(x, 3, 8, axis).dequantize(torch.float32)
        assert (back - x).norm() < (plain - x).norm()
        # Slicing, selecting and concatenating keep the rotation (views restore the same vectors).
        torch.testing.assert_close(q.slice_tokens(8, 24).dequantize(torch.float32), back[..., 8:24, :])
        torch.testing.assert_close(q.cat(q).dequantize(torch.float32)[..., 40:, :], back)
        torch.testing.assert_close(q.index_select(0, torch.tensor([1])).dequantize(torch.float32), back[1:])
    with pytest.raises(ValueError, match="quantized differently"):
        q.cat(quantize(x, 3, 8, "channels"))
    assert rotated.check(3, 128, 60)[0] == "bits" and rotated.check(3, 128, 64) is None


def test_kivi_packs_keys_per_channel_values_and_vectors_per_token():
    kivi = get_quantizer("kivi")
    x = torch.randn(2, 3, 16, 64)
    assert kivi.quantize(x, "keys", 4, 8).axis == "tokens" and kivi.chunk_tokens("keys", 8) == 8
    for role in ("values", "vectors"):
        q = kivi.quantize(x, role, 2, 128)
        assert q.axis == "channels" and q.group_size == 64, "value groups are capped at head_dim"
        assert kivi.chunk_tokens(role, 128) == 1
    assert kivi.check(4, 12, 16)[0] == "group_size" and kivi.check(4, 16, 16) is None


def test_quantizers_register_as_plugins():
    from minicache.quant import Quantizer, quantizer_names, register_quantizer
    from minicache.quant.packed import quantize as uniform

    @register_quantizer
    class PerTokenOnly(Quantizer):
        name = "test-per-token"
        bits = (4, 8)

        def quantize(self, x, role, bits, group_size, scale_bits=None):
            return uniform(x, bits, x.shape[-1], "channels")

        def chunk_tokens(self, role, group_size):
            return 1

    try:
        assert "test-per-token" in quantizer_names()
        spec = Quantization(bits=8, group_size=4, residual_length=2, scheme="test-per-token")
        assert "8-bit test-per-token KV" in spec.describe()
        layer = QuantizedLayer(spec)
        keys = torch.randn(1, 2, 9, 16)
        layer.update(keys, keys)
        assert layer.quantized_length == 4, "chunks follow the schedule's group size"
        with pytest.raises(ProfileError, match=r"^bits: 2 is not a supported width; allowed: one of \[4, 8\]"):
            Quantization(bits=2, scheme="test-per-token")
        with pytest.raises(ProfileError, match=r"^scheme: 'kiwi' is not a registered quantization scheme"):
            Quantization(scheme="kiwi")
    finally:
        from minicache.quant import unregister_quantizer

        unregister_quantizer("test-per-token")


# ---- the unmerged layer ------------------------------------------------------------------------
def _feed(layer, keys, values, chunks):
    start, outs = 0, []
    for size in chunks:
        outs.append(layer.update(keys[..., start : start + size, :], values[..., start : start + size, :]))
        start += size
    return outs


def test_layer_quantizes_a_block_at_a_time_and_never_requantizes():
    torch.manual_seed(0)
    spec = Quantization(bits=4, group_size=4, residual_length=6)
    keys, values = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    layer = QuantizedLayer(spec)
    k_out, _ = layer.update(keys[..., :13, :], values[..., :13, :])
    assert torch.equal(k_out, keys[..., :13, :]), "this step's attention sees exact keys"
    assert layer.quantized_length == 4 and layer.keys.shape[-2] == 9  # 13 - 6 = 7 -> one whole group of 4
    old = [t.clone() for t in (layer.qkeys.data, layer.qkeys.scale, layer.qvalues.data, layer.qvalues.zero)]
    for i in range(13, 40):
        k_out, _ = layer.update(keys[..., i : i + 1, :], values[..., i : i + 1, :])
        assert k_out.shape[-2] == i + 1 == layer.get_seq_length()
        assert 6 <= layer.keys.shape[-2] < 6 + 4, "the exact window stays within [residual, residual + group)"
    assert layer.quantized_length == 32
    new = (layer.qkeys.data, layer.qkeys.scale, layer.qvalues.data, layer.qvalues.zero)
    for before, after in zip(old, new, strict=True):
        assert torch.equal(after[..., : before.shape[-2], :], before), "old tokens keep their packed codes"
    # Chunking does not matter: one call quantizes the same groups to the same codes.
    once = QuantizedLayer(spec)
    once.update(keys, values)
    assert torch.equal(once.qkeys.data, layer.qkeys.data) and torch.equal(once.qvalues.scale, layer.qvalues.scale)
    # What attention sees: the dequantized prefix, then the exact window.
    k_all, v_all = layer.update(keys[..., :0, :], values[..., :0, :])
    kivi = get_quantizer("kivi")
    torch.testing.assert_close(
        k_all[..., :32, :], kivi.quantize(keys[..., :32, :], "keys", 4, 4).dequantize(torch.float32)
    )
    torch.testing.assert_close(
        v_all[..., :32, :], kivi.quantize(values[..., :32, :], "values", 4, 4).dequantize(torch.float32)
    )
    assert torch.equal(k_all[..., 32:, :], keys[..., 32:, :])


def test_layer_crop_and_batch_operations():
    torch.manual_seed(0)
    spec = Quantization(bits=2, group_size=4, residual_length=4)
    keys, values = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    layer = QuantizedLayer(spec)
    layer.update(keys, values)
    want = layer.update(keys[..., :0, :], values[..., :0, :])[0]
    index = torch.tensor([2, 0, 2])
    layer.reorder_cache(index)
    assert torch.equal(layer.update(keys[..., :0, :], values[..., :0, :])[0], want[index])
    layer.batch_select_indices(torch.tensor([True, False, True]))
    assert layer.qkeys.data.shape[0] == 2 and layer.keys.shape[0] == 2
    layer.batch_repeat_interleave(2)
    assert layer.qvalues.scale.shape[0] == 4
    seen = layer.get_seq_length()
    layer.crop(-2)
    assert layer.get_seq_length() == seen - 2
    with pytest.raises(ValueError, match="residual window"):
        layer.crop(-10)


# ---- inside MiniCache --------------------------------------------------------------------------
def quantized_profile(model, groups=((1, 2),), bits=4, group_size=4, residual_length=8, **defaults):
    return profile_for(model, groups=groups, **defaults).with_quantization(
        Quantization(bits=bits, group_size=group_size, residual_length=residual_length)
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_memory_report_counts_every_tensor_held(bits):
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [60, 45, 50])
    plain = MiniCache(profile_for(model, groups=((0, 1),)), model)
    greedy(model, ids, mask, plain, new_tokens=9)
    cache = MiniCache(quantized_profile(model, groups=((0, 1),), bits=bits), model)
    greedy(model, ids, mask, cache, new_tokens=9)
    report = cache.memory_report()
    assert report["kv_bytes"] == sum_of_storages(cache) == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert report["parts"]["packed"] > 0 and report["parts"]["scales"] > 0
    assert report["parts"]["plain_layers"] == 0, "unmerged layers are quantized too"
    assert cache.rows is not None and isinstance(sequence(cache).layers[3], QuantizedLayer)
    dynamic = DynamicCache(config=model.config)
    greedy(model, ids, mask, dynamic, new_tokens=9)
    full = sum(t.numel() * t.element_size() for layer in dynamic.layers for t in (layer.keys, layer.values))
    assert report["kv_bytes_full"] == full
    assert report["kv_bytes"] < plain.memory_report()["kv_bytes"]
    keys, _ = sequence(cache).views(0)
    assert keys.retained_value is None and keys.retained_q.data.shape[:2] == (keys.retained_index.shape[0], 2)


def test_merged_store_quantizes_directions_block_at_a_time():
    torch.manual_seed(0)
    settings = MergeSettings.create(t=0.6, gamma=0.2, sink_tokens=1)
    group = MergeGroup((0, 1), settings, settings)
    spec = Quantization(bits=4, group_size=8, residual_length=5)
    kwargs = {"residual_length": 5, "block_size": 4, "padding": PaddingInfo()}
    plain = GroupStore(group, **kwargs)
    quant = GroupStore(group, quant=spec, **kwargs)
    ka, kb, va, vb = (torch.randn(2, 3, 60, 16) for _ in range(4))
    for store in (plain, quant):
        store.update(0, ka[..., :23, :], va[..., :23, :])
        store.update(1, kb[..., :23, :], vb[..., :23, :])
    keys, values = quant.kernel_views(0)
    assert quant.merged_length == 16 and keys.qdirection.length == 16 and keys.direction is None
    old_keys, old_values = keys.qdirection.data.clone(), values.qdirection.data.clone()
    for i in range(23, 60):
        for store in (plain, quant):
            store.update(0, ka[..., i : i + 1, :], va[..., i : i + 1, :])
            store.update(1, kb[..., i : i + 1, :], vb[..., i : i + 1, :])
    assert quant.merged_length == plain.merged_length == 52
    keys, values = quant.kernel_views(0)
    # Keys wait for a whole group of 8 merged tokens (4 pending); values are packed per token at once.
    assert keys.qdirection.length == 48 and keys.direction.shape[-2] == 4
    assert values.qdirection.length == 52 and values.direction is None
    assert torch.equal(keys.qdirection.data[..., :16, :], old_keys)
    assert torch.equal(values.qdirection.data[..., :16, :], old_values)
    # Restored vectors stay close to the unquantized store's (4-bit unit directions, exact magnitudes).
    for c in range(2):
        for member in (0, 1):
            want = plain.kernel_views(member)[c].materialize()
            got = quant.kernel_views(member)[c].materialize()
            assert got.shape == want.shape
            assert torch.equal(got[..., 52:, :], want[..., 52:, :]), "the residual window stays exact"
            rel = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)
            assert rel.max() < 0.25 and rel.mean() < 0.1, (c, member, rel.max(), rel.mean())
    assert plain.kernel_views(0)[0].retained_index.shape == keys.retained_index.shape


def test_quantized_select_batch_equals_running_the_subset():
    torch.manual_seed(0)
    settings = MergeSettings.create(t=0.5, gamma=0.3)
    group = MergeGroup((0, 1), settings, settings)
    spec = Quantization(bits=2, group_size=2, residual_length=3)
    full = GroupStore(group, 3, 2, PaddingInfo(), quant=spec)
    sub = GroupStore(group, 3, 2, PaddingInfo(), quant=spec)
    ka, kb = torch.randn(3, 2, 15, 8), torch.randn(3, 2, 15, 8)
    index = torch.tensor([2, 0, 2])
    for store, a, b in ((full, ka, kb), (sub, ka[index], kb[index])):
        store.update(0, a, a)
        store.update(1, b, b)
    full.select_batch(index)
    for c in range(2):
        for member in (0, 1):
            assert torch.equal(full.kernel_views(member)[c].materialize(), sub.kernel_views(member)[c].materialize())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_minicache_generates_with_batches_and_beams(bits):
    model = make_model("qwen2")
    ids, mask = left_padded_batch(model.config.vocab_size, [30, 22])
    cache = MiniCache(quantized_profile(model, groups=((0, 1),), bits=bits), model)
    out = greedy(model, ids, mask, cache, new_tokens=10, num_beams=3)
    assert out.shape == (2, 40)
    assert len(cache.rows) == 6  # 2 sequences x 3 beams, each stored on its own
    assert sequence(cache, 5).views(0)[0].qdirection.data.shape[0] == 1
    assert sequence(cache, 5).layers[2].qkeys.data.shape[0] == 1
    report = cache.memory_report()
    assert report["kv_bytes"] == sum_of_storages(cache)
    # Prefill attends exact KV: the first generated token is the full cache's.
    first = greedy(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    quant_first = greedy(model, ids, mask, MiniCache(quantized_profile(model, bits=bits), model), new_tokens=1)
    assert torch.equal(first, quant_first)


def decode_on_both_torch_paths(model, ids, mask, profile, new_tokens=8) -> MiniCache:
    """Greedy tokens of ``profile`` on the restore path and on the blockwise path are equal; returns the
    restore path's cache (for the caller's checks of what it holds)."""
    from minicache.runtime.attention import disable_fused_attention, enable_fused_attention

    restore = MiniCache(profile, model)
    want = greedy(model, ids, mask, restore, new_tokens=new_tokens)
    enable_fused_attention(model, backend="torch")
    try:
        got = greedy(model, ids, mask, MiniCache(profile, model), new_tokens=new_tokens)
    finally:
        disable_fused_attention(model)
    assert torch.equal(got, want)
    return restore


def test_rotated_storage_decodes_the_same_on_every_torch_path():
    """A rotated profile (merged group + unmerged layers): the restore path and the blockwise path
    (which attends unmerged rotated layers in their frame) generate the same tokens, and the memory
    report counts what is held (the rotation is regenerated, not stored)."""
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 40])
    profile = profile_for(model, groups=((0, 1),)).with_quantization(
        Quantization(bits=(3, 3, 4, 2), value_bits=(2, 2, 3, 3), group_size=8, residual_length=8, scheme="rotated"))
    restore = decode_on_both_torch_paths(model, ids, mask, profile)
    assert restore.layers[2].qkeys.rotation is not None and restore.layers[2].views_of()[0].frame is not None
    assert restore.memory_report()["kv_bytes"] == sum_of_storages(restore)


def test_quantization_alone_is_close_to_the_full_cache():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [64, 64])
    full = model(input_ids=ids, attention_mask=mask).logits[:, -16:]
    cache = MiniCache(MergeProfile().with_quantization(Quantization(4, 8, 8)), model)
    model(input_ids=ids[:, :48], attention_mask=mask[:, :48], cache=cache)
    logits = model(input_ids=ids[:, 48:], attention_mask=mask, cache=cache).logits
    assert cache.layers[0].quantized_length == 56  # 40 after the prefix, then two more groups
    torch.testing.assert_close(logits, full, atol=0.05, rtol=0.05)
    assert not torch.equal(logits, full), "old tokens really are quantized"


# ---- profile fields --------------------------------------------------------------------------------
def _profile_dict(**quantization):
    return {
        "format_version": 1,
        "groups": [{"layers": [1, 2]}],
        "quantization": quantization,
    }


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("bits", 5, "quantization.bits"),
        ("bits", [4, 5], "quantization.bits[1]"),
        ("scheme", "kiwi", "quantization.scheme"),
        ("bits", True, "quantization.bits"),
        ("group_size", 1, "quantization.group_size"),
        ("group_size", "64", "quantization.group_size"),
        ("residual_length", -1, "quantization.residual_length"),
        ("group", 64, "quantization.group"),
    ],
)
def test_profile_quantization_errors_name_the_field(field, value, path):
    with pytest.raises(ProfileError) as info:
        MergeProfile.from_dict(_profile_dict(**{field: value}))
    assert info.value.path == path, str(info.value)


def test_profile_quantization_round_trips_and_checks_head_dim(tmp_path):
    model = make_model("llama")  # head_dim 16
    profile = MergeProfile.preset("paper", model.config).with_quantization(Quantization(2, 64, 32))
    assert "2-bit KV (group 64, residual 32)" in profile.describe()
    path = profile.save(tmp_path / "p.yaml")
    assert "quantization: {scheme: kivi, bits: 2, group_size: 64, residual_length: 32}" in path.read_text()
    loaded = MergeProfile.load(path)
    assert loaded.quantization == Quantization(2, 64, 32) and loaded == profile
    assert MergeProfile.from_dict({"format_version": 1, "quantization": {}}).quantization == Quantization()
    v1 = {"format_version": 1, "quantization": {"bits": 2, "group_size": 64, "residual_length": 32}}
    assert MergeProfile.from_dict(v1).quantization == Quantization(2, 64, 32, scheme="kivi")
    bad = MergeProfile.preset("paper", model.config)
    with pytest.raises(ProfileError) as info:
        bad.with_quantization(Quantization(4, 12, 8))  # 16 channels do not split into groups of 12
    assert info.value.path == "quantization.group_size"
    unfingerprinted = MergeProfile(quantization=Quantization(4, 12, 8))
    with pytest.raises(ProfileError, match=r"quantization\.group_size"):
        MiniCache(unfingerprinted, model)


# ---- CLIs -------------------------------------------------------------------------------------------
def test_eval_cli_kv_bits_arguments(tmp_path, capsys):
    from minicache.evaluate.cli import build_parser, main

    assert build_parser().parse_args(["--preset", "none", "--kv-bits", "2", "--data", "x"]).kv_bits == 2
    data = tmp_path / "d.txt"
    data.write_text("hello")
    # Widths are the scheme's (checked before any model loads): KIVI packs 2, 3 or 4 bits.
    assert main(["--preset", "paper", "--kv-bits", "5", "--model", "/nonexistent", "--data", str(data)]) == 2
    assert "error: --kv-bits: 5 is not a supported width; allowed: one of [2, 3, 4]" in capsys.readouterr().err
    assert main(["--preset", "paper", "--kv-bits", "4", "--kv-scheme", "kiwi", "--data", str(data)]) == 2
    assert "--kv-scheme: 'kiwi' is not a registered quantization scheme" in capsys.readouterr().err
    assert main(["--baseline", "full", "--kv-bits", "4", "--data", str(data)]) == 2
    assert "--kv-bits does not apply" in capsys.readouterr().err


def test_calibrate_cli_takes_kv_bits(capsys):
    from minicache.calibrate.cli import build_parser, main

    args = build_parser().parse_args(["--kv-bits", "4", "--kv-group-size", "64"])
    assert (args.kv_bits, args.kv_group_size) == (4, 64)
    # The calibrator writes the storage that measured best by default (rotated, 4 exact sinks); the paper's
    # KIVI is one option away, and minicache-eval keeps KIVI as its default baseline.
    from minicache.cli_options import quantization_from_args
    from minicache.evaluate.cli import build_parser as eval_parser

    chosen = quantization_from_args(args, residual_length=128)
    assert (chosen.scheme, chosen.sink_tokens, chosen.group_size) == ("rotated", 4, 64)
    paper = quantization_from_args(build_parser().parse_args(["--kv-bits", "4", "--kv-scheme", "kivi",
                                                              "--kv-sink-tokens", "0"]))
    assert (paper.scheme, paper.sink_tokens) == ("kivi", 0)
    baseline = quantization_from_args(eval_parser().parse_args(["--preset", "none", "--kv-bits", "4", "--data", "x"]))
    assert (baseline.scheme, baseline.sink_tokens) == ("kivi", 0)
    assert main(["--kv-bits", "8", "--model", "/nonexistent"]) == 2
    assert "--kv-bits: 8 is not a supported width" in capsys.readouterr().err
    assert main(["--methods", "slerp,lowrnak", "--model", "/nonexistent"]) == 2
    assert "--methods lowrnak is not a registered merge method" in capsys.readouterr().err


def test_eval_cli_quantized_run_on_the_real_model(tmp_path, capsys, license_text, smollm2):
    from minicache.evaluate.cli import main

    data = tmp_path / "eval.txt"
    data.write_text(license_text[:20000])
    args = ["--data", str(data), "--prefix-length", "256", "--continuation-length", "16", "--num-windows", "1",
            "--json"]
    assert main(["--preset", "none", "--kv-bits", "4", "--kv-group-size", "64", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["kv_bits"], out["kv_group_size"], out["profile"]) == (4, 64, "preset:none")
    # 256 tokens, 128 exact: 128 quantized at 4 bits + one fp32 scale and zero per group of 64.
    assert 1.5 < out["compression_ratio"] < 2.0
    assert out["ppl_increase"] < 0.05
    assert main(["--baseline", "quantized-cache-fp8", *args]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["compression_ratio"] == pytest.approx(4.0, rel=0.01)  # fp32 model: 4 bytes -> 1


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_quantized_cache_baselines_count_their_packed_tensors(backend):
    pytest.importorskip({"hqq": "hqq", "quanto": "optimum.quanto"}[backend])
    from minicache.evaluate.quality import quantized_cache_factory
    from minicache.runtime.memory import cache_bytes

    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [64, 64])
    cache = quantized_cache_factory(backend, bits=4, group_size=16, residual_length=8)(MergeProfile(), model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, cache=cache).logits
        for _ in range(12):  # decode steps: the residual fills and is quantized
            step = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            logits = model(input_ids=step, attention_mask=mask, cache=cache).logits
    held, full = cache_bytes(cache, model.config, batch=2, dtype=torch.float32)
    assert full == 2 * sum(  # what a DynamicCache holds for 76 tokens
        2 * 76 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
        for _ in range(model.config.num_hidden_layers)
    )
    # 4-bit codes plus scales and zero points of an fp32 model: well under a quarter, never nothing.
    assert full / 8 < held < full / 2


def test_bits_per_layer():
    model = make_model("llama")  # 4 layers
    ids, mask = left_padded_batch(model.config.vocab_size, [60, 60])  # no padding: one batched store
    per_layer = quantized_profile(model, groups=((0, 1),), bits=(2, 2, 4, 2))
    assert per_layer.quantization.bits == (2, 2, 4, 2) and "2/4-bit KV" in per_layer.describe()
    cache = MiniCache(per_layer, model)
    greedy(model, ids, mask, cache, new_tokens=4)
    assert cache.views(0)[0].bits == 2, "a group packs at its layers' width"
    assert (cache.layers[2].qkeys.bits, cache.layers[3].qkeys.bits) == (4, 2)
    uniform = MiniCache(quantized_profile(model, groups=((0, 1),), bits=2), model)
    greedy(model, ids, mask, uniform, new_tokens=4)
    more = cache.memory_report()["parts"]["packed"] - uniform.memory_report()["parts"]["packed"]
    assert more == cache.layers[2].qkeys.code_bytes // 2 + cache.layers[2].qvalues.code_bytes // 2
    # A group's layers share one store, hence one width; the widths must cover the model.
    with pytest.raises(ProfileError, match=r"groups\[0\]\.layers: \[0, 1\] are quantized to \[2, 4\] bits"):
        quantized_profile(model, groups=((0, 1),), bits=(2, 4, 4, 4))
    with pytest.raises(ProfileError, match=r"quantization\.bits: 3 widths for 4 layers"):
        MiniCache(profile_for(model).with_quantization(Quantization(bits=(2, 2, 2))), model)
    text = per_layer.to_yaml()
    assert "bits: [2, 2, 4, 2]" in text and MergeProfile.from_yaml(text) == per_layer
    assert "value_bits" not in text, "values at the keys' widths: nothing more is written"


def test_keys_and_values_take_their_own_widths():
    model = make_model("llama")  # 4 layers
    ids, mask = left_padded_batch(model.config.vocab_size, [60, 60])
    quant = Quantization(bits=(4, 4, 3, 2), value_bits=(2, 2, 4, 3), group_size=16, residual_length=8)
    profile = profile_for(model, groups=((0, 1),)).with_quantization(quant)
    assert quant.bits_of(2) == 3 and quant.bits_of(2, "values") == 4 and quant.mean_bits(4) == 3.0
    assert "mean 3.00 bits" in profile.describe()
    cache = MiniCache(profile, model)
    greedy(model, ids, mask, cache, new_tokens=4)
    keys, values = cache.views(0)
    assert (keys.bits, values.bits) == (4, 2), "a group packs keys and values at their own widths"
    assert (cache.layers[2].qkeys.bits, cache.layers[2].qvalues.bits) == (3, 4)
    assert (cache.layers[3].qkeys.bits, cache.layers[3].qvalues.bits) == (2, 3)
    text = profile.to_yaml()
    assert "value_bits: [2, 2, 4, 3]" in text and MergeProfile.from_yaml(text) == profile
    # Same widths for values as for keys: stored as one list.
    assert Quantization(bits=(4, 2), value_bits=[4, 2]).value_bits is None
    with pytest.raises(ProfileError, match=r"value_bits\[1\]: 5 is not a supported width"):
        Quantization(bits=4, value_bits=(4, 5))
    with pytest.raises(ProfileError, match=r"\[0, 1\] are quantized to \[2, 4\] bits \(value_bits\)"):
        profile_for(model, groups=((0, 1),)).with_quantization(Quantization(bits=4, value_bits=(2, 4, 4, 4)))


def test_rotated_mse_values_choose_their_range_by_squared_error():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 16).to(torch.bfloat16)
    x[..., 5, 3] = 40  # a tail value min-max ranges would spend the outer levels on
    plain, mse = get_quantizer("rotated"), get_quantizer("rotated-mse")
    for bits in (2, 3):
        a, b = plain.quantize(x, "values", bits, 16), mse.quantize(x, "values", bits, 16)
        assert b.nbytes == a.nbytes and b.axis == a.axis == "channels"
        err_a = (a.dequantize(torch.float32, unrotate=False) - x.float() @ a.rotation).square().sum(-1)
        err_b = (b.dequantize(torch.float32, unrotate=False) - x.float() @ b.rotation).square().sum(-1)
        assert (err_b <= err_a + 1e-4).all(), "min-max is one of the ranges tried"
        assert err_b.sum() < 0.9 * err_a.sum()
        assert torch.equal(mse.quantize(x, "keys", bits, 16).data, plain.quantize(x, "keys", bits, 16).data)
    assert "rotated-mse" in Quantization(scheme="rotated-mse", bits=3).describe()


def test_an_empty_list_of_vectors_packs_and_a_merge_that_retains_nothing_stores():
    # A quantized merged group without sinks whose first merge retains no token packs an empty list
    # of retained vectors; reshaping 0 rows with -1 used to fail there.
    empty = torch.zeros(0, 2, 8)
    q = quantize(empty, 4, 8, "channels")
    assert q.data.shape == (0, 2, 4) and q.dequantize(torch.float32).shape == (0, 2, 8)
    settings = MergeSettings.create(t=0.6, gamma=0.0, sink_tokens=0)
    store = GroupStore(MergeGroup((0, 1), settings, settings), residual_length=4, block_size=4, padding=PaddingInfo(),
                       quant=Quantization(bits=4, group_size=4, residual_length=4))
    for member in range(2):
        store.update(member, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8))
    assert store.merged_length == 8 and store.retained_count() == {"keys": 0, "values": 0}
