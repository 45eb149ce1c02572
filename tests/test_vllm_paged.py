"""The vLLM plugin's paged stores (integrations/vllm, no vLLM needed) against the transformers runtime.

A merged group's pages, written and read through a block table the way the plugin's attention does
inside vLLM, must give every member the keys and values minicache's own GroupStore gives it, step
by step: prefill, then decode steps that merge block after block; in a quantized profile, packed as
the runtime packs them, and an unmerged layer's pages as its QuantizedLayer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm"))

from minicache_vllm.attention import DecodeRow, attention_dtype, decode_attention, restored_attention
from minicache_vllm.layout import PageLayout, quantized_layer_layout
from minicache_vllm.paged import DECODE_PATHS, PagedGroup, decode_path, reads_blockwise, reads_fused
from minicache_vllm.quantized import PagedQuantizedLayer
from minicache_vllm.windows import WindowPool, merged_length

from minicache.profile import MergeGroup, MergeSettings, Quantization
from minicache.quant import QuantizedTensor, quantize
from minicache.runtime.blockwise import blockwise_decode_attention
from minicache.runtime.layers import QuantizedLayer, stored_window
from minicache.runtime.rope import RopeAngles
from minicache.runtime.store import GroupStore, PaddingInfo

H, D, R, BS, PAGE = 2, 8, 16, 8, 16  # heads, head dim, residual window, merge block, vLLM block


def group_of(k: int, gamma: float = 0.3, quant: Quantization | None = None) -> tuple[MergeGroup, GroupStore]:
    settings = MergeSettings.create(t=0.6, gamma=gamma, sink_tokens=1)
    group = MergeGroup(tuple(range(k)), settings, settings)
    return group, GroupStore(group, residual_length=R, block_size=BS, padding=PaddingInfo(), quant=quant)


def paged(template: GroupStore, dtype: torch.dtype, room: int, num_blocks: int = 64,
          page: int = PAGE, device: str = "cpu") -> tuple[PagedGroup, torch.Tensor]:
    k = len(template.layers)
    layout = PageLayout.build(template.components, H, D, BS, dtype, room)
    pages = torch.zeros(num_blocks, layout.units_per_page(page) * layout.unit_bytes, dtype=torch.uint8, device=device)
    pool = WindowPool(4, k, H, D, R + layout.unit_tokens, dtype, device=device)
    return PagedGroup(template, layout, pool, page, lambda: pages), pages


#: Prefill, decode, a chunk, more decode.
STEPS = [45] + [1] * 40 + [7, 30] + [1] * 20


def step_both(reference: GroupStore, group: PagedGroup, heads: int, dim: int, dtype: torch.dtype,
              steps: list[int] = STEPS) -> None:
    """Feed the same steps (one request) to ``reference`` and its paged copy ``group``: every member's
    keys and values must be equal, bit for bit, and the merged lengths too. Every other decode step
    reads the pages as views instead, the way the plugin's blockwise decode does: attention over them
    must match attention over the runtime's keys and values."""
    k = len(reference.layers)
    table, before = torch.randperm(64), 0  # the request's blocks, anywhere in the pool
    for i, n in enumerate(steps):
        xs = torch.randn(2, k, 1, heads, n, dim).to(dtype)  # [keys/values, member, batch, H, n, D]
        group.begin_step()
        for m in range(k):
            want_k, want_v = reference.update(m, xs[0, m], xs[1, m])
            if n == 1 and i % 2:
                check_blockwise(group.member_views(m, 0, table, before, xs[:, m, 0]), want_k, want_v)
                continue
            got_k, got_v = group.member_kv(m, 0, table, before, xs[:, m, 0])
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
        group.end_step([(0, table, before, before + n)])
        before += n
        assert merged_length(before, reference.residual_length, reference.block_size) == reference.merged_length


def check_blockwise(views, keys: torch.Tensor, values: torch.Tensor, query_heads: int = 2) -> None:
    """Decode attention read from ``views`` a block at a time (the plugin's blockwise path) against SDPA
    over the runtime's restored ``keys``/``values`` ``[1, H, T, D]`` (float32 math both; a quantized
    or low-rank store is not restored whole by the first, so not bit for bit)."""
    h, d = keys.shape[1], keys.shape[-1]
    query = torch.randn(1, h * query_heads, 1, d)
    got = blockwise_decode_attention(query.to(keys.dtype), *views, None, d**-0.5, block_tokens=16)
    want = F.scaled_dot_product_attention(query.to(keys.dtype).float(), keys.float(), values.float(),
                                          enable_gqa=True)
    assert views[0].shape == keys.shape
    tol = 1e-5 if keys.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:, 0].float(), want[:, :, 0], rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_group_gives_each_member_what_the_runtime_store_gives(k, dtype):
    torch.manual_seed(k)
    _, reference = group_of(k)
    group, _ = paged(reference, dtype, room=BS * H * 2)  # room for every entry: nothing left out
    step_both(reference, group, H, D, dtype)
    assert reference.merged_length > 100 and sum(reference.retained_count().values()) > 0
    assert group.dropped == 0


def test_two_requests_keep_their_own_windows_and_blocks():
    torch.manual_seed(0)
    _, ref_a = group_of(2)
    _, ref_b = group_of(2)
    group, _ = paged(ref_a, torch.float32, room=BS * H * 2)
    tables = torch.randperm(64).view(2, 32)
    before = [0, 0]
    for n_a, n_b in [(30, 0), (1, 50), (1, 1), (1, 1)] + [(1, 1)] * 30:
        group.begin_step()
        rows = []
        inputs = {}
        for row, (n, ref) in enumerate(((n_a, ref_a), (n_b, ref_b))):
            if n:
                inputs[row] = (torch.randn(2, 2, 1, H, n, D), ref)
        for m in range(2):
            for row, (xs, ref) in inputs.items():
                want_k, _ = ref.update(m, xs[0, m], xs[1, m])
                got_k, _ = group.member_kv(m, row, tables[row], before[row], xs[:, m, 0])
                torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
        for row, (xs, _) in inputs.items():
            rows.append((row, tables[row], before[row], before[row] + xs.shape[-2]))
            before[row] += xs.shape[-2]
        group.end_step(rows)
    assert ref_a.merged_length > 0 and ref_b.merged_length > 0


def test_a_full_merge_block_leaves_the_excess_merged_not_flagged():
    torch.manual_seed(1)
    _, reference = group_of(2, gamma=1.0)  # gamma 1: every token of the range is retained
    group, _ = paged(reference, torch.float32, room=3)
    table = torch.arange(64)
    xs = torch.randn(2, 2, 1, H, 60, D)
    group.begin_step()
    for m in range(2):
        reference.update(m, xs[0, m], xs[1, m])
        group.member_kv(m, 0, table, 0, xs[:, m, 0])
    group.end_step([(0, table, 0, 60)])
    assert group.dropped > 0
    group.begin_step()
    step = torch.randn(2, H, 1, D)
    keys, _ = group.member_kv(0, 0, table, 60, step)
    merged = merged_length(60, R, BS)
    # Tokens left out of the retained room restore from the merged form: finite, the true norms,
    # not the retention flag (-1) read as a magnitude.
    norms = keys[0, :, :merged].norm(dim=-1)
    torch.testing.assert_close(norms, xs[0, 0, 0, :, :merged].norm(dim=-1), rtol=1e-3, atol=1e-3)
    exact = (keys[0, :, :merged] - xs[0, 0, 0, :, :merged]).abs().amax(dim=-1) == 0
    assert 0 < int(exact.sum()) <= 3 * 4, "a few tokens exact (3 per merge block), the rest merged"


def test_layout_sizes_and_refusals():
    _, template = group_of(3)
    layout = PageLayout.build(template.components, 3, 64, 64, torch.bfloat16, 32)
    # SLERP per token and head: a direction (64 bf16) and 3 magnitudes (fp16), for keys and values.
    fields = 2 * 3 * 64 * (64 * 2 + 3 * 2)
    assert layout.unit_tokens == 64
    assert layout.unit_bytes >= fields + 32 * 3 * 64 * 2
    assert layout.unit_bytes - (fields + 32 * 3 * 64 * 2) < 4 + 32 * 6 + 3 * 8
    assert layout.content_bytes(64) * 3 * 64 >= layout.unit_bytes
    assert layout.content_bytes(128) * 3 * 128 >= 2 * layout.unit_bytes
    with pytest.raises(ValueError, match="multiple of the profile's page unit"):
        layout.content_bytes(96)


def test_a_quantized_layout_packs_whole_chunks_and_counts_them():
    # 4-bit KIVI, keys per channel in groups of 128 tokens: a unit is 128 tokens (two merge blocks).
    _, template = group_of(3, quant=Quantization(bits=4, group_size=128, residual_length=128))
    layout = PageLayout.build(template.components, 3, 64, 64, torch.bfloat16, 32)
    assert layout.unit_tokens == 128
    direction = 128 * 64 // 2 + 2 * 2 * 64  # codes, and an fp16 scale and zero per channel of the group
    direction_values = 128 * (64 // 2 + 2 * 2)  # values per token: codes, a scale and zero per 64 channels
    magnitudes = 128 * 3 * 2  # fp16, not packed
    fields = 3 * (direction + direction_values + 2 * magnitudes)
    entry = 3 * (64 // 2 + 2 * 2)  # a retained entry: every member's vector, packed per row
    assert layout.entry_bytes == entry
    assert 0 <= layout.unit_bytes - (fields + 32 * entry + 4 + 32 * 6) < 6 * 8
    with pytest.raises(ValueError, match="block_size=128"):
        layout.units_per_page(64)


def test_window_pool_slots():
    pool = WindowPool(2, 2, H, D, 8, torch.float32)
    pool.next_step()
    a = pool.slot(key=5, start=0)
    b = pool.slot(key=9, start=0)
    assert a != b
    pool.write(a, torch.ones(2, 2, H, 3, D))
    pool.next_step()
    assert pool.slot(key=5, start=3) == a and pool.read(a).shape[-2] == 3
    with pytest.raises(RuntimeError, match="no exact window"):
        pool.slot(key=7, start=10)
    assert pool.slot(key=5, start=0) == a and pool.read(a).shape[-2] == 0, "a new request on a reused block"
    pool.next_step()
    pool.next_step()
    pool.slot(key=5, start=1)
    c = pool.slot(key=11, start=0)  # both slots owned; 9 was not seen for two steps: its slot is free
    assert c == b
    with pytest.raises(RuntimeError, match="exceeds"):
        pool.write(a, torch.ones(2, 2, H, 9, D))
    assert pool.nbytes == 2 * 2 * 2 * H * 8 * D * 4
    coded = WindowPool(2, 2, H, D, 8, torch.float32, bits=8)
    assert coded.nbytes == 2 * 2 * 2 * H * 8 * (D + 2 * 4)  # a byte per channel, fp32 scale and zero per vector
    with pytest.raises(TypeError, match="stored form"):
        coded.write(0, torch.ones(2, 2, H, 3, D))
    with pytest.raises(ValueError, match="exact, 8-bit or 6-bit"):
        WindowPool(2, 2, H, D, 8, torch.float32, bits=4)


def test_appending_to_a_window_is_writing_it_whole():
    g = torch.Generator().manual_seed(3)
    old, new = torch.randn(2, 2, H, 5, D, generator=g), torch.randn(2, 2, H, 2, D, generator=g)
    whole, grown = (WindowPool(1, 2, H, D, 8, torch.float32) for _ in range(2))
    whole.write(0, torch.cat([old, new], dim=-2))
    grown.write(0, old)
    grown.append(0, new)
    assert torch.equal(grown.read(0), whole.read(0))
    with pytest.raises(RuntimeError, match="exceeds"):
        grown.append(0, new)
    with pytest.raises(TypeError, match="stored form"):
        WindowPool(1, 2, H, D, 8, torch.float32, bits=8).append(0, new)
    coded_whole, coded_grown = (WindowPool(1, 2, H, D, 8, torch.float32, bits=8) for _ in range(2))
    coded_whole.write_stored(0, stored_window(torch.cat([old, new], dim=-2), 8))
    coded_grown.write_stored(0, stored_window(old, 8))
    coded_grown.append_stored(0, stored_window(new, 8))  # a token is coded on its own: the same codes either way
    assert torch.equal(coded_grown.read(0), coded_whole.read(0))
    with pytest.raises(ValueError, match="does not fit"):
        coded_grown.append_stored(0, quantize(new, 8, D // 2, "channels"))


@pytest.mark.parametrize("scheme,bits,group,scale_bits", [("kivi", 4, 16, None), ("rotated", 2, 16, None),
                                                          ("kivi", 3, 8, None), ("rotated-lloyd", 2, 8, None),
                                                          ("rotated", 3, 8, 8)])
def test_a_quantized_group_is_packed_in_its_pages_as_the_runtime_packs_it(scheme, bits, group, scale_bits):
    torch.manual_seed(bits)
    quant = Quantization(bits=bits, group_size=group, residual_length=R, scheme=scheme, scale_bits=scale_bits)
    _, reference = group_of(3, quant=quant)
    group_, _ = paged(reference, torch.bfloat16, room=BS * H * 2, page=32)
    assert group_.unit == max(group, BS)
    step_both(reference, group_, H, D, torch.bfloat16)
    keys = reference.components["keys"]
    assert isinstance(keys.fields["direction"].packed, QuantizedTensor) and keys.retained_q is not None
    assert keys.fields["direction"].packed.scale_bits == keys.retained_q.scale_bits == scale_bits
    assert keys.fields["direction"].dense is not None or group == BS, "a dense tail was exercised"
    assert reference.merged_length > 100


@pytest.mark.parametrize("pre_rope,window_bits,first,scale_bits,rounded", [
    (False, None, 45, None, False), (True, None, 45, None, False), (True, 8, 45, None, False),
    (False, 8, 1, None, False), (True, 8, 45, 8, False), (True, 8, 45, 8, True), (True, 6, 45, 8, True),
    (False, 6, 1, None, False)])
def test_an_unmerged_quantized_layer_in_pages_is_the_runtime_layer(pre_rope, window_bits, first, scale_bits, rounded):
    torch.manual_seed(int(pre_rope))
    spec = Quantization(bits=4, group_size=16, residual_length=R, sink_tokens=2, pre_rope_keys=pre_rope,
                        window_bits=window_bits, scale_bits=scale_bits)
    weights = None
    if rounded:  # keys rounded for the queries: the layer packs them, so the pages hold the same codes
        spec = Quantization(bits=3, group_size=16, residual_length=R, sink_tokens=2, pre_rope_keys=pre_rope,
                            window_bits=window_bits, scale_bits=scale_bits, scheme="rotated", key_rounding="queries")
        weights = torch.rand(H, D) ** 4 + 1e-3
    rope = RopeAngles(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    reference = QuantizedLayer(spec, rope=rope, key_weights=weights)
    layout = quantized_layer_layout(reference, H, D, torch.bfloat16)
    pages = torch.zeros(64, layout.units_per_page(32) * layout.unit_bytes, dtype=torch.uint8)
    pool = WindowPool(2, 1, H, D, R + layout.unit_tokens, torch.bfloat16, bits=window_bits)
    layer = PagedQuantizedLayer(reference, layout, pool, 32, lambda: pages)
    table = torch.randperm(64)
    before = 0
    for n in [first] + [1] * 40 + [7, 30] + [1] * 20:  # first=1: the sinks arrive one decode step at a time
        kv = torch.randn(2, 1, H, n, D).to(torch.bfloat16)
        want_k, want_v = reference.update(kv[0], kv[1])
        layer.begin_step()
        if n == 1 and before % 2:  # every other decode step read as views, as the blockwise decode does
            check_blockwise(layer.member_views(0, 0, table, before, kv[:, 0]), want_k, want_v)
        else:
            got_k, got_v = layer.member_kv(0, 0, table, before, kv[:, 0])
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
        layer.end_step([])
        before += n
    assert reference.quantized_length >= 80 and reference.sink_keys is not None
    assert reference.qkeys.scale_bits == scale_bits
    if window_bits is not None:  # stored as the runtime stores it: bits / 8 bytes per channel, fp16 scale and zero
        assert torch.equal(pool.read_stored(0).data[0], reference.keys.data)
        assert pool.nbytes == 2 * 2 * H * (R + layout.unit_tokens) * (D * window_bits // 8 + 2 * 2)


def run_against_runtime(reference: GroupStore, heads: int, dim: int, dtype: torch.dtype, page: int) -> None:
    """A paged copy of ``reference`` (room for every retained entry) must track it step by step."""
    layout = PageLayout.build(reference.components, heads, dim, reference.block_size, dtype,
                              reference.block_size * heads * 2)
    pages = torch.zeros(64, layout.units_per_page(page) * layout.unit_bytes, dtype=torch.uint8)
    pool = WindowPool(2, len(reference.layers), heads, dim, reference.residual_length + layout.unit_tokens, dtype)
    step_both(reference, PagedGroup(reference, layout, pool, page, lambda: pages), heads, dim, dtype,
              steps=[21] + [1] * 30 + [9, 13] + [1] * 10)
    assert reference.merged_length >= 40


@pytest.mark.parametrize("quant", [None, Quantization(bits=4, group_size=8, residual_length=8)])
def test_other_merge_methods_are_paged_as_the_runtime_stores_them(quant):
    """The pages hold whatever a method stores (its fields, from the registry): average, lowrank
    (a fitted basis from the sidecar, coefficients packed per token in a quantized profile) and
    lowrank keys beside exact values."""
    from minicache.runtime.cache import MiniCache
    from tests.test_lowrank import _model, _profile, _windows

    torch.manual_seed(3)
    average = MergeSettings.create(method="average", t=0.5, gamma=0.2, sink_tokens=1)
    store = GroupStore(MergeGroup((0, 1, 2), average, average), residual_length=8, block_size=4,
                       padding=PaddingInfo(), quant=quant)
    run_against_runtime(store, H, D, torch.float32, page=16)
    model = _model()
    profile = _profile(model, [(2, 3)], rank=6).with_quantization(quant)
    (lowrank,) = MiniCache(profile, model.config).stores
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    assert lowrank.components["keys"].method.name == "lowrank"
    run_against_runtime(lowrank, heads, dim, torch.float32, page=16)
    # keys low rank beside exact values (a group of one layer; exact retains nothing)
    from tests.test_exact import _keys_only

    (keys_only, _) = MiniCache(_keys_only(model, layers=(1, 3), rank=4).with_quantization(quant), model.config).stores
    assert keys_only.components["values"].method.name == "exact"
    run_against_runtime(keys_only, heads, dim, torch.float32, page=16)
    # query-weighted key bases (an encoder beside the basis in the sidecar)
    from tests.test_lowrank_query import _query_profile

    stores = MiniCache(_query_profile(model, _windows(4, 64, seed=11)).with_quantization(quant), model.config).stores
    assert stores[1].components["keys"].params.basis == "query"
    run_against_runtime(stores[1], heads, dim, torch.float32, page=16)


def test_decode_paths_read_blockwise_and_fuse_only_where_asked_or_a_gpu_runs_the_kernel():
    assert list(DECODE_PATHS) == ["auto", "blockwise", "fused", "restore"]
    assert [reads_blockwise(path) for path in DECODE_PATHS] == [True, True, True, False]
    # on CPU `auto` never takes the interpreter (minutes per step), `fused` is asked for
    assert [reads_fused(path, torch.device("cpu")) for path in DECODE_PATHS] == [False, False, True, False]
    assert decode_path("fused") == "fused"
    with pytest.raises(ValueError, match=r"MINICACHE_VLLM_DECODE='triton' is not a decode path .*blockwise: every"):
        decode_path("triton")


@pytest.mark.parametrize("rows", [1, 5])
def test_restored_attention_is_causal_sdpa_and_upcasts_only_decode_rows_on_cpu(rows):
    generator = torch.Generator().manual_seed(3)
    before, hq, h = 11, 6, 2
    query = torch.randn(1, hq, rows, D, generator=generator).to(torch.bfloat16)
    keys, values = (torch.randn(1, h, before + rows, D, generator=generator).to(torch.bfloat16) for _ in range(2))
    got = restored_attention(query, keys, values, before, 0.3)
    assert got.shape == query.shape and got.dtype == torch.bfloat16
    # by hand, float64: query i (position before + i) sees keys 0 .. before + i
    q, k, v = (x.double() for x in (query, keys.repeat_interleave(hq // h, 1), values.repeat_interleave(hq // h, 1)))
    logits = q @ k.transpose(-1, -2) * 0.3
    seen = torch.arange(before + rows) <= before + torch.arange(rows).unsqueeze(1)
    want = logits.masked_fill(~seen, -torch.inf).softmax(-1) @ v
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    upcast = torch.float32 if rows == 1 else torch.bfloat16
    assert attention_dtype(torch.bfloat16, torch.device("cpu"), rows) == upcast
    assert attention_dtype(torch.bfloat16, torch.device("cuda"), 1) == torch.bfloat16


def _quantized_layer_store(scheme: str = "kivi", bits: int = 4, pre_rope: bool = False, window_bits=None,
                           device: str = "cpu"):
    def build():
        return _quantized_layer(Quantization(scheme=scheme, bits=bits, group_size=16, residual_length=R, sink_tokens=2,
                                             pre_rope_keys=pre_rope, window_bits=window_bits), device)
    return build


def _quantized_layer(spec: Quantization, device: str = "cpu"):
    rope = RopeAngles(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    template = QuantizedLayer(spec, rope=rope)
    layout = quantized_layer_layout(template, H, D, torch.float32)
    pages = torch.zeros(64, layout.units_per_page(32) * layout.unit_bytes, dtype=torch.uint8, device=device)
    pool = WindowPool(4, 1, H, D, R + layout.unit_tokens, torch.float32, device=device, bits=spec.window_bits)
    return PagedQuantizedLayer(template, layout, pool, 32, lambda: pages), H, D


def _group_store(quant: Quantization | None, device: str = "cpu"):
    def build():
        torch.manual_seed(0)
        _, reference = group_of(2, quant=quant)
        return paged(reference, torch.float32, room=BS * H * 2, device=device)[0], H, D
    return build


#: Where the fused kernel's plugin test runs: a GPU when there is one (benchmarks/gpu_results.sh runs it there),
#: else the CPU through Triton's interpreter (tests/conftest.py).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _lowrank_store():
    from minicache.runtime.cache import MiniCache
    from tests.test_lowrank import _model, _profile

    model = _model()
    (template,) = MiniCache(_profile(model, [(2, 3)], rank=6), model.config).stores
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    layout = PageLayout.build(template.components, heads, dim, template.block_size, torch.float32,
                              template.block_size * heads * 2)
    pages = torch.zeros(64, layout.units_per_page(16) * layout.unit_bytes, dtype=torch.uint8)
    pool = WindowPool(4, 2, heads, dim, template.residual_length + layout.unit_tokens, torch.float32)
    return PagedGroup(template, layout, pool, 16, lambda: pages), heads, dim


@pytest.mark.parametrize("build,blockwise,stacked", [
    (_group_store(None), True, True),  # SLERP views stacked into one padded batch
    (_lowrank_store, True, True),  # low-rank coefficients stacked likewise
    (_group_store(None), False, False),  # restored, one masked SDPA over the padded batch
    (_group_store(Quantization(bits=4, group_size=16, residual_length=R)), True, True),  # packed units, merged tails
    (_quantized_layer_store(), False, False),  # every request's chunks restored at once
    (_quantized_layer_store("rotated", 3, pre_rope=True), False, False),  # a rotated packing, RoPE put back
    (_quantized_layer_store("rotated-lloyd", 2), False, False),  # uneven levels: the table travels with the pages
    (_quantized_layer_store("rotated", 3, pre_rope=True, window_bits=8), False, False),  # 8-bit windows in the pool
    (_quantized_layer_store(), True, False),  # every request's chunks as one batch of views, read a block at a time
    (_quantized_layer_store("rotated", 3, pre_rope=True, window_bits=8), True, False),
    (_quantized_layer_store("rotated", 3, pre_rope=True, window_bits=6), True, False),  # 6-bit windows, rotated
], ids=["slerp-stacked", "lowrank-stacked", "slerp-restored", "packed-group", "packed-layer", "packed-layer-rotated",
        "packed-layer-lloyd", "packed-layer-window8", "packed-layer-blockwise", "packed-layer-window8-blockwise",
        "packed-layer-window6-blockwise"])
def test_a_steps_decode_rows_attended_together_are_each_requests_own_attention(build, blockwise, stacked, monkeypatch):
    """Requests of different lengths (one with nothing merged yet, one joining late), decoding together:
    the batched decode attention of each member must be what each request's own restored keys and values
    give (float64 SDPA over a second, identical store driven one request at a time)."""
    calls = []
    read_together = PagedGroup.stacked_views
    monkeypatch.setattr(PagedGroup, "stacked_views",
                        lambda self, member, rows: calls.append(len(rows)) or read_together(self, member, rows))
    batched, before = _decode_rows_against_each_request_alone(build, blockwise)
    if isinstance(batched, PagedGroup):  # one long request, one with nothing merged (SLERP's windows)
        merged = [merged_length(n, batched.residual_length, batched.block_size) for n in before]
        assert merged[0] > 3 * batched.block_size and merged[2] == (0 if batched.residual_length == R else 8)
    assert bool(calls) == stacked and all(c == 3 for c in calls[-2:])


@pytest.mark.parametrize("build,kernel", [
    (_group_store(None, KERNEL_DEVICE), True),  # SLERP units gathered from the pages into one batch, read by the kernel
    (_group_store(Quantization(bits=4, group_size=16, residual_length=R), KERNEL_DEVICE), True),  # + merged tails
    # a rotated packing in a merged group: its merged tails rotated into the packing's frame at launch
    (_group_store(Quantization(bits=3, group_size=16, residual_length=R, scheme="rotated"), KERNEL_DEVICE), True),
    (_quantized_layer_store("rotated", 3, pre_rope=True, window_bits=8, device=KERNEL_DEVICE), True),  # 8-bit window
    (_lowrank_store, False),  # a layout the kernel does not read: the PyTorch blockwise path, logged
], ids=["slerp", "packed-group", "packed-group-rotated", "packed-layer-rotated-window8", "lowrank-falls-back"])
def test_the_fused_kernel_reads_a_steps_gathered_decode_rows_as_each_request_alone(build, kernel, monkeypatch, caplog):
    """``MINICACHE_VLLM_DECODE=fused`` (a GPU, or Triton's interpreter): the batch gathered from the block tables
    goes to minicache's fused decode kernel, which must give each request's own attention; stores it does not
    read fall back to the PyTorch path with one log line."""
    import minicache.runtime.attention as runtime_attention
    import minicache.runtime.kernels.decode as decode

    monkeypatch.setattr(runtime_attention, "_WARNED", set())  # said once per process: not by an earlier test
    launches = []
    kernel_call = decode.fused_decode_attention
    monkeypatch.setattr(decode, "fused_decode_attention",
                        lambda *args, **kwargs: launches.append(args[0].shape[0]) or kernel_call(*args, **kwargs))
    with caplog.at_level("WARNING", logger="minicache.runtime.attention"):
        _decode_rows_against_each_request_alone(build, True, fused=True, steps=14)
    assert bool(launches) == kernel and (not kernel or max(launches) == 2)
    assert kernel or "fused decode attention not used" in caplog.text


def _decode_rows_against_each_request_alone(build, blockwise: bool, fused: bool = False, steps: int = 33):
    """Drive two copies of a store: requests decoding together through ``decode_attention`` in one, each
    request's own restored keys and values in the other; their attention must agree at every step. Returns
    the batched store and each request's tokens."""
    (batched, heads, dim), (alone, _, _) = build(), build()
    members = getattr(batched, "members", 1)
    device = batched.pool.data.device
    generator = torch.Generator().manual_seed(5)
    tables = torch.randperm(64).view(4, 16)
    before = [0, 0, 0]
    # request 0 starts long, 1 joins with a short prompt, 2 joins later (nothing merged while decoding)
    schedule = [{0: 70}, {0: 1, 1: 20}] + [{0: 1, 1: 1}] * 20 + [{0: 1, 1: 1, 2: 5}] + [{0: 1, 1: 1, 2: 1}] * 12
    for step in schedule[:2 + steps]:
        inputs = {row: torch.randn(2, members, heads, n, dim, generator=generator).to(device)
                  for row, n in step.items()}
        queries = {row: torch.randn(1, 2 * heads, n, dim, generator=generator).to(device)
                   for row, n in step.items()}
        for store in (batched, alone):
            store.begin_step()
        for m in range(members):
            decoding = []
            for row, xs in inputs.items():
                if xs.shape[-2] == 1:
                    decoding.append(DecodeRow(row, tables[row], before[row], xs[:, m], queries[row]))
                else:
                    batched.member_kv(m, row, tables[row], before[row], xs[:, m])
            if decoding:
                got = decode_attention(batched, m, decoding, blockwise, 0.25, fused)  # [R, Hq, D]
                for i, d in enumerate(decoding):
                    keys, values = alone.member_kv(m, d.row, d.table, d.before, d.step)
                    want = F.scaled_dot_product_attention(d.query.double(), keys.double(), values.double(),
                                                          scale=0.25, enable_gqa=True)
                    torch.testing.assert_close(got[i].double(), want[0, :, 0], rtol=1e-5, atol=1e-5)
            for row, xs in inputs.items():
                if xs.shape[-2] > 1:
                    alone.member_kv(m, row, tables[row], before[row], xs[:, m])
        rows = [(row, tables[row], before[row], before[row] + xs.shape[-2]) for row, xs in inputs.items()]
        for store in (batched, alone):
            store.end_step(rows)
        for row, xs in inputs.items():
            before[row] += xs.shape[-2]
    return batched, before


@pytest.mark.parametrize("quant", [None, Quantization(bits=4, group_size=16, residual_length=R)],
                         ids=["dense", "packed"])
def test_decode_rows_read_from_the_pages_at_once_are_each_requests_own_tokens(quant):
    """:meth:`PagedGroup.stacked_views` (dense units: one gather and parse of every request's units; packed
    units: every request's store, its merged tail merged again, stacked; both shared by the members) must hold,
    at each request's own positions, exactly the tokens its own view restores. Packed: key groups of 16
    tokens are units of two merge blocks, so a request's keys end in a dense tail of 0 or 8 merged tokens
    and its values (packed per token) in a packed one."""
    store, heads, dim = _group_store(quant)()
    assert store.stacks_decode_rows and (store.unit == 2 * BS) == (quant is not None)
    generator = torch.Generator().manual_seed(3)
    tables = torch.randperm(64).view(4, 16)
    before = [0, 0, 0]
    schedule = [{0: 70, 1: 20}] + [{0: 1, 1: 1}] * 9 + [{0: 1, 1: 1, 2: 3}] + [{0: 1, 1: 1, 2: 1}] * 2
    tails = set()  # merged tails of a step's decoding requests
    for n, step in enumerate(schedule):
        inputs = {row: torch.randn(2, store.members, heads, k, dim, generator=generator) for row, k in step.items()}
        store.begin_step()
        for m in range(store.members):
            decoding = [(row, tables[row], before[row], xs[:, m]) for row, xs in inputs.items() if xs.shape[-2] == 1]
            for row, xs in inputs.items():
                if xs.shape[-2] > 1 or n < 5:
                    store.member_kv(m, row, tables[row], before[row], xs[:, m])
            if n >= 5 and decoding:
                tails.add(tuple(sorted({merged_length(d[2], R, BS) % store.unit for d in decoding})))
                own = [store.member_views(m, *d) for d in decoding]
                keys, values, mask = store.stacked_views(m, decoding)
                assert keys.shape[0] == len(decoding) and mask.shape == (len(decoding), keys.shape[-2])
                for i, (k, v) in enumerate(own):
                    assert int(mask[i].sum()) == before[decoding[i][0]] + 1
                    assert torch.equal(keys.materialize()[i][:, mask[i]], k.materialize()[0])
                    assert torch.equal(values.materialize()[i][:, mask[i]], v.materialize()[0])
        store.end_step([(row, tables[row], before[row], before[row] + xs.shape[-2]) for row, xs in inputs.items()])
        for row, xs in inputs.items():
            before[row] += xs.shape[-2]
    lengths = [merged_length(n, store.residual_length, store.block_size) for n in before]
    assert lengths[0] > lengths[1] > 0 and lengths[2] == 0  # padded twice over: merged tokens and windows
    if quant is not None:
        assert (0, BS) in tails  # steps where one request's merged tail was empty and another's was not
        # key groups of 12 tokens: units of 24, tails of 8 or 16 tokens, packed in part: refused
        _, reference = group_of(2, quant=Quantization(bits=4, group_size=12, residual_length=R))
        ragged, _ = paged(reference, torch.float32, room=BS * H * 2, page=48)
        assert not ragged.stacks_decode_rows
        with pytest.raises(ValueError, match="cannot be read as one batch"):
            ragged.stacked_views(0, [])



def test_groups_the_paged_stores_cannot_serve_are_named():
    """Keys stored before RoPE are encoded at their cache index; the paged merge encodes a unit apart from
    it, so such profiles are refused (with the group), as closed-loop methods are."""
    from minicache_vllm.paged import unservable_groups

    from minicache import MergeProfile, MiniCache
    from minicache.profile import Defaults
    from tests.tiny_configs import tiny_config

    config = tiny_config("llama", num_hidden_layers=4)
    d = Defaults()
    plain = MergeGroup((1, 2), d.settings(t=0.6), d.settings(t=0.6))
    assert unservable_groups(MiniCache(MergeProfile(groups=(plain,), defaults=d), config)) is None
    pre = MergeGroup((1, 2), d.settings("average", pre_rope=True), d.settings("average"))
    problem = unservable_groups(MiniCache(MergeProfile(groups=(pre,), defaults=d), config))
    assert problem is not None and "[1, 2]" in problem and "before RoPE" in problem
