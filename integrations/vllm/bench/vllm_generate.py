"""Run one vLLM engine on token-id prompts and print its results as JSON (runs in .venv-vllm).

    python integrations/vllm/bench/vllm_generate.py MODEL_DIR PROMPTS.json OUT.json [--max-tokens 64]
        [--prompt-logprobs] [--one-at-a-time] [--max-num-batched-tokens N] [--max-num-seqs N] [--dtype D]
        [--block-size 64] [--time-plugin]

PROMPTS.json: a list of token-id lists. OUT.json gets the generated token ids, the prompt tokens'
log-probabilities (with --prompt-logprobs: of each prompt token given the ones before it, from the
second on), vLLM's reported KV cache capacity in tokens and maximum concurrency, and timings.
``--time-plugin`` (in-process engine only: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) also sums the wall time spent
in the plugin's attention (``MergedAttention.forward``: its stores and their attention) as ``plugin_s``, a
figure that does not swing with the rest of the engine from run to run.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-logprobs", action="store_true")
    parser.add_argument("--one-at-a-time", action="store_true", help="one request per generate call")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=64, help="a multiple of the profile's page unit")
    parser.add_argument("--time-plugin", action="store_true",
                        help="sum the time spent in the plugin's attention (in-process engine only)")
    args = parser.parse_args()
    plugin = _time_plugin() if args.time_plugin else None

    from vllm import LLM, SamplingParams

    began = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0, enforce_eager=True,
              enable_prefix_caching=False, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    started = time.perf_counter() - began
    with open(args.prompts) as f:
        prompts = [{"prompt_token_ids": ids} for ids in json.load(f)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            prompt_logprobs=0 if args.prompt_logprobs else None)
    began = time.perf_counter()
    if args.one_at_a_time:
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "kv_cache_tokens": cache.kv_cache_size_tokens,
        "max_concurrency": cache.kv_cache_max_concurrency,
        "startup_s": started,
        "generate_s": seconds,
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }
    if plugin is not None:
        result["plugin_s"] = plugin["seconds"]
        result["plugin_calls"] = plugin["calls"]
    if args.prompt_logprobs:
        result["prompt_logprobs"] = [
            [entry[tok].logprob for entry, tok in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
            for o in outputs
        ]
    with open(args.out, "w") as f:
        json.dump(result, f)


def _time_plugin() -> dict[str, float]:
    """Wrap ``MergedAttention.forward`` to sum its wall time (what the returned dict holds, as it runs)."""
    from minicache_vllm.merged import MergedAttention

    spent = {"seconds": 0.0, "calls": 0}
    forward = MergedAttention.forward

    def timed(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - began
            spent["calls"] += 1

    MergedAttention.forward = timed
    return spent


if __name__ == "__main__":
    main()
