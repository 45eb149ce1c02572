"""kvpress presses scored beside minicache (issue 20): the adapter, the eviction-aware scoring, the bytes."""

from __future__ import annotations

import pytest
import torch
import transformers

from minicache.evaluate.compare import MethodSpec, compare_quality, parse_methods
from minicache.evaluate.peers import PressSpec, kvpress_version, pressed_prefill
from minicache.evaluate.quality import evaluate_profile
from tests.tiny_configs import tiny_config

pytest.importorskip("kvpress")


def tiny_model(arch: str = "llama", **overrides):
    torch.manual_seed(0)
    config = tiny_config(arch, attn_implementation="eager", **overrides)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def windows(count: int = 2, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (count, length), generator=torch.Generator().manual_seed(seed))


def test_press_spec_parses_and_refuses():
    assert PressSpec.parse("snapkv@0.25") == PressSpec("snapkv", 0.25)
    assert PressSpec.parse("SnapKVPress@0.5").class_name == "SnapKVPress"
    for bad in ("snapkv", "snapkv@", "snapkv@half", "nosuch@0.5", "knorm@1.0", "knorm@-0.1"):
        with pytest.raises(ValueError):
            PressSpec.parse(bad)


def test_method_spec_knows_kvpress_methods():
    spec = MethodSpec.parse("kvpress:knorm@0.5")
    assert (spec.kind, spec.press) == ("peer", PressSpec("knorm", 0.5))
    assert spec.quantized == {} and spec.prefill_context() is not None
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("kvpress:knorm@0.5,kvpress:knorm@0.5")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_press_keeps_the_share_it_promises_in_every_layer(arch):
    model = tiny_model(arch, **({"sliding_window": None} if arch == "mistral" else {}))
    cache = transformers.DynamicCache(config=model.config)
    with torch.inference_mode(), pressed_prefill(PressSpec("snapkv", 0.25).build(), model):
        model(input_ids=windows(length=80), cache=cache)
    assert {layer.keys.shape[-2] for layer in cache.layers} == {60}
    # outside the context the hooks are gone: the next tokens are appended, none evicted
    with torch.inference_mode():
        model(input_ids=windows(length=4), cache=cache, position_ids=torch.arange(80, 84).expand(2, -1))
    assert {layer.keys.shape[-2] for layer in cache.layers} == {64}


def test_knorm_drops_the_keys_of_largest_norm():
    model = tiny_model()
    ids = windows(count=1, length=32)
    full = transformers.DynamicCache(config=model.config)
    pressed = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, cache=full)
        with pressed_prefill(PressSpec("knorm", 0.5).build(), model):
            model(input_ids=ids, cache=pressed)
    keys = full.layers[1].keys[0]  # [kv_heads, 32, head_dim]
    for head in range(keys.shape[0]):
        kept = keys[head][keys[head].norm(dim=-1).argsort()[:16]]  # kvpress keeps them in score order
        torch.testing.assert_close(pressed.layers[1].keys[0, head], kept)


def test_scoring_after_eviction_matches_a_masked_full_forward():
    """StreamingLLM keeps 4 sinks and the most recent tokens. Scoring the continuation through the
    evicted cache must equal one forward of the whole window whose continuation rows cannot see the
    evicted prefix tokens: RoPE at true positions, causal among the continuation."""
    model = tiny_model()
    batch, prefix, length = 2, 32, 48
    ids = windows(count=batch, length=length)
    spec = MethodSpec.parse("kvpress:streaming@0.5")
    profile, factory = spec.build(model.config)
    result = evaluate_profile(model, ids, prefix, profile, cache_factory=factory,
                              prefill_context=spec.prefill_context(), chunk_size=5)
    assert result.compression_ratio == pytest.approx(2.0)

    evicted = torch.zeros(length, dtype=torch.bool)
    evicted[4 : 4 + 16] = True  # 32 - int(32 * 0.5) = 16 pruned after the 4 sinks
    allowed = torch.ones(length, length).tril().bool()
    allowed[prefix:, evicted] = False
    mask = torch.zeros(batch, 1, length, length).masked_fill(~allowed, float("-inf"))
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits[:, prefix - 1 : -1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, prefix:, None]).squeeze(-1)
    reference_ppl = torch.exp(nll.double().mean()).item()
    assert result.ppl == pytest.approx(reference_ppl, rel=1e-5)
    assert result.kl_mean > 1e-4  # it did evict something that mattered


def test_compare_rows_record_the_press_and_kvpress_version():
    model = tiny_model()
    rows = compare_quality(model, windows(count=2, length=40), 32, parse_methods("full,kvpress:tova@0.25"))
    row = rows[1]
    assert row["kvpress_version"] == kvpress_version() is not None
    assert "TOVAPress(compression_ratio=0.25)" in row["describe"]
    assert row["kv_bytes"] * 4 == row["kv_bytes_full"] * 3  # 24 of 32 prefix tokens held


def test_a_cache_that_evicts_unevenly_across_layers_is_refused():
    from minicache.evaluate.quality import continuation_kwargs

    cache = transformers.DynamicCache(config=tiny_config("llama"))
    for layer, length in enumerate((6, 6, 4, 6)):
        cache.update(torch.zeros(1, 2, length, 16), torch.zeros(1, 2, length, 16), layer)
    with pytest.raises(ValueError, match="unevenly"):
        continuation_kwargs(cache, 8, torch.zeros(1, 2, dtype=torch.long))


def test_passkey_refuses_peers():
    from minicache.evaluate.compare import compare_passkey

    with pytest.raises(ValueError, match="perplexity task only"):
        compare_passkey(None, None, parse_methods("kvpress:knorm@0.5"), [64], [0.5], 1)
