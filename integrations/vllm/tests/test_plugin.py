"""The plugin under vLLM's CPU build: stock behaviour without a profile, a clear refusal with one.

Each test starts vLLM engines in fresh processes (about a minute each on 2 cores).
"""

from __future__ import annotations

from vllm_runs import generate, result_of

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is the capital of France?\nAnswer:",
]


def test_without_a_profile_the_plugin_changes_nothing(model_dir):
    stock = result_of(generate(model_dir, PROMPTS, 32, plugins=False))
    plugged = result_of(generate(model_dir, PROMPTS, 32, plugins=True))
    assert "MiniCache" in plugged["llama_class"], plugged["llama_class"]  # the plugin was loaded
    assert "MiniCache" not in stock["llama_class"], stock["llama_class"]
    assert all(len(t) == 32 for t in stock["tokens"])
    assert plugged["tokens"] == stock["tokens"]


def test_a_profile_is_refused_with_a_message(profile_dir):
    run = generate(profile_dir, PROMPTS[:1], 4, plugins=True)
    assert run.returncode != 0
    assert "minicache_vllm:" in run.stdout + run.stderr
    assert "cannot serve merged KV storage yet" in run.stdout + run.stderr
