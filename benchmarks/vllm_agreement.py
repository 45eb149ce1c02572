"""vLLM with a minicache profile against minicache's transformers runtime (issue 19's acceptance).

    python benchmarks/vllm_agreement.py --text code.txt notes.txt licences.txt --out benchmarks/results/vllm-cpu

Runs in minicache's venv and starts vLLM engines in ``.venv-vllm`` (``scripts/setup_vllm.sh``):

1. **Capacity**: vLLM's reported KV cache capacity (tokens, same ``VLLM_CPU_KVCACHE_SPACE``) with
   and without the profile, against ``MiniCache.memory_report()``'s compression at the same context.
2. **Greedy tokens**: 10 prompts of 600 real-text tokens, 64 greedy tokens each: vLLM + profile
   against ``MiniCache`` in transformers (the share of positions with the same token), and stock
   vLLM against transformers' full cache (the noise floor of two attention implementations).
3. **Perplexity**: windows of 512 prefix + 256 continuation tokens, the continuation scored from
   vLLM's prompt log-probabilities. One request at a time with a 512-token step budget, so vLLM reads
   the prefix in one step and the continuation in the next, the schedule minicache-eval's
   ``chunk_size=256`` gives transformers. Relative perplexity of the profile against each runtime's
   own full cache, and the two runtimes' profile perplexities against each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
GENERATE = ROOT / "integrations" / "vllm" / "bench" / "vllm_generate.py"
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct"


def token_windows(tokenizer, paths: list[str], count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, spread evenly over the texts (taken in turn)."""
    streams = [tokenizer(Path(p).read_text(), add_special_tokens=False).input_ids for p in paths]
    out = []
    for i in range(count):
        ids = streams[i % len(streams)]
        slots = math.ceil(count / len(streams))
        start = (i // len(streams)) * max(1, (len(ids) - length) // slots)
        out.append(ids[start : start + length])
    return out


def run_vllm(model: Path, prompts: list[list[int]], work: Path, name: str, *, plugins: bool,
             extra: list[str]) -> dict:
    prompt_file, out_file = work / f"{name}-prompts.json", work / f"{name}.json"
    prompt_file.write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    began = time.perf_counter()
    run = subprocess.run([str(VLLM_PYTHON), str(GENERATE), str(model), str(prompt_file), str(out_file), *extra],
                         env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"vLLM run {name} failed (exit {run.returncode}):\n{run.stderr[-6000:]}")
    print(f"   vLLM {name}: {time.perf_counter() - began:.0f} s", flush=True)
    return json.loads(out_file.read_text())


def greedy(model, prompts: list[list[int]], new: int, cache_factory) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, past_key_values=cache_factory(), pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def first_divergence(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s)) for s, t in zip(a, b,
                                                                                                          strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", nargs="+", required=True, help="unseen texts (benchmarks/unseen_text.sh)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", default=str(PROFILE))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompt-length", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows (x 256 scored tokens)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--greedy-only", action="store_true", help="skip the perplexity part")
    parser.add_argument("--block-size", type=int, default=64,
                        help="vLLM's block size: a multiple of the profile's page unit (128 for KIVI groups of 128)")
    parser.add_argument("--tag", default="", help="appended to the result files' names")
    args = parser.parse_args()

    from minicache.evaluate.quality import evaluate_profile, perplexity
    from minicache.models import load_model
    from minicache.profile import MergeProfile
    from minicache.runtime.cache import MiniCache

    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run scripts/setup_vllm.sh")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    model, tokenizer = load_model("smollm2-135m", dtype=getattr(torch, args.dtype))
    profile = MergeProfile.load(args.profile)
    dirs = {}
    for name, prof in (("stock", None), ("profile", args.profile)):
        dirs[name] = work / name
        cmd = [sys.executable, "-m", "minicache.convert", "--model", "smollm2-135m", "--out", str(dirs[name]),
               "--dtype", args.dtype] + (["--profile", prof] if prof else [])
        subprocess.run(cmd, check=True, capture_output=True)

    print("== greedy tokens", flush=True)
    prompts = token_windows(tokenizer, args.text, args.prompts, args.prompt_length)
    block = ["--block-size", str(args.block_size)]
    gen = ["--max-tokens", str(args.new_tokens), "--max-num-batched-tokens", "8192", "--dtype", args.dtype, *block]
    v_stock = run_vllm(dirs["stock"], prompts, work, "greedy-stock", plugins=False, extra=gen)
    v_prof = run_vllm(dirs["profile"], prompts, work, "greedy-profile", plugins=True, extra=gen)
    began = time.perf_counter()
    t_full = greedy(model, prompts, args.new_tokens, lambda: None)
    t_prof = greedy(model, prompts, args.new_tokens, lambda: MiniCache(profile, model))
    print(f"   transformers: {time.perf_counter() - began:.0f} s", flush=True)
    greedy_rows = [
        f"| greedy tokens ({args.dtype}): vLLM + profile = MiniCache in transformers | "
        f"{agreement(v_prof['tokens'], t_prof):.1%} |",
        f"| greedy tokens ({args.dtype}): stock vLLM = transformers full cache | "
        f"{agreement(v_stock['tokens'], t_full):.1%} |",
        f"| greedy tokens ({args.dtype}): stock vLLM = MiniCache in transformers | "
        f"{agreement(v_stock['tokens'], t_prof):.1%} |",
        f"| first divergence from MiniCache in transformers, profile (per prompt) | "
        f"{first_divergence(v_prof['tokens'], t_prof)} |",
        f"| first divergence from transformers' full cache, stock (per prompt) | "
        f"{first_divergence(v_stock['tokens'], t_full)} |",
    ]
    if args.greedy_only:
        table = "| measure | value |\n|---|---|\n" + "\n".join(greedy_rows) + "\n"
        (out / f"greedy-{args.dtype}{args.tag}.md").write_text(table)
        print("\n".join(greedy_rows))
        return

    print("== perplexity", flush=True)
    windows = token_windows(tokenizer, args.text, args.windows, 768)
    ppl_args = ["--max-tokens", "1", "--prompt-logprobs", "--one-at-a-time", "--max-num-batched-tokens", "512",
                "--dtype", args.dtype, *block]
    p_stock = run_vllm(dirs["stock"], windows, work, "ppl-stock", plugins=False, extra=ppl_args)
    p_prof = run_vllm(dirs["profile"], windows, work, "ppl-profile", plugins=True, extra=ppl_args)

    def vllm_nll(result: dict) -> torch.Tensor:  # [windows, 256]: the continuation's tokens
        return -torch.tensor([lp[511:] for lp in result["prompt_logprobs"]], dtype=torch.float64)

    nll_vs, nll_vp = vllm_nll(p_stock), vllm_nll(p_prof)
    quality = evaluate_profile(model, torch.tensor(windows), 512, profile, batch_size=4, chunk_size=256)
    ppl = {"vllm_stock": perplexity(nll_vs), "vllm_profile": perplexity(nll_vp),
           "transformers_full": quality.ppl_full, "transformers_profile": quality.ppl}

    def interval(a: torch.Tensor, b: torch.Tensor) -> list[float]:
        """95 % bootstrap interval of ppl(b) / ppl(a) - 1 over windows."""
        gen = torch.Generator().manual_seed(0)
        n = a.shape[0]
        draws = []
        for _ in range(2000):
            i = torch.randint(n, (n,), generator=gen)
            draws.append(math.exp(b[i].mean() - a[i].mean()) - 1)
        draws.sort()
        return [draws[49], draws[1949]]

    cache = MiniCache(profile, model)
    ids = torch.tensor([token_windows(tokenizer, args.text[:1], 1, 4096)[0]])
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    report = cache.memory_report()
    capacity = v_prof["kv_cache_tokens"] / v_stock["kv_cache_tokens"]
    result = {
        "capacity_tokens": {"stock": v_stock["kv_cache_tokens"], "profile": v_prof["kv_cache_tokens"]},
        "capacity_ratio": capacity,
        "memory_report_ratio_4096": report["compression_ratio"],
        "greedy_agreement_profile": agreement(v_prof["tokens"], t_prof),
        "greedy_agreement_stock": agreement(v_stock["tokens"], t_full),
        "first_divergence_profile": first_divergence(v_prof["tokens"], t_prof),
        "first_divergence_stock": first_divergence(v_stock["tokens"], t_full),
        "ppl": ppl,
        "ppl_increase_vllm": ppl["vllm_profile"] / ppl["vllm_stock"] - 1,
        "ppl_increase_vllm_ci95": interval(nll_vs.mean(1), nll_vp.mean(1)),
        "ppl_increase_transformers": quality.ppl_increase,
        "ppl_vllm_vs_transformers_profile": ppl["vllm_profile"] / ppl["transformers_profile"] - 1,
        "ppl_vllm_vs_transformers_stock": ppl["vllm_stock"] / ppl["transformers_full"] - 1,
        "tokens_scored": int(nll_vp.numel()),
        "decode_tokens_per_s": {"stock": v_stock["generated_tokens"] / v_stock["generate_s"],
                                "profile": v_prof["generated_tokens"] / v_prof["generate_s"]},
    }
    (out / f"agreement-{args.dtype}{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| measure | value |", "|---|---|",
        f"| profile | `{os.path.relpath(args.profile, ROOT)}`: {profile.describe()} |",
        f"| dtype, vLLM block size | {args.dtype}, {args.block_size} |",
        f"| vLLM KV capacity, stock / profile (tokens, VLLM_CPU_KVCACHE_SPACE=1) | {v_stock['kv_cache_tokens']:,} / "
        f"{v_prof['kv_cache_tokens']:,} |",
        f"| capacity ratio | {capacity:.4f}x |",
        f"| largest batch of 4,096-token requests vLLM admits, stock / profile | {v_stock['max_concurrency']:.2f} / "
        f"{v_prof['max_concurrency']:.2f} |",
        f"| MiniCache.memory_report() compression at 4,096 tokens | {report['compression_ratio']:.4f}x |",
        *greedy_rows,
        f"| perplexity: vLLM stock / profile | {ppl['vllm_stock']:.4f} / {ppl['vllm_profile']:.4f} |",
        f"| perplexity: transformers full / profile | {ppl['transformers_full']:.4f} / "
        f"{ppl['transformers_profile']:.4f} |",
        f"| ppl increase of the profile: vLLM [95 %] | {result['ppl_increase_vllm']:+.2%} "
        f"[{result['ppl_increase_vllm_ci95'][0]:+.2%}, {result['ppl_increase_vllm_ci95'][1]:+.2%}] |",
        f"| ppl increase of the profile: transformers | {result['ppl_increase_transformers']:+.2%} |",
        f"| profile ppl, vLLM vs transformers | {result['ppl_vllm_vs_transformers_profile']:+.2%} |",
        f"| full-cache ppl, stock vLLM vs transformers | {result['ppl_vllm_vs_transformers_stock']:+.2%} |",
        f"| scored tokens | {result['tokens_scored']:,} in {args.windows} windows |",
        f"| decode tokens/s (batch of {args.prompts}), stock / profile | "
        f"{result['decode_tokens_per_s']['stock']:.1f} / {result['decode_tokens_per_s']['profile']:.1f} |",
    ]
    (out / f"agreement-{args.dtype}{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
