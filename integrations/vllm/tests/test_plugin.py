"""The plugin under vLLM's CPU build: stock behaviour without a profile, the profile's merged storage with one.

Each test starts vLLM engines in fresh processes (about a minute each on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MAIN_PYTHON, PROFILE
from vllm_runs import MERGED_ENGINE, generate, reference, result_of

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is the capital of France?\nAnswer:",
]
LICENCES = Path("/usr/share/common-licenses")


def long_prompts(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` real-text tokens (Debian's licence texts): long enough to merge."""
    from transformers import AutoTokenizer

    files = [LICENCES / name for name in ("Apache-2.0", "GPL-3", "LGPL-2.1")]
    if not all(f.is_file() for f in files):
        pytest.skip(f"licence texts missing in {LICENCES}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(f.read_text(), add_special_tokens=False).input_ids[200 : 200 + length] for f in files[:count]]


def test_without_a_profile_the_plugin_changes_nothing(model_dir):
    stock = result_of(generate(model_dir, PROMPTS, 32, plugins=False))
    plugged = result_of(generate(model_dir, PROMPTS, 32, plugins=True))
    assert "MiniCache" in plugged["llama_class"], plugged["llama_class"]  # the plugin was loaded
    assert "MiniCache" not in stock["llama_class"], stock["llama_class"]
    assert all(len(t) == 32 for t in stock["tokens"])
    assert plugged["tokens"] == stock["tokens"]


def test_a_profile_is_served_with_the_tokens_of_the_transformers_runtime(model_dir, profile_dir):
    # float32: in bfloat16 vLLM's own CPU attention (the unmerged layers) and transformers' SDPA
    # already part ways within 15-30 greedy tokens on these prompts, with or without a profile.
    prompts = long_prompts(model_dir, 3, 600)  # 600 tokens: 448 merged at prefill, a block more at 640
    served = result_of(generate(profile_dir, prompts, 72, plugins=True, engine={**MERGED_ENGINE, "dtype": "float32"}))
    want = reference(MAIN_PYTHON, PROFILE, prompts, 72, "float32")
    same = sum(a == b for s, t in zip(served["tokens"], want["tokens"], strict=True) for a, b in zip(s, t, strict=True))
    assert same / (3 * 72) >= 0.95, (served["tokens"], want["tokens"])


def test_the_profile_raises_the_kv_capacity_by_what_its_pages_save(model_dir, profile_dir):
    from minicache_vllm.models import store_layout
    from transformers import AutoConfig

    from minicache import MergeProfile
    from minicache.runtime.cache import MiniCache

    stock = result_of(generate(model_dir, PROMPTS[:1], 1, plugins=False, engine=MERGED_ENGINE))
    served = result_of(generate(profile_dir, PROMPTS[:1], 1, plugins=True, engine=MERGED_ENGINE))
    # Predicted from the pages alone: every layer's bytes per token, less what each group's store saves,
    # in a budget less the groups' exact windows (8 requests, residual_length + block_size tokens each).
    config = AutoConfig.from_pretrained(model_dir)
    profile = MergeProfile.load(profile_dir)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * heads * 2 * dim * 2
    budget, windows = 2**30, 0
    for store in MiniCache(profile, config).stores:
        k = len(store.layers)
        layout = store_layout(store, heads, dim, torch.bfloat16)
        per_token -= k * heads * 2 * dim * 2 - layout.content_bytes(64) * heads
        windows += 8 * 2 * k * heads * (store.residual_length + store.block_size) * dim * 2
    predicted = (budget - windows) / per_token / (budget / (config.num_hidden_layers * heads * 2 * dim * 2))
    measured = served["kv_cache_tokens"] / stock["kv_cache_tokens"]
    assert measured > 1.05, measured
    assert abs(measured / predicted - 1) < 0.01, (measured, predicted)


def test_engine_settings_the_merged_store_cannot_serve_are_refused(profile_dir):
    run = generate(profile_dir, PROMPTS[:1], 4, plugins=True, engine={"block_size": 64})  # prefix caching on
    assert run.returncode != 0
    assert "minicache_vllm:" in run.stdout + run.stderr
    assert "enable_prefix_caching=False" in run.stdout + run.stderr
