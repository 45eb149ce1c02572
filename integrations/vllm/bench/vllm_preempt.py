"""Greedy tokens of a vLLM engine whose KV pages are too few for its requests, so it preempts (runs in .venv-vllm).

    python integrations/vllm/bench/vllm_preempt.py MODEL_DIR BLOCKS [BLOCK_SIZE]

4 prompts of 600 licence-text tokens, 120 greedy tokens each, float32, ``max_num_seqs=8``. ``BLOCKS``:
vLLM's ``num_gpu_blocks_override`` (0: the budget's own). vLLM's v1 engine preempts by recomputation:
a preempted request is prefilled again from its first token, so a profile's stores must start it over
(a new window slot, its pages written again). Prints ``PREEMPTIONS n`` and ``RESULT {json}``; compare
the tokens of a run with few blocks to those of a run with 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model, blocks = sys.argv[1], int(sys.argv[2])
    block_size = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    tok = AutoTokenizer.from_pretrained(model)
    licences = Path("/usr/share/common-licenses")
    texts = [(licences / name).read_text() for name in ("Apache-2.0", "GPL-3", "LGPL-2.1", "MPL-2.0")]
    prompts = [{"prompt_token_ids": tok(t, add_special_tokens=False).input_ids[200:800]} for t in texts]
    override = {"num_gpu_blocks_override": blocks} if blocks else {}
    llm = LLM(model=model, max_model_len=1024, seed=0, enforce_eager=True, dtype="float32", disable_log_stats=False,
              enable_prefix_caching=False, block_size=block_size, max_num_seqs=8, **override)
    out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True), use_tqdm=False)
    preemptions = [m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"]
    print(f"PREEMPTIONS {preemptions[0] if preemptions else 'unknown'}")
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in out],
                                  "kv_cache_tokens": llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens}))


if __name__ == "__main__":
    main()
