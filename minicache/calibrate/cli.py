"""`minicache-calibrate`: measure, search and verify a merge profile for a model."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from minicache.calibrate.defaults import CALIBRATION_DEFAULTS as D
from minicache.calibrate.defaults import KEY_ROPE_CHOICES, KEY_ROPE_DEFAULT
from minicache.cli_options import (
    ArgumentParser,
    add_dtype_option,
    add_kv_options,
    add_model_option,
    quantization_from_args,
)
from minicache.data import DataError
from minicache.validation import ProfileError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="minicache-calibrate",
        description=(
            "Calibrate MiniCache for a model: capture KV similarity between adjacent layers on sample data, "
            "search which layer pairs to merge (and their t, γ) to save the most KV memory while the quality "
            "loss on a held-out part of the data stays within --budget (the upper end of its 95% interval), "
            "verify it with the real runtime, and "
            "write the merge profile (minicache_config.yaml) plus a report with plots. With no arguments it "
            "calibrates the built-in SmolLM2-135M-Instruct on the built-in corpus."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_option(parser)
    parser.add_argument(
        "--data",
        help="JSON Lines with one of text / messages / input_ids per line, or a .txt file; "
        "default: the built-in corpus (real prose, documentation, code and chat shipped with minicache, "
        "about 87,000 tokens; see minicache/calibrate/corpus/SOURCES.md)",
    )
    parser.add_argument(
        "--out",
        help="where the profile goes: a .yaml file, or a directory (a model directory gets minicache_config.yaml "
        "next to the weights); default: ./minicache-<model>/",
    )
    parser.add_argument("--budget", type=float, default=D.budget,
                        help="largest quality loss accepted (0.01 = +1%% ppl) for the upper end of its 95%% interval "
                        "on held-out data (bootstrap over the held-out windows), not only the point estimate")
    parser.add_argument("--budget-metric", choices=["ppl_increase", "kl_mean"], default=D.budget_metric)
    parser.add_argument(
        "--kl-guard", type=_kl_guard, default="auto", metavar="R",
        help="a perplexity budget for kinds of text the data lacks: also require expm1(R x KL) within --budget, "
        "at the upper end of the KL's interval. The held-out interval covers text like the data; on other "
        "kinds the loss rose up to 3.7x the held-out KL in our measurements (README, 'What a profile "
        f"promises'), so R=4 kept the promise there, at the price of merging less. 0: off. auto: "
        f"{D.kl_guard_without_data:g} without --data (the built-in corpus stands in for text nobody has seen), "
        f"{D.kl_guard:g} with --data (calibrate on text like what you will run)",
    )
    parser.add_argument("--preset", choices=["paper", "none"],
                        help="write this preset without searching; still measured (none: no merging, e.g. with "
                        "--kv-bits auto to choose widths alone)")
    parser.add_argument("--num-samples", type=int, default=D.num_samples,
                        help="calibration windows of --max-length tokens")
    parser.add_argument("--eval-windows", type=int, default=D.eval_windows,
                        help="held-out windows used to measure quality (more: a narrower interval, so more of the "
                        "budget can be used, and a slower search)")
    parser.add_argument("--max-length", type=int, default=D.max_length, help="tokens per window")
    parser.add_argument("--seed", type=int, default=D.seed, help="seed of the calibration / held-out split")
    add_dtype_option(parser)
    parser.add_argument("--residual-length", type=int, default=128, help="exact window of most recent tokens")
    parser.add_argument("--block-size", type=int, default=64, help="tokens merged at a time")
    parser.add_argument("--probes", type=int, default=D.probes,
                        help="single-group measurements that calibrate the search")
    parser.add_argument(
        "--align",
        action=argparse.BooleanOptionalAction,
        default=D.align,
        help="fit an orthogonal alignment per group, KV head and K/V (orthogonal Procrustes on the "
        "calibration windows, shipped in the profile's tensors sidecar); with --preset paper: the paper's "
        "groups, aligned (--no-align: the paper's literal recipe). The search keeps alignment per "
        "component only where it restores the calibration tokens better",
    )
    parser.add_argument(
        "--max-group-size", type=int, default=D.max_group_size,
        help="largest group of adjacent layers the search considers (2 = pairs, as in the paper)",
    )
    parser.add_argument(
        "--methods", default=",".join(D.methods),
        help="comma-separated merge methods the search may choose from, per group and K/V "
        "(registered: see minicache.methods.method_names(); built in: slerp, average, lowrank: a calibrated "
        "basis shared by 1..max-group-size layers, stored at the rank the search picks; needs --align; exact: "
        "one layer's keys or values kept as they are, so that the search may compress the other alone, e.g. "
        "--methods slerp,lowrank,exact)",
    )
    parser.add_argument(
        "--lowrank-basis", choices=("pca", "query"), default="pca",
        help="what the low-rank key bases are fitted for: pca (default) keeps the most of the keys themselves; "
        "query keeps the most of the attention logits q.k the calibration queries compute (the basis is "
        "weighted by the queries' second moment; the profile then ships an encoder beside each key basis). "
        "Values are fitted by pca either way",
    )
    parser.add_argument(
        "--key-rope", choices=(KEY_ROPE_DEFAULT, *KEY_ROPE_CHOICES), default=KEY_ROPE_DEFAULT,
        help="which keys the low-rank options see: pre: with the model's RoPE removed (a basis then holds keys "
        "2-3x closer at the same width; the profile stores such keys with pre_rope: true and attention restores "
        "them a block at a time); post: as the cache receives them, after RoPE, so attention can score the "
        "stored coefficients without restoring them; both: offer both, the search picks per group; auto "
        "(default): pre where the model's RoPE can be removed and --lowrank-basis is pca, else post. On SmolLM2 "
        "the search with pre stored more for a fifth of the damage on unseen text (README, 'Keys before RoPE')",
    )
    add_kv_options(
        parser, residual=False, auto=True,
        bits_help="write a profile that also quantizes the cache to this many bits (KIVI and rotated: 2, 3 or 4); "
        "quality is then measured, and the budget spent, with quantization on (the exact window is "
        "--residual-length). 'auto': choose the width of every layer's keys and values within the budget "
        "(a Fisher estimate orders the steps down from 4 bits, the runtime measures them; merging gets a quarter "
        "of the budget first)",
        scheme="rotated", sink_tokens=4,
        defaults_note="; rotated with 4 exact sink tokens is the default here because it measured best: on SmolLM2 at "
        "4,096 tokens and 4 bits, +0.28 %% perplexity against KIVI's +1.22 %% at the same bytes (README, Low-bit "
        "storage); --kv-scheme kivi --kv-sink-tokens 0 is the paper's storage",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing profile")
    parser.add_argument(
        "--allow-small-data", action="store_true",
        help="calibrate even when the data gives fewer than 4 calibration or 4 held-out windows (refused "
        "otherwise: the statistics and the quality interval would not be worth their promise)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


#: Above this perplexity budget the CLI says what it means (a relative budget of 1 is +100 %).
LARGE_BUDGET = 0.1


def _default_out(model: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name or model).strip("-") or "model"
    return Path(f"minicache-{name}")


def budget_from_args(args: argparse.Namespace):
    """The search's :class:`~minicache.calibrate.search.Budget`; ``--kl-guard auto`` resolved: a perplexity
    budget without ``--data`` is guarded (the built-in corpus stands in for text nobody has seen)."""
    from minicache.calibrate.search import Budget

    kl_guard = args.kl_guard
    if kl_guard is None:
        unseen = not args.data and args.budget_metric == "ppl_increase"
        kl_guard = D.kl_guard_without_data if unseen else D.kl_guard
    return Budget(args.budget_metric, args.budget, kl_guard)


def _kl_guard(text: str) -> float | None:
    """``--kl-guard``: a number, or ``auto`` (None: decided by whether --data is given)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or auto, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_group_size < 2:
        print("error: --max-group-size must be at least 2", file=sys.stderr)
        return 2
    for name in ("num_samples", "eval_windows", "max_length", "block_size", "probes"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    from minicache.calibrate.api import read_calibration_data, resolve_output
    from minicache.calibrate.data_check import check_data
    from minicache.methods import method_names
    from minicache.profile import Defaults

    try:
        budget = budget_from_args(args)
        defaults = Defaults(residual_length=args.residual_length, block_size=args.block_size)
        quantization = quantization_from_args(args, residual_length=args.residual_length)
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in method_names()] or ([] if methods else ["(none)"])
        if unknown:
            raise ValueError(f"--methods {unknown[0]} is not a registered merge method; allowed: "
                             f"{', '.join(method_names())}")
        samples = read_calibration_data(args.data) if args.data else None  # bad data: before the model loads
        if budget.metric == "ppl_increase" and budget.max > LARGE_BUDGET:
            print(f"warning: --budget {args.budget:g} accepts +{args.budget:.0%} perplexity (0.01 is +1 %)",
                  file=sys.stderr)
        profile_path, report_dir = resolve_output(args.out or _default_out(args.model))
        if profile_path.exists() and not args.force:
            raise FileExistsError(f"{profile_path} exists; pass --force to overwrite it")
        if samples is not None:  # too little data: also before the model loads (token counts estimated)
            check = check_data(samples, max_length=args.max_length, num_samples=args.num_samples,
                               eval_windows=args.eval_windows, held_out=D.held_out, seed=args.seed)
            check.enforce(args.allow_small_data, lambda line: print(line, file=sys.stderr))
    except (DataError, ProfileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    joined = _join_torchrun()  # data-parallel under torchrun: every process captures a share, rank 0 writes
    rank = _rank()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with output_lock(report_dir) if rank == 0 else contextlib.nullcontext():
            written, path, result = _run(args, budget, defaults, quantization, methods, profile_path, report_dir,
                                         started, write=rank == 0)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (DataError, ProfileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"report: {', '.join(str(p) for p in written)}")
    print(f"profile written to {path}")
    print(f"{result.summary} [{time.perf_counter() - started:.0f}s]")
    return 0


#: Prefix of the directory a report is written into before it is moved beside the profile.
STAGING_PREFIX = ".minicache-report-"


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM takes the same way out as Ctrl-C: nothing half-written


@contextlib.contextmanager
def output_lock(directory: Path):
    """Hold an exclusive lock on the output directory (created if missing, removed again if this run
    leaves it empty), so that two calibrations never write into one directory at the same time."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"another minicache-calibrate is writing into {directory}; wait for it") from None
        for stale in directory.glob(f"{STAGING_PREFIX}*"):  # a killed run's: no live run holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)
        if created and not any(directory.iterdir()):
            directory.rmdir()


def _join_torchrun() -> bool:
    """Join torchrun's process group when it started several processes (``WORLD_SIZE`` > 1 in the
    environment); gloo, since the CLI computes on the CPU. True when this call initialised it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _rank() -> int:
    """This process's rank in torch.distributed (0 when it is not initialised)."""
    if "torch" not in sys.modules:  # nothing can have initialised it: no need to import torch to say so
        return 0
    from minicache.methods.base import process_group

    group = process_group()
    return 0 if group is None else group[0]


def _run(args, budget, defaults, quantization, methods, profile_path: Path, report_dir: Path, started: float,
         write: bool = True):
    """Load the model, calibrate, and write the profile with its report; returns (report files, profile file,
    result). ``write=False`` (data-parallel ranks but 0): calibrate quietly, write nothing, return
    ``([], None, result)``."""
    import torch

    from minicache.calibrate.api import calibrate
    from minicache.calibrate.report import report_stem, write_report
    from minicache.model_spec import ModelSpec
    from minicache.models import load_model, resolve_model_source

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    source = resolve_model_source(args.model)
    if write:
        print(f"loaded {source.name_or_path} ({ModelSpec.from_config(model).num_layers} layers) in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    result = calibrate(
        model,
        tokenizer,
        args.data,
        model_name=source.name_or_path,
        budget=budget,
        preset=args.preset,
        num_samples=args.num_samples,
        max_length=args.max_length,
        eval_windows=args.eval_windows,
        seed=args.seed,
        defaults=defaults,
        probes=args.probes,
        align=args.align,
        max_group_size=args.max_group_size,
        quantization=quantization,
        methods=methods,
        allow_small_data=args.allow_small_data,
        auto_bits=args.kv_bits == "auto",
        method_options={"lowrank_basis": args.lowrank_basis},
        key_rope=args.key_rope,
        progress=write and not args.no_progress,
        log=(lambda line: print(line, flush=True)) if write else (lambda line: None),
    )
    if not write:
        return [], None, result
    # The report is written aside first and moved in after the profile: an interruption leaves the old
    # profile and report, or the new ones, never a report of another profile or half a report.
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=report_dir))
    try:
        staged = write_report(staging, result.profile, result.statistics, result.search, budget.metric,
                              budget.max, result.summary, stem=report_stem(profile_path), spectra=result.spectra,
                              kl_guard=budget.kl_guard)
        with _interrupts_deferred():  # renames take milliseconds: finish them rather than leave half
            path = result.profile.save(profile_path, overwrite=args.force)
            written = []
            for file in staged:
                os.replace(file, report_dir / file.name)
                written.append(report_dir / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written, path, result


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends (main thread only; elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            print("interrupt received while writing: the profile and its report were written in full",
                  file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
