"""Batch invariance on the real model (issue 16 item 2): a sequence gives the same greedy tokens, and
stores the same bytes, alone and inside a left-padded batch of 8, for the paper preset, the shipped
profile and a quantized profile (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minicache import MergeProfile, MiniCache
from minicache.profile import Quantization
from tests.test_smollm2 import greedy, left_padded

NEW_TOKENS = 24
SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def eight_prompts(license_text):
    # Eight lengths between ~130 and ~330 tokens: with the default 128-token window and 64-token blocks,
    # the longer ones merge during the prefill, the shorter ones only while decoding, each at its own step.
    sizes = (520, 1400, 760, 1150, 600, 1300, 900, 1000)
    return [license_text[5000 + i * 4000 : 5000 + i * 4000 + n] for i, n in enumerate(sizes)]


def _profiles(config) -> dict[str, MergeProfile]:
    shipped = MergeProfile.load(SHIPPED)
    return {
        "paper": MergeProfile.preset("paper", config),
        "shipped": shipped,
        "shipped-4bit": shipped.with_quantization(Quantization(bits=4, group_size=32, residual_length=64)),
    }


def _scheduled_bytes(report: dict) -> int:
    """Bytes in merged and quantized layers (plain layers hold padding in a batch, as `DynamicCache` does)."""
    return report["kv_bytes"] - report["parts"]["plain_layers"]


@pytest.mark.slow  # 3 profiles x (8 sequences alone + one batch of 8), 24 tokens each: ~2 min on 2 cores
@pytest.mark.parametrize("name", ["paper", "shipped", "shipped-4bit"])
def test_a_sequence_is_the_same_alone_and_in_a_padded_batch(smollm2, eight_prompts, name):
    model, tokenizer = smollm2
    profile = _profiles(model.config)[name]
    batch = left_padded(tokenizer, eight_prompts)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) == 8, lengths
    batch_cache = MiniCache(profile, model)
    together = greedy(model, tokenizer, batch, batch_cache, NEW_TOKENS)
    report = batch_cache.memory_report()
    merged = report["groups"][0]["merged_tokens"]
    same_tokens = 0
    for row, n in enumerate(lengths):
        alone_batch = {key: value[row : row + 1, -n:] for key, value in batch.items()}
        alone_cache = MiniCache(profile, model)
        alone = greedy(model, tokenizer, alone_batch, alone_cache, NEW_TOKENS)
        same_tokens += torch.equal(together[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])
        alone_report = alone_cache.memory_report()
        assert report["per_sequence"][row] == _scheduled_bytes(alone_report), f"row {row}: stored bytes"
        assert merged[row] == alone_report["groups"][0]["merged_tokens"], f"row {row}: merged tokens"
    assert same_tokens == 8, f"{name}: {same_tokens} of 8 sequences give the same greedy tokens"
    assert len(set(merged)) > 1, "the sequences merged different amounts: each followed its own schedule"
