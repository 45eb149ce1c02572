"""Running vLLM engines and minicache's transformers runtime in fresh processes, for the plugin's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GENERATE = r'''
import json, sys
from vllm import LLM, ModelRegistry, SamplingParams
prompts, max_tokens, engine = json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
scored = len(sys.argv) > 5 and sys.argv[5] == "prompt_logprobs"
engine = {"dtype": "bfloat16", **engine}
llm = LLM(model=sys.argv[1], max_model_len=1024, seed=0, enforce_eager=True, **engine)
params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,  # greedy, full length
                        prompt_logprobs=0 if scored else None)
inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
outputs = [llm.generate([i], params)[0] for i in inputs] if scored else llm.generate(inputs, params)
arch = ModelRegistry.models["LlamaForCausalLM"]
name = getattr(arch, "class_name", None) or getattr(arch, "__name__", str(arch))
cache = llm.llm_engine.vllm_config.cache_config
result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "llama_class": name,
          "kv_cache_tokens": cache.kv_cache_size_tokens}
if scored:  # log-probability of each prompt token given the ones before it, from the second on
    result["prompt_logprobs"] = [[e[t].logprob for e, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                                 for o in outputs]
print("RESULT " + json.dumps(result), flush=True)
llm.llm_engine.engine_core.shutdown()  # stop the engine core before the interpreter tears down
'''

#: What an engine serving a merged profile needs (the plugin refuses prefix caching; pages are merge blocks).
MERGED_ENGINE = {"enable_prefix_caching": False, "block_size": 64, "max_num_seqs": 8}

REFERENCE = r'''
import json, sys, torch
from minicache import MergeProfile, MiniCache
from minicache.models import load_model
model, _ = load_model("smollm2-135m", dtype=getattr(torch, sys.argv[4]))
profile = MergeProfile.load(sys.argv[1])
out = []
for ids in json.loads(sys.argv[2]):
    x = torch.tensor([ids])
    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=int(sys.argv[3]),
                       min_new_tokens=int(sys.argv[3]), do_sample=False, past_key_values=MiniCache(profile, model))
    out.append(y[0, len(ids):].tolist())
print("RESULT " + json.dumps({"tokens": out}))
'''


def generate(model: Path, prompts: list, max_tokens: int, *, plugins: bool, engine: dict | None = None,
             cache_gib: int = 1, prompt_logprobs: bool = False) -> subprocess.CompletedProcess:
    """Run one vLLM engine in a fresh process (``plugins=False``: ``VLLM_PLUGINS=""``, stock vLLM).

    ``prompts``: strings or token-id lists; ``engine``: more ``LLM(...)`` arguments; ``prompt_logprobs``:
    one request at a time, and the result gets each prompt token's log-probability.
    """
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cache_gib), "TOKENIZERS_PARALLELISM": "false"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    extra = ["prompt_logprobs"] if prompt_logprobs else []
    return subprocess.run([sys.executable, "-c", GENERATE, str(model), json.dumps(prompts), str(max_tokens),
                           json.dumps(engine or {}), *extra], capture_output=True, text=True, env=env, timeout=900)


REFERENCE_SCORES = r'''
import json, sys, torch
from minicache import MergeProfile, MiniCache
from minicache.models import load_model
model, _ = load_model("smollm2-135m", dtype=getattr(torch, sys.argv[4]))
profile = MergeProfile.load(sys.argv[1])
out = []
for ids in json.loads(sys.argv[2]):
    x, cut = torch.tensor([ids]), int(sys.argv[3])
    cache = MiniCache(profile, model)
    with torch.no_grad():  # the prefix in one step, the rest in the next: the schedule vLLM is given
        first = model(x[:, :cut], past_key_values=cache, use_cache=True).logits
        rest = model(x[:, cut:], past_key_values=cache, use_cache=True).logits
    logp = torch.cat([first, rest], dim=1)[0, :-1].float().log_softmax(-1)
    out.append(logp.gather(1, x[0, 1:, None])[:, 0].tolist())
print("RESULT " + json.dumps({"prompt_logprobs": out}))
'''


def reference_scores(main_python: Path, profile: Path, prompts: list[list[int]], prefix: int,
                     dtype: str = "float32") -> dict:
    """Each prompt token's log-probability under ``MiniCache`` in transformers, the first ``prefix``
    tokens read in one step and the rest in the next."""
    run = subprocess.run([str(main_python), "-c", REFERENCE_SCORES, str(profile), json.dumps(prompts), str(prefix),
                          dtype], capture_output=True, text=True, timeout=900)
    return result_of(run)


def reference(main_python: Path, profile: Path, prompts: list[list[int]], max_tokens: int,
              dtype: str = "bfloat16") -> dict:
    """Greedy tokens of minicache's transformers runtime (``MiniCache``) in minicache's own venv."""
    run = subprocess.run([str(main_python), "-c", REFERENCE, str(profile), json.dumps(prompts), str(max_tokens), dtype],
                         capture_output=True, text=True, timeout=900)
    return result_of(run)


def result_of(run: subprocess.CompletedProcess) -> dict:
    """The ``RESULT`` line of a run.

    A run killed by a signal *after* printing it still counts: vLLM 0.32's CPU engine now and then
    aborts in interpreter teardown ("terminate called without an active exception", seen once in CI
    after both requests had been answered), when everything it was asked has been printed whole.
    """
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines and (run.returncode == 0 or (run.returncode < 0 and "terminate called" in run.stderr)), (
        f"run failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))
