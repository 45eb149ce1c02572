"""Greedy completions from a running ``vllm serve`` against the offline ``LLM``'s (benchmarks/vllm_serve_check.sh).

    python integrations/vllm/bench/vllm_serve_client.py prompts MODEL_DIR PROMPTS.json --text A.txt B.txt ...
    python integrations/vllm/bench/vllm_serve_client.py query URL PROMPTS.json OUT.json [--concurrent]
    python integrations/vllm/bench/vllm_serve_client.py compare OFFLINE.json SERVED.json
    python integrations/vllm/bench/vllm_serve_client.py contrast SERVED.json STOCK.json

``prompts`` cuts token-id prompts from real text (vllm_agreement.py's windows, with the model
directory's tokenizer). ``query`` sends one /v1/completions request per prompt (token ids, greedy,
``ignore_eos``) and keeps the generated ids twice: ``return_token_ids`` and the logprobs' tokens
(``return_tokens_as_token_ids``); ``--concurrent`` sends them all at once, like the offline batch.
``compare`` prints markdown table rows: the share of generated positions whose tokens are equal
(exit status 1 if any differs or a reply check fails). ``contrast`` compares the served profile with
a stock server (``VLLM_PLUGINS=""``) on the same requests: greedy tokens can agree for a while, but
the merged layers change every generated token's log-probability (exit status 1 if none changed).
Standard library only, except ``prompts`` (transformers, torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def make_prompts(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_agreement import token_windows

    prompts = token_windows(AutoTokenizer.from_pretrained(args.model), args.text, args.count, args.length)
    assert all(len(p) == args.length for p in prompts), [len(p) for p in prompts]
    Path(args.out).write_text(json.dumps(prompts))


def complete(url: str, ids: list[int], max_tokens: int) -> dict:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as response:
        reply = json.load(response)
    choice = reply["choices"][0]
    return {
        "token_ids": choice["token_ids"],
        "logprob_token_ids": [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]],
        "logprobs": choice["logprobs"]["token_logprobs"],
        "prompt_echoed": choice.get("prompt_token_ids") == ids,
        "finish_reason": choice["finish_reason"],
        "usage": reply["usage"],
        "seconds": time.perf_counter() - began,
    }


def query(args: argparse.Namespace) -> None:
    prompts = json.loads(Path(args.prompts).read_text())
    began = time.perf_counter()
    with ThreadPoolExecutor(len(prompts) if args.concurrent else 1) as pool:
        replies = list(pool.map(lambda ids: complete(args.url, ids, args.max_tokens), prompts))
    result = {"tokens": [r["token_ids"] for r in replies], "logprobs": [r["logprobs"] for r in replies],
              "replies": replies, "seconds": time.perf_counter() - began}
    Path(args.out).write_text(json.dumps(result))
    print(f"   {len(prompts)} requests ({'concurrent' if args.concurrent else 'one at a time'}): "
          f"{result['seconds']:.1f} s", flush=True)


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    pairs = [(x, y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True)]
    return sum(x == y for x, y in pairs), len(pairs)


def compare(args: argparse.Namespace) -> None:
    offline = json.loads(Path(args.offline).read_text())["tokens"]
    served = json.loads(Path(args.served).read_text())
    same, total = agreement(served["tokens"], offline)
    firsts = [next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s))
              for s, t in zip(served["tokens"], offline, strict=True)]
    replies = served["replies"]
    checks = {
        "return_token_ids = logprobs' token ids": all(r["token_ids"] == r["logprob_token_ids"] for r in replies),
        "prompt_token_ids echoed as sent": all(r["prompt_echoed"] for r in replies),
        f"all {len(offline[0])} tokens, finish_reason length": all(
            len(r["token_ids"]) == len(offline[0]) and r["finish_reason"] == "length" for r in replies),
    }
    print(f"| {args.label}: greedy tokens equal to the offline LLM's | {same}/{total} = {same / total:.1%} |")
    print(f"| {args.label}: first divergence per prompt (= length: none) | {firsts} |")
    print(f"| {args.label}: {'; '.join(checks)} | {', '.join('yes' if v else 'NO' for v in checks.values())} |")
    print(f"| {args.label}: wall time of the requests | {served['seconds']:.1f} s |")
    if same != total or not all(checks.values()):
        sys.exit(1)  # the rows above say what differs


def contrast(args: argparse.Namespace) -> None:
    served = json.loads(Path(args.served).read_text())
    stock = json.loads(Path(args.stock).read_text())
    same, total = agreement(served["tokens"], stock["tokens"])
    # Log-probabilities of the same token after the same context: up to each prompt's first differing token.
    deltas = []
    for s, t, ls, lt in zip(served["tokens"], stock["tokens"], served["logprobs"], stock["logprobs"], strict=True):
        for x, y, a, b in zip(s, t, ls, lt, strict=True):
            if x != y:
                break
            deltas.append(abs(a - b))
    changed = sum(d > args.tolerance for d in deltas)
    print(f"| {args.label}: greedy tokens equal | {same}/{total} = {same / total:.1%} |")
    print(f"| {args.label}: log-probabilities changed by more than {args.tolerance:g} (positions before the "
          f"first differing token) | {changed}/{len(deltas)} (largest change {max(deltas, default=0):.3g}) |")
    if changed == 0:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--length", type=int, default=620)
    q = sub.add_parser("query")
    q.add_argument("url")
    q.add_argument("prompts")
    q.add_argument("out")
    q.add_argument("--max-tokens", type=int, default=32)
    q.add_argument("--concurrent", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("offline")
    c.add_argument("served")
    c.add_argument("--label", default="vllm serve")
    d = sub.add_parser("contrast")
    d.add_argument("served")
    d.add_argument("stock")
    d.add_argument("--label", default="served profile vs stock server")
    d.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    {"prompts": make_prompts, "query": query, "compare": compare, "contrast": contrast}[args.command](args)


if __name__ == "__main__":
    main()
