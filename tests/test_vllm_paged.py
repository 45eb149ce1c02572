"""The vLLM plugin's paged store (integrations/vllm, no vLLM needed) against the transformers runtime.

A merged group's pages, written and read through a block table the way the plugin's attention does
inside vLLM, must give every member the keys and values minicache's own GroupStore gives it, step
by step: prefill, then decode steps that merge block after block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm"))

from minicache_vllm.layout import COMPONENTS, PageLayout
from minicache_vllm.paged import PagedGroup
from minicache_vllm.windows import WindowPool, merged_length

from minicache.profile import MergeGroup, MergeSettings
from minicache.runtime.store import GroupStore, PaddingInfo

H, D, R, BS, PAGE = 2, 8, 16, 8, 16  # heads, head dim, residual window, merge block, vLLM block


def group_of(k: int, gamma: float = 0.3) -> tuple[MergeGroup, GroupStore]:
    settings = MergeSettings.create(t=0.6, gamma=gamma, sink_tokens=1)
    group = MergeGroup(tuple(range(k)), settings, settings)
    return group, GroupStore(group, residual_length=R, block_size=BS, padding=PaddingInfo())


def paged(template: GroupStore, dtype: torch.dtype, room: int, num_blocks: int = 64) -> tuple[PagedGroup, torch.Tensor]:
    k = len(template.layers)
    methods = {c: (template.components[c].method, template.components[c].params) for c in COMPONENTS}
    layout = PageLayout.build(methods, k, H, D, BS, dtype, room)
    pages = torch.zeros(num_blocks, layout.merge_blocks_per_page(PAGE) * layout.block_bytes, dtype=torch.uint8)
    pool = WindowPool(4, k, H, D, R + BS, dtype)
    return PagedGroup(template, layout, pool, PAGE, lambda: pages), pages


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_group_gives_each_member_what_the_runtime_store_gives(k, dtype):
    torch.manual_seed(k)
    _, reference = group_of(k)
    group, _ = paged(reference, dtype, room=BS * H * 2)  # room for every entry: nothing left out
    table = torch.randperm(64)  # the request's blocks, anywhere in the pool
    steps = [45] + [1] * 40 + [7, 30] + [1] * 20  # prefill, decode, a chunk, more decode
    before = 0
    for n in steps:
        xs = torch.randn(2, k, 1, H, n, D).to(dtype)  # [keys/values, member, batch, H, n, D]
        group.begin_step()
        for m in range(k):
            want_k, want_v = reference.update(m, xs[0, m], xs[1, m])
            got_k, got_v = group.member_kv(m, 0, table, before, xs[:, m, 0])
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
        group.end_step([(0, table, before, before + n)])
        before += n
        assert merged_length(before, R, BS) == reference.merged_length
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
    methods = {c: (template.components[c].method, template.components[c].params) for c in COMPONENTS}
    layout = PageLayout.build(methods, 3, 3, 64, 64, torch.bfloat16, 32)
    # SLERP per token and head: a direction (64 bf16) and 3 magnitudes (fp16), for keys and values.
    fields = 2 * 3 * 64 * (64 * 2 + 3 * 2)
    assert layout.block_bytes >= fields + 32 * 3 * 64 * 2
    assert layout.block_bytes - (fields + 32 * 3 * 64 * 2) < 4 + 32 * 6 + 3 * 8
    assert layout.content_bytes(64) * 3 * 64 >= layout.block_bytes
    assert layout.content_bytes(128) * 3 * 128 >= 2 * layout.block_bytes
    with pytest.raises(ValueError, match="multiple of the profile's merge block"):
        layout.content_bytes(96)
    with pytest.raises(ValueError, match="members"):
        PageLayout.build(methods, 1, 3, 64, 64, torch.bfloat16, 32)


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
