"""MiniCache against the transformers cache contract, on tiny random models of several architectures."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from minicache import MergeProfile, MiniCache
from minicache.methods.slerp import restore, slerp_pair
from minicache.profile import Defaults, MergeGroup, MergeSettings
from minicache.runtime.store import GroupStore, PaddingInfo
from tests.tiny_configs import ARCHS, tiny_config


def make_model(arch: str, **overrides):
    torch.manual_seed(0)
    if arch == "mistral":
        # Mistral's default 4,096-token sliding window makes every layer a sliding one; merging
        # sliding-window layers is refused (tested below), so cover Mistral as full attention.
        overrides.setdefault("sliding_window", None)
    config = tiny_config(arch, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def small_defaults(**overrides) -> Defaults:
    # Small windows so that a few dozen tokens already exercise merging and decode-time merges.
    kwargs = {"residual_length": 8, "block_size": 4, "gamma": 0.1, **overrides}
    return Defaults(**kwargs)


def profile_for(model, groups=((1, 2),), **defaults) -> MergeProfile:
    d = small_defaults(**defaults)
    return MergeProfile(
        groups=tuple(MergeGroup(tuple(g), d.settings(), d.settings()) for g in groups),
        defaults=d,
    )


def sequence(cache: MiniCache, i: int = 0) -> MiniCache:
    """The cache that holds sequence ``i``: a padded batch is stored one sequence at a time."""
    return cache.rows.rows[i] if cache.rows is not None else cache


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def greedy(model, ids, mask, cache, new_tokens=12, **kwargs):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_no_groups_is_identical_to_dynamic_cache(arch):
    model = make_model(arch)
    for lengths in ([20], [20, 13, 7, 17]):
        ids, mask = left_padded_batch(model.config.vocab_size, lengths)
        want = greedy(model, ids, mask, DynamicCache(config=model.config))
        got = greedy(model, ids, mask, MiniCache(MergeProfile(), model))
        assert torch.equal(want, got), f"{arch} {lengths}"


@pytest.mark.parametrize("arch", ARCHS)
def test_merging_generates_and_stores_less(arch):
    model = make_model(arch)
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 31])
    cache = MiniCache(profile_for(model), model)
    want = greedy(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    out = greedy(model, ids, mask, cache, new_tokens=16)
    assert torch.equal(out[:, : want.shape[1]], want), "prefill attends exact KV: first token identical"
    report = cache.memory_report()
    assert report["seq_length"] == ids.shape[1] + 15
    assert cache.rows is not None and min(report["groups"][0]["merged_tokens"]) > 0
    assert report["kv_bytes"] < report["kv_bytes_full"]


def test_pair_store_restores_the_merge_math():
    torch.manual_seed(0)
    settings = MergeSettings.create(t=0.6, gamma=0.2, sink_tokens=1)
    group = MergeGroup((0, 1), settings, settings)
    store = GroupStore(group, residual_length=5, block_size=4, padding=PaddingInfo())
    ka, kb, va, vb = (torch.randn(2, 3, 23, 16) for _ in range(4))
    store.update(0, ka, va)
    store.update(1, kb, vb)
    assert store.merged_length == 16 and store.residual_length_of(0) == 7
    for member, exact in ((0, ka), (1, kb)):
        keys, _ = store.kernel_views(member)
        assert keys.merged_length == 16 and keys.residual.shape[-2] == 7
        restored = keys.materialize()
        assert restored.shape == exact.shape
        pair = slerp_pair(ka[..., :16, :], kb[..., :16, :], 0.6)
        merged = restore(pair.direction, pair.magnitudes[..., member])
        index = keys.retained_index.long()
        retained = torch.zeros(2, 3, 16, dtype=torch.bool)
        retained[index[:, 0], index[:, 1], index[:, 2]] = True
        assert retained[:, :, 0].all(), "the sink token is always retained"
        torch.testing.assert_close(restored[..., :16, :][retained], exact[..., :16, :][retained], rtol=0, atol=0)
        torch.testing.assert_close(restored[..., :16, :][~retained], merged[~retained], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(restored[..., 16:, :], exact[..., 16:, :], rtol=0, atol=0)


def test_memory_report_matches_tensors_held():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [60, 45, 50])
    cache = MiniCache(profile_for(model, groups=((0, 1), (2, 3))), model)
    greedy(model, ids, mask, cache, new_tokens=9)
    report = cache.memory_report()
    assert report["kv_bytes"] == sum_of_storages(cache)
    # A DynamicCache with the same tokens holds exactly kv_bytes_full.
    dynamic = DynamicCache(config=model.config)
    greedy(model, ids, mask, dynamic, new_tokens=9)
    assert report["kv_bytes_full"] == sum(t.numel() * t.element_size() for t in dynamic_tensors(dynamic))


def sum_of_storages(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj``'s attributes (independent walk)."""
    seen_objects, storages = set(), {}

    def walk(x):
        if id(x) in seen_objects:
            return
        seen_objects.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple | set):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and not isinstance(x, type | torch.nn.Module):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    # The padding mask belongs to the caller (generate's attention mask), not to the cache.
    if obj.padding.real is not None:
        storages.pop(obj.padding.real.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def dynamic_tensors(cache):
    for layer in cache.layers:
        yield layer.keys
        yield layer.values


@pytest.mark.parametrize("quantized", [False, True])
def test_batch_independence_with_left_padding(quantized):
    """A sequence in a left-padded batch stores exactly what it stores alone: same merged tokens, same
    retained tokens, same bytes, same greedy tokens (the schedule counts its own real tokens only)."""
    from minicache.profile import Quantization

    model = make_model("llama")
    lengths = [70, 43, 58, 61]
    ids, mask = left_padded_batch(model.config.vocab_size, lengths, seed=4)
    profile = profile_for(model)
    if quantized:
        profile = profile.with_quantization(Quantization(bits=4, group_size=16, residual_length=8))
    batch_cache = MiniCache(profile, model)
    batch_out = greedy(model, ids, mask, batch_cache, new_tokens=6)
    assert batch_cache.rows is not None and len(batch_cache.rows) == 4
    report = batch_cache.memory_report()
    with pytest.raises(ValueError, match="stored one sequence at a time"):
        batch_cache.views(1)
    for row, n in enumerate(lengths):
        alone = MiniCache(profile, model)
        alone_out = greedy(model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], alone, new_tokens=6)
        assert alone.rows is None, "no padding: one batched store"
        assert torch.equal(batch_out[row, -6:], alone_out[0, -6:])
        stored = batch_cache.rows.rows[row]
        for c in range(2):
            b_comp, a_comp = stored.views(1)[c], alone.views(1)[c]
            torch.testing.assert_close(b_comp.materialize(), a_comp.materialize(), atol=1e-5, rtol=1e-4)
            assert torch.equal(b_comp.retained_index, a_comp.retained_index)
            assert (0, 0) in {(h, p) for _, h, p in a_comp.retained_index.tolist()}, "the first real token is a sink"
        alone_report = alone.memory_report()
        assert report["per_sequence"][row] == alone_report["kv_bytes"] - alone_report["parts"]["plain_layers"]
        assert report["groups"][0]["merged_tokens"][row] == alone_report["groups"][0]["merged_tokens"] > 20
    batch_cache.reset()
    assert batch_cache.rows is None, "a reset cache starts batched again"


def test_beam_search_and_sampling_run_and_reorder_the_shared_store():
    model = make_model("qwen2")
    ids, mask = left_padded_batch(model.config.vocab_size, [30, 22])
    cache = MiniCache(profile_for(model, groups=((0, 1), (2, 3))), model)
    out = greedy(model, ids, mask, cache, new_tokens=10, num_beams=3)
    assert out.shape == (2, 30 + 10)
    assert len(cache.rows) == 6  # 2 sequences x 3 beams
    torch.manual_seed(0)
    cache = MiniCache(profile_for(model), model)
    out = model.generate(
        input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=10, do_sample=True, top_k=5
    )
    assert out.shape == (2, 40)


def test_select_batch_equals_running_the_subset():
    torch.manual_seed(0)
    settings = MergeSettings.create(t=0.5, gamma=0.3)
    group = MergeGroup((0, 1), settings, settings)
    full = GroupStore(group, residual_length=3, block_size=2, padding=PaddingInfo())
    sub = GroupStore(group, residual_length=3, block_size=2, padding=PaddingInfo())
    ka, kb = torch.randn(3, 2, 15, 8), torch.randn(3, 2, 15, 8)
    index = torch.tensor([2, 0, 2])
    for store, a, b in ((full, ka, kb), (sub, ka[index], kb[index])):
        store.update(0, a, a)
        store.update(1, b, b)
    full.select_batch(index)
    for member in (0, 1):
        torch.testing.assert_close(
            full.kernel_views(member)[0].materialize(), sub.kernel_views(member)[0].materialize()
        )


def test_continued_cache_second_turn():
    model = make_model("mistral")
    ids, mask = left_padded_batch(model.config.vocab_size, [35])
    cache = MiniCache(profile_for(model), model)
    first = greedy(model, ids, mask, cache, new_tokens=8)
    follow_up = torch.randint(3, model.config.vocab_size, (1, 12))
    second_ids = torch.cat([first, follow_up], dim=1)
    second = greedy(model, second_ids, torch.ones_like(second_ids), cache, new_tokens=8)
    assert second.shape[1] == second_ids.shape[1] + 8
    assert torch.equal(second[:, : second_ids.shape[1]], second_ids)
    assert cache.get_seq_length() == second.shape[1] - 1


def test_crop_only_inside_residual_window():
    model = make_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, [30])
    cache = MiniCache(profile_for(model), model)
    greedy(model, ids, mask, cache, new_tokens=3)
    seen = cache.get_seq_length()
    cache.crop(-2)
    assert all(cache.get_seq_length(i) == seen - 2 for i in range(len(cache.layers)))
    with pytest.raises(ValueError, match="residual"):
        cache.crop(-100)
    assert cache.get_seq_length() == seen - 2, "a refused crop changes nothing"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_groups_of_three_and_four_layers_generate_and_store_less(arch):
    model = make_model(arch, num_hidden_layers=6)
    ids, mask = left_padded_batch(model.config.vocab_size, [40, 31])
    cache = MiniCache(profile_for(model, groups=((0, 1, 2), (3, 4, 5))), model)
    want = greedy(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    out = greedy(model, ids, mask, cache, new_tokens=10)
    assert torch.equal(out[:, : want.shape[1]], want), "prefill attends exact KV: first token identical"
    report = cache.memory_report()
    assert report["kv_bytes"] == sum_of_storages(cache)
    assert [g["layers"] for g in report["groups"]] == [[0, 1, 2], [3, 4, 5]]
    keys, _ = sequence(cache).views(0)
    assert keys.magnitude.shape[-1] == 3, "one magnitude per member layer"
    assert keys.retained_value.shape[1] == 3
    # Three layers share one direction: the merged prefix costs a third of the plain one, plus magnitudes.
    assert report["kv_bytes"] < 0.8 * report["kv_bytes_full"]
    four = MiniCache(profile_for(model, groups=((1, 2, 3, 4),)), model)
    greedy(model, ids, mask, four, new_tokens=10)
    assert min(four.memory_report()["groups"][0]["merged_tokens"]) > 0


def test_sliding_window_layers_are_refused():
    model = make_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="full-attention layers only"):
        MiniCache(profile_for(model), model)
