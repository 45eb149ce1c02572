#!/usr/bin/env bash
# Does vLLM's OpenAI-compatible server serve a minicache profile directory like the offline LLM class?
# 1. Converts SmolLM2-135M-Instruct with the shipped profile (minicache-convert, float32) and runs the
#    offline LLM on 3 prompts of 620 real-text tokens, 32 greedy tokens (bench/vllm_generate.py).
# 2. Starts the server on that directory with the engine options the plugin needs, checks its log for the
#    plugin's "merges layers" line, sends the prompts as token ids to /v1/completions (greedy, ignore_eos;
#    all at once, then one at a time) and compares the tokens with the offline LLM's.
# 3. Control: the same server without the plugin (VLLM_PLUGINS="") must give other log-probabilities.
# 4. Starts it with --enable-prefix-caching, which the plugin must refuse with its message.
# Writes benchmarks/results/vllm-cpu/serve-check.md; exit status 1 if anything differs. One vLLM engine
# at a time; about 5 minutes on 2 idle CPU cores. Needs .venv-vllm (bash scripts/setup_vllm.sh, or
# VLLM_VENV=...); serves this checkout's minicache and plugin (PYTHONPATH), whatever the venvs installed.
#
#   bash benchmarks/vllm_serve_check.sh       # HEALTH_TIMEOUT=600 for a busy machine (default 300 s)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export PYTHONPATH="$PWD:$PWD/integrations/vllm"
VENV=${VLLM_VENV:-.venv-vllm}
VPY=$VENV/bin/python
CLIENT=integrations/vllm/bench/vllm_serve_client.py
OUT=benchmarks/results/vllm-cpu
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-300}
NEW_TOKENS=32
MODEL="$WORK/smollm2-minicache"
# The engine options the plugin needs (integrations/vllm/tests/vllm_runs.py's MERGED_ENGINE), float32.
ENGINE=(--enforce-eager --block-size 64 --max-num-seqs 4 --dtype float32 --max-model-len 2048)
export VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
[[ -x $VPY ]] || { echo "$VPY is missing: run scripts/setup_vllm.sh" >&2; exit 1; }
mkdir -p "$OUT"

SERVER_PID=
stop_server() {  # the server and its engine processes: its own process group (setsid)
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 -- "-$SERVER_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap 'stop_server; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# `vllm serve` where the console script works; vllm-cpu 0.32.0's does not (it asks importlib.metadata for
# the version of "vllm", a distribution it installs as "vllm-cpu"), so then the same server as a module.
if "$VENV/bin/vllm" --version >/dev/null 2>&1; then
  SERVE=("$VENV/bin/vllm" serve "$MODEL")
else
  SERVE=("$VPY" -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi

start_server() {  # LOG, more flags: sets PORT, SERVER_PID, STARTED
  local log=$1
  shift
  PORT=$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  STARTED=$SECONDS
  setsid "${SERVE[@]}" --host 127.0.0.1 --port "$PORT" --seed 0 "${ENGINE[@]}" "$@" >"$log" 2>&1 &
  SERVER_PID=$!
}

wait_health() {  # LOG: 0 once /health answers, 1 if the server exits first
  while ((SECONDS - STARTED < HEALTH_TIMEOUT)); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    sleep 2
  done
  echo "no answer from /health after $HEALTH_TIMEOUT s; the server log ends:" >&2
  tail -30 "$1" >&2
  exit 1
}

machine_line | tee "$WORK/machine.txt"
DIRTY=
[[ -z $(git status --porcelain -- minicache integrations/vllm/minicache_vllm) ]] ||
  DIRTY=" + uncommitted changes to minicache/ or the plugin"
echo "== converting (minicache-convert --profile profiles/smollm2-135m-instruct --dtype float32)"
"$PY" -m minicache.convert --model smollm2-135m --out "$MODEL" --dtype float32 \
  --profile profiles/smollm2-135m-instruct >/dev/null
source benchmarks/unseen_text.sh && write_unseen_text "$WORK"
"$VPY" "$CLIENT" prompts "$MODEL" "$WORK/prompts.json" --count 3 --length 620 \
  --text "$WORK/code.txt" "$WORK/notes.txt" "$WORK/licences.txt"

echo "== offline LLM (vllm_generate.py)"
began=$SECONDS
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VPY" integrations/vllm/bench/vllm_generate.py "$MODEL" "$WORK/prompts.json" \
  "$WORK/offline.json" --max-tokens "$NEW_TOKENS" --dtype float32 --max-num-seqs 4 --max-model-len 2048 \
  --max-num-batched-tokens 2048 >"$WORK/offline.log" 2>&1 || { tail -30 "$WORK/offline.log" >&2; exit 1; }
OFFLINE_S=$((SECONDS - began))
echo "   $OFFLINE_S s"

echo "== server (${SERVE[*]:0:3} ... --no-enable-prefix-caching)"
start_server "$WORK/server.log" --no-enable-prefix-caching
wait_health "$WORK/server.log" || { echo "the server exited before /health answered:" >&2; tail -30 "$WORK/server.log" >&2; exit 1; }
HEALTH_S=$((SECONDS - STARTED))
echo "   /health after $HEALTH_S s"
PLUGIN_LINE=$(grep -m1 -o "minicache_vllm: .* merges layers .*" "$WORK/server.log" || true)
[[ -n $PLUGIN_LINE ]] || { echo "no 'minicache_vllm: ... merges layers' line in the server log" >&2; exit 1; }
URL="http://127.0.0.1:$PORT"
"$VPY" "$CLIENT" query "$URL" "$WORK/prompts.json" "$WORK/served-concurrent.json" --max-tokens "$NEW_TOKENS" --concurrent
"$VPY" "$CLIENT" query "$URL" "$WORK/prompts.json" "$WORK/served-sequential.json" --max-tokens "$NEW_TOKENS"
BATCHES=$(grep -c "POST /v1/completions HTTP/1.1\" 200" "$WORK/server.log" || true)
stop_server

echo "== control: the same server without the plugin (VLLM_PLUGINS=\"\": stock vLLM ignores the profile)"
export VLLM_PLUGINS=""
start_server "$WORK/stock.log" --no-enable-prefix-caching
wait_health "$WORK/stock.log" || { echo "the stock server exited before /health answered:" >&2; tail -30 "$WORK/stock.log" >&2; exit 1; }
unset VLLM_PLUGINS
echo "   /health after $((SECONDS - STARTED)) s"
STOCK_PLUGIN_LINES=$(grep -c "minicache_vllm:" "$WORK/stock.log" || true)
"$VPY" "$CLIENT" query "http://127.0.0.1:$PORT" "$WORK/prompts.json" "$WORK/stock.json" --max-tokens "$NEW_TOKENS"
stop_server

echo "== server with --enable-prefix-caching (must refuse)"
start_server "$WORK/refused.log" --enable-prefix-caching
if wait_health "$WORK/refused.log"; then
  echo "the server with --enable-prefix-caching started: the plugin did not refuse" >&2
  exit 1
fi
REFUSED_RC=0
wait "$SERVER_PID" || REFUSED_RC=$?
REFUSED_S=$((SECONDS - STARTED))
stop_server  # whatever of its group is left
echo "   exit status $REFUSED_RC after $REFUSED_S s"
REFUSAL=$(grep -m1 "ProfileNotServableError: minicache_vllm: .*enable_prefix_caching=False" "$WORK/refused.log" || true)
[[ -n $REFUSAL ]] || { echo "no refusal message in the log:" >&2; tail -30 "$WORK/refused.log" >&2; exit 1; }

failed=0
{
  "$VPY" "$CLIENT" compare "$WORK/offline.json" "$WORK/served-concurrent.json" \
    --label "server, 3 requests at once" || failed=1
  "$VPY" "$CLIENT" compare "$WORK/offline.json" "$WORK/served-sequential.json" \
    --label "server, one request at a time" || failed=1
  # The control: without the plugin the same requests must get other log-probabilities (the merged
  # layers change them from the first generated token on), else the equal tokens above show nothing.
  "$VPY" "$CLIENT" contrast "$WORK/served-sequential.json" "$WORK/stock.json" \
    --label "control: served profile vs the same server without the plugin" || failed=1
} >"$WORK/rows.md"
((REFUSED_RC != 0 && STOCK_PLUGIN_LINES == 0)) || failed=1
{
  echo "# vLLM's OpenAI-compatible server on a minicache profile directory"
  echo
  echo "Made by \`bash benchmarks/vllm_serve_check.sh\`; $(cat "$WORK/machine.txt")$DIRTY."
  echo
  echo "SmolLM2-135M-Instruct with profiles/smollm2-135m-instruct (groups 25-26, 27-29), written by"
  echo "\`minicache-convert --dtype float32 --profile\`; 3 prompts of 620 tokens (code, release notes, licences:"
  echo "benchmarks/unseen_text.sh), sent as token ids; $NEW_TOKENS greedy tokens each (temperature 0, ignore_eos),"
  echo "so a merge block is merged at prefill (448 tokens) and one more while decoding (at token 640)."
  echo
  echo "- offline: \`VLLM_ENABLE_V1_MULTIPROCESSING=0 vllm_generate.py DIR --dtype float32 --max-num-seqs 4"
  echo "  --max-model-len 2048 --max-num-batched-tokens 2048\` (the server's default step budget on CPU)"
  shown="${SERVE[*]}" && shown=${shown//$MODEL/DIR} && shown=${shown//$VENV/.venv-vllm}
  echo "- server: \`VLLM_CPU_KVCACHE_SPACE=1 $shown --host 127.0.0.1 --port PORT --seed 0 ${ENGINE[*]}"
  echo "  --no-enable-prefix-caching\`"
  echo "- requests: \`/v1/completions\` with \`prompt\` = token ids, \`return_token_ids\`, \`logprobs: 0\`,"
  echo "  \`return_tokens_as_token_ids\` (integrations/vllm/bench/vllm_serve_client.py)"
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| offline LLM run: whole / engine start-up / generate (3 prompts at once) | $OFFLINE_S s / $(
    "$VPY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("%.0f s / %.1f s" % (r["startup_s"], r["generate_s"]))' \
      "$WORK/offline.json") |"
  echo "| server start to /health | $HEALTH_S s |"
  echo "| the plugin's line in the server log | \`${PLUGIN_LINE//$WORK/WORK}\` |"
  echo "| completions answered with status 200 | $BATCHES |"
  echo "| control server without the plugin (VLLM_PLUGINS=\"\"): lines \"minicache_vllm:\" in its log | $STOCK_PLUGIN_LINES |"
  cat "$WORK/rows.md"
  echo
  echo "## --enable-prefix-caching is refused"
  echo
  echo "The same server with \`--enable-prefix-caching\` exits with status $REFUSED_RC after $REFUSED_S s, /health"
  echo "never answering. The first error lines of its log, the plugin's exception and the server's last line:"
  echo
  echo '```'
  grep -m2 " ERROR " "$WORK/refused.log" | sed "s|$WORK|WORK|g"
  echo "[...]"
  echo "${REFUSAL//$WORK/WORK}"
  echo "[...]"
  tail -1 "$WORK/refused.log"
  echo '```'
} >"$OUT/serve-check.md"
cat "$OUT/serve-check.md"
if ((failed)); then
  echo "FAILED: see $OUT/serve-check.md" >&2
  exit 1
fi
