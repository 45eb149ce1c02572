"""Torch decode attention a block at a time (``enable_fused_attention(model, backend="torch")``).

Against the float32 reference that restores the whole store: fp32 within 1e-5 (the order of the
sums differs), bf16 within 1e-2 (the output's own rounding); generate through it = the torch path.
"""


import pytest
import torch

from minicache import MiniCache
from minicache.quant.packed import QuantizedTensor, quantize
from minicache.runtime import blockwise
from minicache.runtime.attention import disable_fused_attention, enable_fused_attention
from minicache.runtime.blockwise import blockwise_decode_attention
from minicache.runtime.kernels.reference import fused_decode_reference
from minicache.runtime.kernels.synthetic import quantize_views, random_merged_views, with_rotation
from minicache.runtime.views import MergedKVView
from tests.alignment_helpers import random_rotations
from tests.test_cache import greedy, left_padded_batch, make_model
from tests.test_quant import quantized_profile

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(dtype, packed: bool, merged=166, retained=None, aligned=False):
    if retained is None:  # ragged: a row without retained tokens, rows with few and many
        retained = torch.tensor([[0.0, 0.3], [0.1, 0.6]])
    keys, values = random_merged_views(2, 2, merged, 9, 64, dtype=dtype, retained=retained, member=1)
    if packed:
        keys, values = quantize_views(keys, values, 4, key_group=32, value_group=32, key_tail=6)
    if aligned:
        rot = random_rotations(2, 2, 64, seed=5, identity_last=False)
        keys, values = with_rotation(keys, rot[0]), with_rotation(values, rot[1])
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 8, 1, 64, generator=g).to(dtype)
    mask = torch.ones(2, 1, 1, merged + 9, dtype=torch.bool)
    mask[1, ..., : min(17, (merged + 9) // 2)] = False  # left padding
    return query, keys, values, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("aligned", [False, True], ids=["plain", "aligned"])
@pytest.mark.parametrize("block_tokens", [1, 40, 512])
def test_blockwise_matches_the_reference(dtype, packed, aligned, block_tokens):
    query, keys, values, mask = _case(dtype, packed, aligned=aligned)
    got = blockwise_decode_attention(query, keys, values, mask, block_tokens=block_tokens)
    want = fused_decode_reference(query.float(), keys, values, mask)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("case", ["nothing_merged", "everything_retained", "no_mask", "float_mask"])
def test_blockwise_edge_cases(case):
    kwargs = {"merged": 0} if case == "nothing_merged" else {}
    if case == "everything_retained":
        kwargs["retained"] = 1.0
    query, keys, values, mask = _case(torch.float32, True, **kwargs)
    if case == "no_mask":
        mask = None
    elif case == "float_mask":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        mask[0, ..., 40] = -2.5
    got = blockwise_decode_attention(query, keys, values, mask, scaling=0.3, block_tokens=64)
    want = fused_decode_reference(query.float(), keys, values, mask, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_blockwise_dequantizes_a_block_at_a_time(monkeypatch):
    query, keys, values, mask = _case(torch.float32, True, merged=550, retained=0.2)
    largest = []
    original = QuantizedTensor.dequantize

    def recording(self, dtype, **kwargs):
        out = original(self, dtype, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(QuantizedTensor, "dequantize", recording)
    blockwise_decode_attention(query, keys, values, mask, block_tokens=64)
    b, h, _, d = keys.residual.shape
    # Never more than one block of 64 tokens (plus its retained rows, at most one per token and member).
    assert largest and max(largest) <= b * h * 64 * d * 2
    largest.clear()
    keys.materialize()  # the torch path: the whole layer at once
    assert max(largest) >= b * h * 544 * d


def test_blockwise_block_boundaries_follow_packed_key_groups():
    _, keys, _, _ = _case(torch.float32, True)
    assert keys.block_alignment == 32
    with pytest.raises(ValueError, match="splits a group of 32 tokens"):
        keys.restored_block(16, 48)
    packed = quantize(torch.randn(1, 1, 64, 16), 4, 32, "tokens")
    whole = packed.dequantize(torch.float32)
    torch.testing.assert_close(packed.slice_tokens(32, 64).dequantize(torch.float32), whole[..., 32:, :])


def test_unmerged_quantized_layer_view():
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(2, 2, 136, 64, generator=g) for _ in range(2))
    keys = MergedKVView.of_quantized_layer(k[..., 128:, :], quantize(k[..., :128, :], 4, 32, "tokens"))
    values = MergedKVView.of_quantized_layer(v[..., 128:, :], quantize(v[..., :128, :], 4, 32, "channels"))
    query = torch.randn(2, 8, 1, 64, generator=g)
    got = blockwise_decode_attention(query, keys, values, block_tokens=50)  # rounded up to 64
    torch.testing.assert_close(got, fused_decode_reference(query, keys, values), rtol=1e-5, atol=1e-5)


def test_rotated_quantized_layer_is_attended_in_its_frame():
    from minicache.quant import get_quantizer

    rotated = get_quantizer("rotated")
    g = torch.Generator().manual_seed(8)
    k, v = (torch.randn(2, 2, 140, 64, generator=g) for _ in range(2))
    keys = MergedKVView.of_quantized_layer(k[..., 128:, :], rotated.quantize(k[..., :128, :], "keys", 3, 32))
    values = MergedKVView.of_quantized_layer(v[..., 128:, :], rotated.quantize(v[..., :128, :], "values", 3, 32))
    assert keys.frame is not None and values.frame is not None
    # In its frame the block is the packed codes' space: x R, never rotated back token by token.
    r = keys.stored["vectors"].packed.rotation
    torch.testing.assert_close(keys.restored_block(0, 64, in_frame=True), keys.restored_block(0, 64) @ r,
                               rtol=1e-4, atol=1e-4)
    query = torch.randn(2, 8, 1, 64, generator=g)
    got = blockwise_decode_attention(query, keys, values, block_tokens=64)
    torch.testing.assert_close(got, fused_decode_reference(query, keys, values), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[30, 30], [30, 22]])
def test_generate_through_the_torch_backend_matches_the_torch_path(monkeypatch, lengths):
    """Decode steps attend views block by block, also in a padded batch (stored per sequence, attended
    one sequence at a time)."""
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, lengths)
    padded = lengths[0] != lengths[1]

    def run(cache):
        return greedy(model, ids, mask, cache, new_tokens=10, output_scores=True, return_dict_in_generate=True)

    profile = quantized_profile(model, groups=((0, 1),))
    want = run(MiniCache(profile, model))
    calls = []
    original = blockwise.blockwise_decode_attention
    monkeypatch.setattr(blockwise, "blockwise_decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert enable_fused_attention(model, backend="torch")
    assert model.config._attn_implementation == "minicache_torch"
    cache = MiniCache(profile, model)
    got = run(cache)
    disable_fused_attention(model)
    assert model.config._attn_implementation == "sdpa"
    stored = cache.rows.rows[1] if padded else cache
    assert stored.layers[2].qkeys is not None, "unmerged layers packed too"
    # 9 decode steps x 4 layers (merged and packed), once per sequence when stored per sequence
    assert len(calls) == 9 * 4 * (len(lengths) if padded else 1), "decode steps attended block by block"
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_enable_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_fused_attention(make_model("llama"), backend="cuda")


def test_torch_attention_function_serves_views_and_falls_back(caplog, monkeypatch):
    import logging

    from minicache.runtime import attention

    monkeypatch.setattr(attention, "_WARNED", set())
    query, keys, values, mask = _case(torch.float32, True)
    module = torch.nn.Module()
    module.num_key_value_groups = 4
    out, _ = attention.minicache_torch_attention_forward(module, query, keys, values, mask)
    torch.testing.assert_close(out, fused_decode_reference(query, keys, values, mask), rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.WARNING):
        out, weights = attention.minicache_torch_attention_forward(
            module, query, keys, values, None, output_attentions=True
        )
    assert "blockwise decode attention not used" in caplog.text and weights is None
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys.materialize(), values.materialize(), enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
