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
