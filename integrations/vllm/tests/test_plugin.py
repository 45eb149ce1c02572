"""The plugin under vLLM's CPU build: stock behaviour without a profile, the profile's merged storage with one.

Each test starts vLLM engines in fresh processes (about a minute each on 2 cores).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import MAIN_PYTHON, PROFILE
from vllm_runs import MERGED_ENGINE, generate, reference, reference_scores, result_of

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


def predicted_capacity(model_dir: Path, profile: Path, dtype, page_tokens: int, requests: int,
                       budget: int = 2**30) -> float:
    """KV tokens a budget holds by our arithmetic: stock layers' bytes per token, plus every store's pages,
    in the budget less the stores' exact windows of ``requests`` requests."""
    from minicache_vllm.models import plan_stores
    from transformers import AutoConfig

    from minicache import MergeProfile
    from minicache.runtime.cache import MiniCache

    config = AutoConfig.from_pretrained(model_dir)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    item = torch.empty((), dtype=dtype).element_size()
    plans = plan_stores(MiniCache(MergeProfile.load(profile), config), heads, dim, dtype)
    stock_layers = config.num_hidden_layers - sum(len(p.layers) for p in plans)
    per_token = stock_layers * heads * 2 * dim * item + sum(p.page_bytes_per_token(page_tokens) for p in plans)
    return (budget - sum(p.window_bytes(requests) for p in plans)) / per_token


def test_the_profile_raises_the_kv_capacity_by_what_its_pages_save(model_dir, profile_dir):
    stock = result_of(generate(model_dir, PROMPTS[:1], 1, plugins=False, engine=MERGED_ENGINE))
    served = result_of(generate(profile_dir, PROMPTS[:1], 1, plugins=True, engine=MERGED_ENGINE))
    # Predicted from the pages alone, in a budget less the groups' exact windows (8 requests).
    predicted = predicted_capacity(profile_dir, PROFILE, torch.bfloat16, 64, 8)
    assert abs(stock["kv_cache_tokens"] / (2**30 / (30 * 3 * 2 * 64 * 2)) - 1) < 0.01  # 30 layers, 3 heads, bf16
    measured = served["kv_cache_tokens"] / stock["kv_cache_tokens"]
    assert measured > 1.05, measured
    assert abs(served["kv_cache_tokens"] / predicted - 1) < 0.01, (served["kv_cache_tokens"], predicted)


def test_a_quantized_profile_is_served_packed_with_the_scores_of_the_transformers_runtime(
        model_dir, quantized_dir, quantized_profile):
    # Teacher-forced, not greedy. vLLM's CPU float32 and transformers already differ by 0.0085 nats per
    # token on average in an exact prefix, with or without a profile, and with 4-bit storage the greedy
    # path of these prompts has near-ties that such noise flips (transformers against itself with q/k/v
    # weights scaled by 1 + 1e-4 noise: 165 of 216 greedy tokens equal).
    # 576 prefix tokens in one step: 448 packed in unmerged layers, 448 merged in groups (384 paged, a
    # 64-token tail merged again each step); the next 192 tokens then read all of it.
    prompts = long_prompts(model_dir, 2, 768)
    engine = {**MERGED_ENGINE, "block_size": 128, "dtype": "float32", "max_num_batched_tokens": 576}
    served = result_of(generate(quantized_dir, prompts, 1, plugins=True, engine=engine, prompt_logprobs=True))
    got = torch.tensor(served["prompt_logprobs"])
    packed = torch.tensor(reference_scores(MAIN_PYTHON, quantized_profile, prompts, 576)["prompt_logprobs"])
    plain = torch.tensor(reference_scores(MAIN_PYTHON, PROFILE, prompts, 576)["prompt_logprobs"])
    assert got.shape == packed.shape == (2, 767)
    floor = (got - packed)[:, :575].abs().mean()  # the exact prefix: two implementations' float noise
    after = (got - packed)[:, 575:].abs().mean()  # the tokens that read packed KV
    assert after < 2.5 * floor, (after, floor)
    # ... and the served scores are those of the packed runtime, not of the same profile unpacked
    assert after < 0.5 * (got - plain)[:, 575:].abs().mean(), (after, (got - plain)[:, 575:].abs().mean())
    assert abs(math.exp(packed[:, 575:].mean() - got[:, 575:].mean()) - 1) < 0.005  # perplexity within 0.5 %
    # Every layer's pages are packed: the capacity is what the packed bytes predict (float32: 4-bit codes
    # take an eighth), not the stock 23k tokens a GiB holds.
    predicted = predicted_capacity(quantized_dir, quantized_profile, torch.float32, 128, 8)
    assert abs(served["kv_cache_tokens"] / predicted - 1) < 0.01, (served["kv_cache_tokens"], predicted)
    assert served["kv_cache_tokens"] > 5 * 2**30 / (30 * 3 * 2 * 64 * 4)


def test_engine_settings_the_merged_store_cannot_serve_are_refused(profile_dir):
    run = generate(profile_dir, PROMPTS[:1], 4, plugins=True, engine={"block_size": 64})  # prefix caching on
    assert run.returncode != 0
    assert "minicache_vllm:" in run.stdout + run.stderr
    assert "enable_prefix_caching=False" in run.stdout + run.stderr


def test_windows_that_leave_no_kv_budget_are_refused_with_what_to_lower(quantized_dir):
    # 400 requests: every packed layer's window pool (400 x 256 tokens, 8-bit) outgrows 1 GiB with the groups'.
    run = generate(quantized_dir, PROMPTS[:1], 4, plugins=True,
                   engine={"enable_prefix_caching": False, "block_size": 128, "max_num_seqs": 400})
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "recent windows of max_num_seqs=400 requests" in out and "lower max_num_seqs" in out, out[-3000:]


@pytest.mark.parametrize("window_bits", [None, 8, 6])
def test_a_plans_window_bytes_are_what_the_engine_allocates(window_bits):
    """vLLM's KV budget is predicted with ``StorePlan.window_bytes``; ``install`` takes the pools and sinks it
    allocates off that budget: the two must agree at every window width (6-bit codes: 3/4 of a byte a channel).
    No engine: the plan, pool and layer that ``install`` builds, on a small layer."""
    from minicache_vllm.layout import quantized_layer_layout
    from minicache_vllm.models import StorePlan
    from minicache_vllm.quantized import PagedQuantizedLayer
    from minicache_vllm.windows import WindowPool

    from minicache.profile import Quantization
    from minicache.runtime.layers import QuantizedLayer
    from minicache.runtime.rope import RopeAngles

    heads, dim, requests = 2, 16, 3
    spec = Quantization(bits=3, scheme="rotated", group_size=16, residual_length=8, sink_tokens=2,
                        pre_rope_keys=True, window_bits=window_bits)
    template = QuantizedLayer(spec, rope=RopeAngles(1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)))
    layout = quantized_layer_layout(template, heads, dim, torch.bfloat16)
    plan = StorePlan((0,), template, layout, spec.residual_length + layout.unit_tokens, spec.sink_tokens, window_bits)
    pool = WindowPool(requests, 1, heads, dim, plan.window_tokens, torch.bfloat16, bits=window_bits)
    layer = PagedQuantizedLayer(template, layout, pool, 32, lambda: None)
    assert plan.window_bytes(requests) == layer.nbytes
    per_channel = {None: 2, 8: 1, 6: 0.75}[window_bits]  # bfloat16 exact windows
    assert pool.data.numel() * pool.data.element_size() == requests * 2 * heads * plan.window_tokens * dim * per_channel
