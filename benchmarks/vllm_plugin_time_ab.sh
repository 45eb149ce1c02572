#!/usr/bin/env bash
# The plugin's own time in vLLM's engine, an older commit against the working tree, engine by engine alternating
# (how benchmarks/results/vllm-cpu/batched-pages.txt was made, BASE=495adb2): this VM's tokens/s swing more
# between identical runs than a change to the plugin moves them, the time summed inside MergedAttention.forward
# (integrations/vllm/bench/vllm_generate.py --time-plugin) does not.
#
#   bash benchmarks/vllm_plugin_time_ab.sh BASE [ROUNDS]     # ~15 minutes for 2 rounds on 2 idle cores
#
# 10 prompts of 600 unseen-text tokens, 64 greedy tokens each, block size 128, in-process engine; engines:
# bf16 shipped, bf16 shipped + 4-bit KIVI (4 sinks, pre-RoPE keys), float32 shipped. The base commit's code
# runs from a git worktree by PYTHONPATH (vllm_generate.py from the working tree for both).
set -euo pipefail
BASE=${1:?usage: vllm_plugin_time_ab.sh BASE [ROUNDS]}
ROUNDS=${2:-2}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
HERE=$(pwd)
TREE="$WORK/base"
git worktree add -q --detach "$TREE" "$BASE"
trap 'git -C "$HERE" worktree remove --force "$TREE"; rm -rf "$WORK"' EXIT
"$PY" benchmarks/vllm_decode_inputs.py "$WORK"
for spec in "bfloat16 shipped profiles/smollm2-135m-instruct" "bfloat16 shipped-4bit $WORK/profile-shipped-4bit" \
            "float32 shipped profiles/smollm2-135m-instruct"; do
  read -r dtype name profile <<<"$spec"
  "$PY" -m minicache.convert --model smollm2-135m --dtype "$dtype" --out "$WORK/$dtype-$name" --profile "$profile" > /dev/null 2>&1
done
machine_line
for round in $(seq "$ROUNDS"); do
  for engine in bfloat16-shipped bfloat16-shipped-4bit float32-shipped; do
    for tree in "$TREE" "$HERE"; do
      label=new; [[ $tree == "$TREE" ]] && label="base ($BASE)"
      PYTHONPATH=$tree:$tree/integrations/vllm VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false \
        VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python integrations/vllm/bench/vllm_generate.py \
        "$WORK/$engine" "$WORK/prompts.json" "$WORK/out.json" --max-tokens 64 --block-size 128 \
        --max-num-batched-tokens 8192 --dtype "${engine%%-*}" --time-plugin > "$WORK/run.log" 2>&1 \
        || { echo "round $round $label $engine failed:"; tail -5 "$WORK/run.log"; continue; }
      "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); g, p = r['generate_s'], r['plugin_s']
print(f'round {sys.argv[2]} {sys.argv[3]:<16} {sys.argv[4]:<22}: {r[\"generated_tokens\"] / g:5.1f} tokens/s, '
      f'generate {g:5.1f} s, plugin attention {p:5.1f} s ({p / g:4.0%}, {r[\"plugin_calls\"]} calls)')" \
        "$WORK/out.json" "$round" "$label" "$engine"
    done
  done
done
