#!/usr/bin/env python
"""Benchmark the fused decode attention over a merged store against DESIGN.md §3's targets.

For Llama-2-7B-shaped (32 query heads, 32 KV heads, D = 128) and Llama-3-8B-shaped (32 query
heads, 8 KV heads, D = 128) decode attention on random data (bf16), at several batch sizes and
context lengths, it times with CUDA events (median over repeats, L2 flushed before each):

* ``fused``: the Triton kernel over the merged store (directions + magnitudes + retained tokens
  + residual window);
* ``fused_no_magnitude``: the same kernel with magnitudes ignored (what the magnitudes cost);
* ``restore_then_sdpa``: restore the merged store to dense keys/values, then PyTorch SDPA;
* ``sdpa_full``: PyTorch SDPA on an unmerged cache of the same length.

It reports the fused kernel's achieved bandwidth (bytes it must read / time) against the device's
measured device-to-device copy bandwidth, and writes everything (device, versions, exact command)
as JSON under ``benchmarks/results/``. ``--reduced`` runs tiny shapes on the CPU (the fused kernel
through Triton's interpreter when ``TRITON_INTERPRET=1``, else only the torch paths) so that tests
can check this script's logic and output without a GPU.

Examples
--------
    python benchmarks/kernel_bench.py                       # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/kernel_bench.py --reduced --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from minicache.runtime.kernels import triton_available, why_unusable  # noqa: E402
from minicache.runtime.kernels.reference import fused_decode_reference  # noqa: E402
from minicache.runtime.kernels.synthetic import random_merged_views  # noqa: E402
from minicache.runtime.views import MergedKVView  # noqa: E402

SHAPES = {
    "llama2-7b": {"q_heads": 32, "kv_heads": 32, "head_dim": 128},
    "llama3-8b": {"q_heads": 32, "kv_heads": 8, "head_dim": 128},
}
# Same GQA ratios, tiny sizes: the interpreter runs one program at a time on a CPU core.
REDUCED_SHAPES = {
    "llama2-7b-mini": {"q_heads": 2, "kv_heads": 2, "head_dim": 64},
    "llama3-8b-mini": {"q_heads": 8, "kv_heads": 2, "head_dim": 64},
}
TARGETS = {
    "bandwidth_fraction_min": 0.60,
    "bandwidth_min_read_bytes": 256 * 2**20,
    "no_magnitude_ratio_max": 1.10,
    "restore_speedup_min": 1.8,
    "source": "DESIGN.md §3 Kernels",
}
METHODS = ("fused", "fused_no_magnitude", "restore_then_sdpa", "sdpa_full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="tiny shapes on CPU (tests the logic, not the GPU)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --reduced)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of {list(SHAPES)}")
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--contexts", nargs="+", type=int, default=None)
    p.add_argument("--residual", type=int, default=None, help="exact residual window (tokens)")
    p.add_argument("--retained", type=float, default=0.05, help="fraction of merged tokens retained")
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=[2, 4],
        default=None,
        help="pack the merged store as a quantized MiniCache does (keys per channel in groups of 128 tokens, "
        "values and retained vectors per token); the fused kernel then dequantizes in registers",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--memory-fraction", type=float, default=0.7, help="skip cases needing more of free memory"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.reduced
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    on_gpu = args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    shapes = REDUCED_SHAPES if args.reduced else SHAPES
    names = args.shapes or list(shapes)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(shapes)}")
    args.shape_table = {n: shapes[n] for n in names}
    args.batches = args.batches or ([1, 2] if args.reduced else [1, 8, 32])
    args.contexts = args.contexts or ([96] if args.reduced else [1024, 4096, 16384, 32768])
    args.residual = args.residual if args.residual is not None else (16 if args.reduced else 128)
    args.repeats = args.repeats or (2 if args.reduced else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.reduced else 5)
    return args


# ---- timing -------------------------------------------------------------------------------------
class Timer:
    """Median ms of a callable: CUDA events on a GPU (L2 flushed before each run), else perf_counter."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.flush = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
            self.flush = torch.empty(max(2 * l2, 2**20), dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- one case -----------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def fused_read_bytes(query: torch.Tensor, keys: MergedKVView, values: MergedKVView) -> int:
    """Bytes the fused kernel must read: query, residual windows, directions (packed codes, scales and
    zero points where quantized), magnitudes (both slots: the member's slot is strided, so whole
    sectors come in), this member's retained vectors and their CSR lists."""
    total = _nbytes(query)
    for view in (keys, values):
        total += _nbytes(view.residual)
        if view.merged_length == 0:
            continue
        total += _nbytes(view.direction) + _nbytes(view.magnitude)
        if view.qdirection is not None:
            total += view.qdirection.nbytes
        members = view.magnitude.shape[-1]
        if view.retained_q is not None:
            total += view.retained_q.nbytes // members
        else:
            total += _nbytes(view.retained_value) // members
        total += 4 * (3 * view.retained.pos.numel() + view.retained.offsets.numel())
    return total


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, enable_gqa=query.shape[1] != key.shape[1])


def run_case(name: str, shape: dict, batch: int, context: int, args, timer: Timer, fused_ok: bool) -> dict:
    from minicache.runtime.kernels import decode

    hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    residual = min(args.residual, context)
    merged = context - residual
    device, dtype = args.device, args.dtype
    keys, values = random_merged_views(
        batch,
        hkv,
        merged,
        residual,
        d,
        dtype=dtype,
        device=device,
        retained=args.retained,
        seed=context + batch,
    )
    if args.kv_bits is not None and merged:
        from minicache.runtime.kernels.synthetic import quantize_views

        # As a quantized store holds them: whole groups of 128 key tokens packed, the rest dense.
        key_group = min(128, merged)
        keys, values = quantize_views(
            keys, values, args.kv_bits, key_group=key_group, value_group=min(128, d), key_tail=merged % key_group
        )
    g = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(batch, hq, 1, d, generator=g, device=device).to(dtype)
    full_k = torch.randn(batch, hkv, context, d, generator=g, device=device).to(dtype)
    full_v = torch.randn(batch, hkv, context, d, generator=g, device=device).to(dtype)

    calls: dict[str, Callable[[], object] | None] = {
        "fused": (lambda: decode.fused_decode_attention(query, keys, values)) if fused_ok else None,
        "fused_no_magnitude": (
            (lambda: decode.fused_decode_attention(query, keys, values, use_magnitude=False))
            if fused_ok
            else None
        ),
        "restore_then_sdpa": lambda: sdpa(query, keys.materialize(), values.materialize()),
        "sdpa_full": lambda: sdpa(query, full_k, full_v),
    }
    ms = {method: (timer(fn) if fn is not None else None) for method, fn in calls.items()}

    error = None
    # The float32 reference materialises the cache: check correctness where that is cheap enough.
    if fused_ok and batch * hkv * context * d * 4 * 4 <= 4 * 2**30:
        got = decode.fused_decode_attention(query, keys, values).float()
        error = (got - fused_decode_reference(query.float(), keys, values)).abs().max().item()

    bytes_read = fused_read_bytes(query, keys, values)
    full_bytes = 2 * full_k.numel() * full_k.element_size() + query.numel() * query.element_size()
    bw = {
        "fused": bytes_read / (ms["fused"] * 1e-3) / 1e9 if ms["fused"] else None,
        "sdpa_full": full_bytes / (ms["sdpa_full"] * 1e-3) / 1e9,
    }
    frac = bw["fused"] / args.copy_bw if bw["fused"] else None
    ratios = {
        "fused_vs_no_magnitude": ms["fused"] / ms["fused_no_magnitude"] if ms["fused"] else None,
        "restore_then_sdpa_speedup": ms["restore_then_sdpa"] / ms["fused"] if ms["fused"] else None,
        "sdpa_full_vs_fused": ms["sdpa_full"] / ms["fused"] if ms["fused"] else None,
    }
    # Targets are about GPUs: CPU timings (the interpreter) are not judged.
    judged = ms["fused"] is not None and device.type == "cuda"
    big = bytes_read >= TARGETS["bandwidth_min_read_bytes"]
    meets = {
        "bandwidth": frac >= TARGETS["bandwidth_fraction_min"] if judged and big else None,
        "no_magnitude": ratios["fused_vs_no_magnitude"] <= TARGETS["no_magnitude_ratio_max"]
        if judged
        else None,
        "restore_speedup": ratios["restore_then_sdpa_speedup"] >= TARGETS["restore_speedup_min"]
        if judged
        else None,
    }
    plan = decode.plan_splits(
        batch * hkv,
        merged,
        residual,
        max(keys.retained.max_count, values.retained.max_count) if merged else 0,
        device,
    )
    return {
        "shape": name,
        **shape,
        "batch": batch,
        "context": context,
        "merged": merged,
        "residual": residual,
        "kv_bits": args.kv_bits,
        "retained_tokens": {
            "keys": 0 if keys.retained is None else keys.retained.pos.numel(),
            "values": 0 if values.retained is None else values.retained.pos.numel(),
        },
        "splits": dict(
            zip(("dense", "dense_chunk", "retained", "residual", "residual_chunk"), plan, strict=True)
        ),
        "bytes_read": bytes_read,
        "ms": ms,
        "bandwidth_gbs": bw,
        "bandwidth_fraction": frac,
        "ratios": ratios,
        "meets": meets,
        "max_abs_error": error,
    }


def case_bytes(shape: dict, batch: int, context: int, itemsize: int) -> int:
    """Peak memory estimate of one case: merged store, full cache, restore's float32 temporaries."""
    one = batch * shape["kv_heads"] * context * shape["head_dim"] * itemsize
    return 2 * one + 2 * one + 2 * one * (2 + 4 // itemsize)


# ---- report -------------------------------------------------------------------------------------
def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(report: dict) -> None:
    t = TARGETS
    print(f"device: {report['device']}  copy bandwidth: {report['copy_bandwidth_gbs']:.1f} GB/s", end="  ")
    bits = report.get("kv_bits")
    print(f"dtype: {report['dtype']}" + (f"  store packed to {bits} bits" if bits else ""))
    print(
        f"targets ({t['source']}): fused ≥ {t['bandwidth_fraction_min']:.0%} of copy bandwidth when it reads "
        f"≥ {t['bandwidth_min_read_bytes'] // 2**20} MB; fused ≤ {t['no_magnitude_ratio_max']:.2f}× the "
        f"no-magnitude kernel; ≥ {t['restore_speedup_min']:.1f}× faster than restore-then-SDPA"
    )
    columns = ("shape", "B", "T", "MB read", "fused ms", "no-mag ms", "restore ms", "sdpa ms", "GB/s")
    columns += ("%copy (≥60%)", "fused/no-mag (≤1.10)", "restore/fused (≥1.8)", "max err")
    widths = (16, 4, 7, 9, 10, 10, 11, 9, 8, 14, 22, 22, 9)
    print(
        "".join(
            f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(columns, widths, strict=True))
        )
    )
    print("-" * sum(widths))

    def judged(value, spec: str, ok: bool | None) -> str:
        return fmt(value, spec) + {True: " ok", False: " MISS", None: ""}[ok]

    for r in report["results"]:
        m, ratio, meets = r["ms"], r["ratios"], r["meets"]
        cells = (
            r["shape"],
            r["batch"],
            r["context"],
            f"{r['bytes_read'] / 2**20:.1f}",
            fmt(m["fused"], ".3f"),
            fmt(m["fused_no_magnitude"], ".3f"),
            fmt(m["restore_then_sdpa"], ".3f"),
            fmt(m["sdpa_full"], ".3f"),
            fmt(r["bandwidth_gbs"]["fused"], ".0f"),
            judged(r["bandwidth_fraction"], ".0%", meets["bandwidth"]),
            judged(ratio["fused_vs_no_magnitude"], ".2f", meets["no_magnitude"]),
            judged(ratio["restore_then_sdpa_speedup"], ".2f", meets["restore_speedup"]),
            fmt(r["max_abs_error"], ".1e"),
        )
        print(
            "".join(
                f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    for line in report["notes"]:
        print(f"note: {line}")


def command_line() -> str:
    """The command that ran this script, with the environment variables that change what it does."""
    env = [f"{k}={os.environ[k]}" for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    return shlex.join([*env, Path(sys.executable).name, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    timer = Timer(device, args.repeats, args.warmup)
    notes = []
    reason = why_unusable(device)
    fused_ok = reason is None
    if not fused_ok:
        notes.append(f"fused kernel not run: {reason}")
    if device.type != "cuda":
        notes.append("CPU run (tests this script's logic): timings are not judged against the GPU targets")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        copy_nbytes = 2**30
    else:
        name = platform.processor() or platform.machine() or "cpu"
        copy_nbytes = 2**24 if args.reduced else 2**28
    args.copy_bw = copy_bandwidth(device, timer, copy_nbytes)

    results = []
    for shape_name, shape in args.shape_table.items():
        for batch in args.batches:
            for context in args.contexts:
                need = case_bytes(shape, batch, context, args.dtype.itemsize)
                if device.type == "cuda":
                    free = torch.cuda.mem_get_info(device)[0]
                    if need > args.memory_fraction * free:
                        notes.append(
                            f"skipped {shape_name} B={batch} T={context}: needs ~{need / 2**30:.1f} GiB"
                        )
                        continue
                results.append(run_case(shape_name, shape, batch, context, args, timer, fused_ok))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    report = {
        "benchmark": "minicache fused decode attention over a merged store",
        "device": name,
        "device_type": device.type,
        "reduced": args.reduced,
        "interpreter": device.type == "cpu" and fused_ok,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(args.dtype).removeprefix("torch."),
        "retained_fraction": args.retained,
        "kv_bits": args.kv_bits,
        "residual": args.residual,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timing": "median ms; CUDA events with L2 flushed before each run"
        if device.type == "cuda"
        else "median ms",
        "copy_bandwidth_gbs": args.copy_bw,
        "copy_bandwidth_bytes": copy_nbytes,
        "targets": TARGETS,
        "results": results,
        "notes": notes,
    }
    print_table(report)
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type
        bits = "" if args.kv_bits is None else f"-{args.kv_bits}bit"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
        out = (
            ROOT
            / "benchmarks"
            / "results"
            / f"kernels-{'reduced-' if args.reduced else ''}{slug}{bits}-{stamp}.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
