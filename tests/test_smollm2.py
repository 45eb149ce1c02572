"""MiniCache on the real test model (SmolLM2-135M-Instruct): exactness, memory, batching."""

import pytest
import torch
from transformers import DynamicCache

from minicache import MergeProfile, MiniCache
from tests.test_cache import sum_of_storages


def left_padded(tokenizer, texts: list[str]):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def greedy(model, tokenizer, batch, cache, new_tokens):
    with torch.inference_mode():
        return model.generate(
            **batch, cache=cache, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )


@pytest.fixture(scope="module")
def prompts(license_text):
    # Four prompts of different lengths (so three of them are left-padded in a batch).
    return [license_text[i * 3000 : i * 3000 + n] for i, n in enumerate((900, 400, 650, 250))]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_no_groups_gives_the_same_tokens_as_dynamic_cache(smollm2, prompts, batch_size):
    model, tokenizer = smollm2
    batch = left_padded(tokenizer, prompts[:batch_size])
    full = greedy(model, tokenizer, batch, DynamicCache(config=model.config), 16)
    mini = greedy(model, tokenizer, batch, MiniCache(MergeProfile(), model), 16)
    assert torch.equal(full, mini)


def test_paper_preset_first_token_is_exact(smollm2, prompts):
    # Prefill attends over exact keys and values; merging happens after it, so token 1 is unchanged.
    model, tokenizer = smollm2
    batch = left_padded(tokenizer, prompts)
    full = greedy(model, tokenizer, batch, DynamicCache(config=model.config), 1)
    cache = MiniCache(MergeProfile.preset("paper", model.config), model)
    mini = greedy(model, tokenizer, batch, cache, 1)
    assert torch.equal(full, mini)
    assert cache.memory_report()["compression_ratio"] > 1.0  # it did merge


@pytest.mark.slow  # 4,096-token prefill + 128 decode steps on CPU: ~30 s
def test_paper_preset_saves_memory_at_4096_tokens(smollm2, license_text):
    """Issue 2 acceptance: 4,096-token prompt of real text + 128 greedy tokens, kv_bytes <= 0.81 x full."""
    model, tokenizer = smollm2
    ids = tokenizer(license_text, return_tensors="pt").input_ids[:, :4096]
    assert ids.shape[1] == 4096
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache = MiniCache(MergeProfile.preset("paper", model.config), model)
    out = greedy(model, tokenizer, batch, cache, 128)
    assert out.shape[1] == 4096 + 128
    report = cache.memory_report()
    assert report["seq_length"] == 4096 + 127  # the last generated token is never fed back
    full_bytes = 2 * model.config.num_hidden_layers * 3 * 64 * report["seq_length"] * 4  # K+V, 3 heads, fp32
    assert report["kv_bytes_full"] == full_bytes
    assert report["kv_bytes"] <= 0.81 * report["kv_bytes_full"], report
    held = sum_of_storages(cache)
    assert abs(report["kv_bytes"] - held) <= 0.01 * held, (report["kv_bytes"], held)
