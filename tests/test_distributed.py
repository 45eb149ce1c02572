"""Data-parallel calibration: two gloo processes on the CPU calibrate like one process.

Each process captures its share of the calibration windows; the sums all-reduce, rank 0 measures the
held-out quality for every process, and the profile is the single process's up to summation order.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minicache.profile import Defaults, MergeProfile

#: Calibrations run by both the two processes and one: the windows a case captures, and its arguments.
CASES = {
    # 5 batches of 2: the fit sees 4 windows (2 per process), the candidates are measured on 5 (3 + 2)
    "search": (9, dict(num_samples=9, batch_size=2)),
    # 1 batch: fit and measurement share its 3 windows (2 + 1), as on one process
    "one batch": (3, dict(num_samples=3, batch_size=4)),
    # no search: the paper's groups, aligned on all 5 windows (3 + 2)
    "preset": (5, dict(preset="paper", num_samples=5, batch_size=2)),
    # the low-rank method too: its streamed second moments all-reduce, its bases come from their sum
    "lowrank": (9, dict(num_samples=9, batch_size=2, methods=("slerp", "lowrank"))),
}
#: Sums of float32 KV in float64, in another order and from other batch shapes: agree to ~1e-7.
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(3, 128, (96,), generator=g).tolist()}) + "\n"
                            for _ in range(24)))
    return path


def _calibrate_all(data: str) -> dict:
    from transformers import AutoModelForCausalLM

    from minicache.calibrate.api import calibrate
    from minicache.calibrate.search import Budget
    from tests.test_plugins import TinyTokenizer
    from tests.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=4)).eval()
    out = {}
    for name, (_, kwargs) in CASES.items():
        lines: list[str] = []
        result = calibrate(model, TinyTokenizer(), data, budget=Budget("ppl_increase", 10.0), max_length=96,
                           eval_windows=3, defaults=Defaults(residual_length=16, block_size=16), probes=3,
                           allow_small_data=True,
                           progress=False, log=lines.append, **kwargs)
        tensors = result.profile.tensors
        out[name] = {
            "profile": result.profile.to_dict(),
            "tensors": {n: tensors[n] for n in tensors.names()} if tensors is not None else {},
            "statistics": result.statistics.sums(),
            "log": lines,
        }
    return out


def _worker(rank: int, world: int, port: int, data: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_calibrate_all(data), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _without_measured(profile: dict) -> dict:
    calibration = {k: v for k, v in profile["calibration"].items() if k != "measured"}
    return {**profile, "calibration": calibration}


def test_two_processes_calibrate_like_one(tmp_path):
    data = str(_write_data(tmp_path / "ids.jsonl"))
    mp.spawn(_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _calibrate_all(data)
    finally:
        torch.set_num_threads(threads)

    for name, (windows, _) in CASES.items():
        one, (r0, r1) = single[name], (ranks[0][name], ranks[1][name])
        # Every process holds the same result, to the bit: same sums, same decisions, rank 0's measurements.
        assert r0["profile"] == r1["profile"], name
        assert r0["tensors"].keys() == r1["tensors"].keys(), name
        assert all(torch.equal(r0["tensors"][n], r1["tensors"][n]) for n in r0["tensors"]), name
        assert all(torch.equal(r0["statistics"][n], r1["statistics"][n]) for n in r0["statistics"]), name

        # Each process captured only its share (every second window of each phase) ...
        shares = []
        for rank, result in enumerate((r0, r1)):
            lines = [line for line in result["log"] if line.startswith("data-parallel:")]
            assert len(lines) == 1, (name, result["log"])
            share = re.fullmatch(rf"data-parallel: process {rank} of 2 captures (\d+) of (\d+) calibration windows",
                                 lines[0])
            assert share and int(share[2]) == windows, (name, lines)
            shares.append(int(share[1]))
        assert sum(shares) == windows and max(shares) <= math.ceil(windows / 2) + 1, (name, shares)
        assert not any(line.startswith("data-parallel:") for line in one["log"]), name
        # ... and together they counted every token once: no window twice, none left out.
        assert torch.equal(r0["statistics"]["tokens"], one["statistics"]["tokens"]), name
        for stat, tensor in one["statistics"].items():
            torch.testing.assert_close(r0["statistics"][stat], tensor, rtol=RTOL, atol=1e-9, msg=f"{name}: {stat}")

        # The profile is the single process's: same groups, settings and provenance; fitted rotations and
        # measured figures up to summation order.
        assert _without_measured(r0["profile"]) == _without_measured(one["profile"]), name
        for key, value in one["profile"]["calibration"]["measured"].items():
            assert r0["profile"]["calibration"]["measured"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                (name, key)
        assert r0["tensors"].keys() == one["tensors"].keys() and one["tensors"], name
        for n, tensor in one["tensors"].items():
            torch.testing.assert_close(r0["tensors"][n], tensor, rtol=0, atol=1e-5, msg=f"{name}: {n}")


def test_cli_under_torchrun_writes_once(tmp_path):
    """``torchrun --nproc_per_node 2 -m minicache.calibrate.cli``: both processes calibrate, rank 0 writes."""
    from tests.test_models import write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran"]
    g = torch.Generator().manual_seed(1)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"text": " ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist())})
        + "\n" for _ in range(24)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "minicache.calibrate.cli", "--model", str(model),
               "--data", str(data), "--out", str(out), "--max-length", "48", "--num-samples", "6",
               "--eval-windows", "2", "--probes", "2", "--budget", "10", "--residual-length", "8",
               "--block-size", "8", "--no-progress", "--allow-small-data"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    # One process printed the run (rank 0's share), and the profile loads.
    assert done.stdout.count("profile written to") == 1, done.stdout
    assert re.search(r"data-parallel: process 0 of 2 captures 3 of 6 calibration windows", done.stdout), done.stdout
    assert "process 1 of 2" not in done.stdout
    profile = MergeProfile.load(out / "minicache_config.yaml")
    assert profile.calibration["data"]["tokens"] == 6 * 48
    assert not list(out.glob(".minicache-report-*"))
