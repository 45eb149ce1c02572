"""Running vLLM engines in fresh processes, for the plugin's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GENERATE = r'''
import json, sys
from vllm import LLM, ModelRegistry, SamplingParams
llm = LLM(model=sys.argv[1], dtype="bfloat16", max_model_len=1024, seed=0, enforce_eager=True)
params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), ignore_eos=True)  # greedy, full length
outputs = llm.generate(json.loads(sys.argv[2]), params)
arch = ModelRegistry.models["LlamaForCausalLM"]
name = getattr(arch, "class_name", None) or getattr(arch, "__name__", str(arch))
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "llama_class": name}))
'''


def generate(model: Path, prompts: list[str], max_tokens: int, *, plugins: bool) -> subprocess.CompletedProcess:
    """Run one vLLM engine in a fresh process (``plugins=False``: ``VLLM_PLUGINS=""``, stock vLLM)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    return subprocess.run([sys.executable, "-c", GENERATE, str(model), json.dumps(prompts), str(max_tokens)],
                          capture_output=True, text=True, env=env, timeout=900)


def result_of(run: subprocess.CompletedProcess) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"vLLM run failed (exit {run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))
