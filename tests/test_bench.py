"""`minicache-bench` logic on a tiny random Llama: schema, medians and ratios, KV budget, plot, CLI errors."""

import json
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache import MergeProfile
from minicache.evaluate import bench, bench_cli
from minicache.evaluate.bench import (
    FULL,
    BenchSettings,
    CacheSpec,
    PromptSource,
    full_cache,
    max_batch_within,
    ratios,
    run_benchmark,
    summarize,
    timed_greedy_decode,
)
from tests.tiny_configs import tiny_config

# Small merge windows so that 16-32 token prompts already merge (the defaults keep 128 tokens exact).
SMALL = {"residual_length": 8, "block_size": 4}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=6)).eval()


@pytest.fixture(scope="module")
def paper(tiny):
    return CacheSpec("paper", MergeProfile.preset("paper", tiny.config, **SMALL), "preset:paper")


@pytest.fixture(scope="module")
def run(tiny, paper):
    # One thread: the logic is under test, not the speed, and oversubscribed OpenMP threads on a
    # busy 2-core machine make tiny matmuls a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = BenchSettings((16, 32), (1, 2), decode_tokens=3, repeats=3, warmup=1, kv_budget_bytes=64 * 1024)
        prompts = PromptSource.random(tiny.config.vocab_size, 64, seed=0)
        return run_benchmark(tiny, [paper], settings, prompts)
    finally:
        torch.set_num_threads(threads)


def test_result_schema(run):
    assert [c["name"] for c in run["caches"]] == [FULL, "paper"]  # the full cache is added first
    assert run["caches"][1]["merged_groups"] == [[3, 4]]
    assert "kv_bytes" in run["memory_kind"] and "no peak" in run["memory_kind"]  # CPU: says what it is
    assert len(run["results"]) == 2 * 2 * 2
    for row in run["results"]:
        assert len(row["prefill_s"]) == len(row["decode_s"]) == 3
        assert row["prefill_s_median"] == statistics.median(row["prefill_s"])
        assert row["decode_s_median"] == statistics.median(row["decode_s"])
        b, t = row["batch_size"], row["context_length"]
        assert row["prefill_tokens_per_s"] == pytest.approx(b * t / row["prefill_s_median"])
        assert row["decode_tokens_per_s"] == pytest.approx(b * 3 / row["decode_s_median"])
        assert "peak_allocated_bytes_median" not in row  # no fake peak on CPU
    json.dumps(run)  # serialisable as is


def test_full_cache_bytes_are_exact(run, tiny):
    c = tiny.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4  # K and V, fp32
    for row in run["results"]:
        if row["cache"] == FULL:
            b, t = row["batch_size"], row["context_length"]
            assert row["kv_bytes_prefill"] == row["kv_bytes_full_prefill"] == b * t * per_token
            assert row["kv_bytes_end"] == b * (t + 3) * per_token


def test_minicache_stores_less_and_ratios_come_from_the_same_run(run):
    rows = {(r["cache"], r["context_length"], r["batch_size"]): r for r in run["results"]}
    assert len(run["ratios"]) == 4
    for entry in run["ratios"]:
        key = (entry["context_length"], entry["batch_size"])
        mine, full = rows[("paper", *key)], rows[(FULL, *key)]
        assert mine["kv_bytes_full_prefill"] == full["kv_bytes_prefill"]
        assert mine["kv_bytes_prefill"] < full["kv_bytes_prefill"]
        assert entry["kv_bytes_prefill"] == mine["kv_bytes_prefill"] / full["kv_bytes_prefill"]
        assert entry["prefill_tokens_per_s"] == mine["prefill_tokens_per_s"] / full["prefill_tokens_per_s"]
        assert entry["decode_tokens_per_s"] == mine["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        paired = statistics.median(f / m for f, m in zip(full["prefill_s"], mine["prefill_s"], strict=True))
        assert entry["prefill_tokens_per_s_paired"] == paired


def test_budget_is_computed_from_measured_bytes_and_verified(run):
    budget = run["budget"]
    assert budget["kv_budget_bytes"] == 64 * 1024
    assert len(budget["entries"]) == 2 * 2
    by = {(e["cache"], e["context_length"]): e for e in budget["entries"]}
    for e in budget["entries"]:
        assert e["verification_ok"]
        assert e["max_batch"] == max_batch_within(64 * 1024, e["bytes_per_sequence"], e["fixed_bytes"])
        at, above = e["verified"].get("at_max_batch"), e["verified"]["at_max_batch_plus_1"]
        assert above["kv_bytes"] > 64 * 1024 and not above["fits"]
        if e["max_batch"]:
            assert at["kv_bytes"] <= 64 * 1024 and at["fits"]
    for t in (16, 32):
        full, paper = by[(FULL, t)], by[("paper", t)]
        assert full["fixed_bytes"] == 0
        assert paper["bytes_per_sequence"] < full["bytes_per_sequence"]
        assert paper["max_batch"] >= full["max_batch"]
        assert paper["max_batch_ratio"] == paper["max_batch"] / full["max_batch"]


def test_replayed_kv_matches_a_real_prefill(tiny, paper):
    """The budget's replay through cache.update stores exactly what a model prefill stores."""
    prompt = PromptSource.random(tiny.config.vocab_size, 64, seed=1).batch(2, 32)
    with torch.inference_mode():
        cache = paper.build(tiny)
        tiny(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=cache)
        real = cache.memory_report()["kv_bytes"]
        replayed = sum(
            bench.replayed_bytes(paper, tiny.config, bench.prompt_kv(tiny, prompt[i : i + 1]), 1) for i in range(2)
        )
    assert replayed == real


@pytest.mark.parametrize(
    ("budget", "per_sequence", "fixed", "expected"),
    [(100, 10, 0, 10), (100, 10, 5, 9), (99.9, 10, 0, 9), (5, 10, 0, 0), (100, 30, 15, 2), (15, 30, 15, 0),
     (10, 30, 20, 0), (256 * 2**20, 94_371_840, 0, 2)],
)
def test_max_batch_within_known_numbers(budget, per_sequence, fixed, expected):
    assert max_batch_within(budget, per_sequence, fixed) == expected


def test_max_batch_within_rejects_nonpositive_bytes():
    with pytest.raises(ValueError, match="bytes_per_sequence"):
        max_batch_within(100, 0)


def test_summarize_and_ratios_on_known_numbers():
    samples = [
        {"prefill_s": s, "decode_s": d, "kv_bytes_prefill": 50, "kv_bytes_full_prefill": 100,
         "kv_bytes_end": 60, "kv_bytes_full_end": 120}
        for s, d in ((2.0, 1.0), (1.0, 4.0), (4.0, 2.0))
    ]
    mine = summarize(CacheSpec("m", MergeProfile(), "x"), 100, 2, 10, samples)
    assert (mine["prefill_s_median"], mine["decode_s_median"]) == (2.0, 2.0)
    assert (mine["prefill_tokens_per_s"], mine["decode_tokens_per_s"]) == (100.0, 10.0)
    full_samples = [dict(s, kv_bytes_prefill=100, kv_bytes_end=120, prefill_s=1.0, decode_s=4.0) for s in samples]
    full = summarize(full_cache(), 100, 2, 10, full_samples)
    (entry,) = ratios([full, mine])
    assert entry["prefill_tokens_per_s"] == pytest.approx(0.5)  # 100 vs 200 tokens/s
    assert entry["decode_tokens_per_s"] == pytest.approx(2.0)  # 10 vs 5 tokens/s
    assert entry["kv_bytes_prefill"] == 0.5 and entry["kv_bytes_end"] == 0.5
    # Paired: full 1.0 s vs (2, 1, 4) s per repeat -> prefill ratios (0.5, 1, 0.25), median 0.5;
    # decode 4.0 s vs (1, 4, 2) s -> (4, 1, 2), median 2.
    assert entry["prefill_tokens_per_s_paired"] == 0.5 and entry["decode_tokens_per_s_paired"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"context_lengths": ()}, "context_lengths"), ({"batch_sizes": (0,)}, "batch_sizes"),
     ({"batch_sizes": (2, 2)}, "duplicates"), ({"repeats": 0}, "repeats"), ({"decode_tokens": -1}, "decode"),
     ({"kv_budget_bytes": 0}, "kv_budget")],
)
def test_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**{"context_lengths": (8,), "batch_sizes": (1,), **kwargs})


def test_cache_spec_validation():
    with pytest.raises(ValueError, match="full cache"):
        CacheSpec("full", MergeProfile(), "x")
    with pytest.raises(ValueError, match="full cache"):
        CacheSpec("paper", None, "x")
    with pytest.raises(ValueError, match="word"):
        CacheSpec("two words", MergeProfile(), "x")


def test_prompt_source_windows():
    source = PromptSource(torch.arange(10), "0..9")
    assert source.batch(2, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert source.batch(3, 4)[2].tolist() == [1, 2, 3, 4]  # wraps, still a contiguous window
    with pytest.raises(ValueError, match="fewer than one context"):
        source.batch(1, 11)


def test_plot_and_table(run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.save_plot(run, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = bench.format_table(run)
    assert table.count("| paper |") == 4 + 2 and "Largest batch" in table


def _cli(tmp_path, *extra):
    return [
        "--model-shape", "tiny", "--context-lengths", "16", "--batch-sizes", "1", "--decode-tokens", "2",
        "--repeats", "1", "--warmup", "0", "--kv-budget-mib", "0.0625", "--threads", "1", "--quiet", *extra,
    ]


def test_cli_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    profile = tmp_path / "small.yaml"
    from minicache.models import random_model

    MergeProfile.preset("paper", random_model("tiny").config, **SMALL).save(profile)
    out, png = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    threads = torch.get_num_threads()
    try:
        code = bench_cli.main(_cli(tmp_path, "--preset", "paper", "--profile", str(profile), "--json-out", str(out),
                               "--plot-out", str(png), "--note", "test run"))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA
    assert data["command"].startswith("minicache-bench --model-shape tiny")
    assert data["model"]["random_weights"] and data["model"]["name_or_path"] == "random:tiny"
    assert data["machine"]["note"] == "test run" and data["machine"]["nproc"] >= 1
    assert data["machine"]["versions"]["torch"]
    assert [c["name"] for c in data["caches"]] == [FULL, "paper", "small"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| small | 16 | 1 |" in capsys.readouterr().out
    # Outputs are not overwritten without --force.
    assert bench_cli.main(_cli(tmp_path, "--preset", "paper", "--json-out", str(out))) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "at least one MiniCache variant"), (["--preset", "paper", "--repeats", "0"], "--repeats"),
     (["--preset", "paper", "--decode-tokens", "-1"], "--decode-tokens"),
     (["--preset", "paper", "--kv-budget-mib", "-1"], "--kv-budget-mib"),
     (["--preset", "paper", "--threads", "0"], "--threads"),
     (["--preset", "paper", "--context-lengths", "8192"], "max_position_embeddings"),
     (["--preset", "paper", "--data", "/nonexistent/text.txt"], "nonexistent"),
     (["--profile", "/nonexistent/profile.yaml"], "nonexistent")],
)
def test_cli_errors(tmp_path, capsys, args, message):
    assert bench_cli.main(_cli(tmp_path, *args)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["--context-lengths", "a,b"], ["--context-lengths", "0"], ["--batch-sizes", "2,2"],
     ["--model", "x", "--model-shape", "tiny"], ["--model-shape", "nope"], ["--preset", "nope"],
     ["--device", "tpu"]],
)
def test_cli_rejects_bad_flags(args, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--preset", "paper", *args])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_kv_bits_adds_quantized_copies_and_records_the_kernels(tmp_path, capsys):
    out = tmp_path / "bench.json"
    paper = tmp_path / "paper.yaml"
    from minicache.models import random_model

    MergeProfile.preset("paper", random_model("tiny").config, **SMALL).save(paper)
    code = bench_cli.main(_cli(tmp_path, "--profile", str(paper), "--preset", "none", "--kv-bits", "4",
                           "--kv-group-size", "4", "--kv-residual-length", "4", "--context-lengths", "24",
                           "--json-out", str(out)))
    assert code == 0
    data = json.loads(out.read_text())
    names = [c["name"] for c in data["caches"]]
    assert names == [FULL, "none", "paper", "none-4bit", "paper-4bit"]
    held = {r["cache"]: r["kv_bytes_prefill"] for r in data["results"]}
    # Measured bytes: packing stores less than the same layout unpacked; "none" is the full cache's layout.
    assert held["none"] == held[FULL]
    assert held["none-4bit"] < held["none"] and held["paper-4bit"] < held["paper"]
    # On CPU "auto" keeps the torch path, and says why.
    assert data["kernels"]["enabled"] is False and data["kernels"]["why_not"]


def test_cli_kernels_on_fails_clearly_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is available")
    assert bench_cli.main(_cli(tmp_path, "--preset", "paper", "--kernels", "on")) == 2
    assert "--kernels on:" in capsys.readouterr().err


def test_cli_kernels_torch_runs_the_blockwise_path(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_cli.main(_cli(tmp_path, "--preset", "paper", "--kernels", "torch", "--json-out", str(out))) == 0
    data = json.loads(out.read_text())
    assert data["kernels"] == {"enabled": True, "mode": "torch", "why_not": None}


def test_timed_greedy_decode_gives_generate_s_tokens_and_one_time_per_step(tiny, paper):
    prompt = PromptSource.random(tiny.config.vocab_size, 64, seed=2).batch(2, 40)
    with torch.inference_mode():
        want = tiny.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, pad_token_id=0)[:, 40:]
    seconds, got = timed_greedy_decode(tiny, None, prompt, 5)  # None: the full cache
    assert torch.equal(got, want)
    assert len(seconds) == 5 and all(s > 0 for s in seconds)
    cache = paper.build(tiny)
    seconds, _ = timed_greedy_decode(tiny, cache, prompt, 3)
    assert len(seconds) == 3 and cache.get_seq_length() == 40 + 3
