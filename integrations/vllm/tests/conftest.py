"""Fixtures of the vLLM plugin's tests; they run in .venv-vllm (scripts/setup_vllm.sh), not .venv."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"  # minicache-convert runs in minicache's own venv
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct"


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vllm is not installed in this interpreter: run scripts/setup_vllm.sh and "
                                       "use .venv-vllm/bin/python")
        for item in items:
            item.add_marker(skip)


#: The quantized profile the tests serve: the shipped groups, every layer packed 4-bit (KIVI, keys per
#: channel in groups of 128 tokens, so vLLM's block size must be 128), exact sinks, keys packed pre-RoPE,
#: unmerged layers' recent windows held at 8 bits (their exact form is paged in tests/test_vllm_paged.py),
#: scales and zero points as 8-bit codes (fp16 ones are paged in tests/test_vllm_paged.py too).
QUANTIZED = ("Quantization(bits=4, group_size=128, residual_length=128, sink_tokens=4, pre_rope_keys=True, "
             "window_bits=8, scale_bits=8)")


def _convert(out: Path, profile: Path | None) -> Path:
    if not MAIN_PYTHON.exists():
        pytest.skip(f"{MAIN_PYTHON} is missing: run scripts/setup.sh first (minicache-convert writes the model)")
    cmd = [str(MAIN_PYTHON), "-m", "minicache.convert", "--model", "smollm2-135m", "--out", str(out),
           "--dtype", "bfloat16"]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct written by minicache-convert, bfloat16, no profile."""
    return _convert(tmp_path_factory.mktemp("vllm") / "smollm2", None)


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory) -> Path:
    """The same model with the shipped profile next to the weights."""
    return _convert(tmp_path_factory.mktemp("vllm") / "smollm2-minicache", PROFILE)


@pytest.fixture(scope="session")
def quantized_profile(tmp_path_factory) -> Path:
    """The shipped profile with :data:`QUANTIZED` storage, saved as a directory."""
    out = tmp_path_factory.mktemp("vllm") / "profile-4bit"
    code = ("import sys\nfrom minicache import MergeProfile\nfrom minicache.profile import Quantization\n"
            f"MergeProfile.load(sys.argv[1]).with_quantization({QUANTIZED}).save(sys.argv[2])")
    subprocess.run([str(MAIN_PYTHON), "-c", code, str(PROFILE), str(out)], check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory, quantized_profile) -> Path:
    """The model with the quantized profile next to the weights."""
    return _convert(tmp_path_factory.mktemp("vllm") / "smollm2-minicache-4bit", quantized_profile)
