"""The README's Python blocks run verbatim from the repository root (issue 22)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    """Every fenced ```python block of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_the_readme_has_python_blocks_that_compile():
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "the README shows Python"
    for block in blocks:
        compile(block, "README.md", "exec")
    assert "calibrate(" in "".join(blocks) and "sample.jsonl" not in "".join(blocks), "runnable on shipped data"


@pytest.mark.slow  # loads SmolLM2, generates, and calibrates on the shipped data: ~6 minutes on 2 cores
def test_the_readme_python_blocks_run_verbatim(smollm2):
    code = "\n".join(python_blocks((ROOT / "README.md").read_text(encoding="utf-8")))
    out_dir = ROOT / "my-smollm2-profile"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = re.search(r"(\d+) groups merged \[", proc.stdout)
        assert summary and int(summary.group(1)) >= 1, proc.stdout[-3000:]
        assert (out_dir / "minicache_config.yaml").is_file()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
