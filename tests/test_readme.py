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


def command_lines(markdown: str) -> list[str]:
    """Every ``minicache-*`` command of the fenced ```bash blocks: continuation lines joined, comments dropped, and
    ``[--option value]`` (the README's notation for an optional part) unbracketed."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s#.*$", "", command).strip()
            if command.startswith("minicache-"):
                lines.append(re.sub(r"\[(--[^\]]*)\]", r"\1", command))
    return lines


def test_every_readme_command_line_parses_with_its_tool():
    # The README's command lines are not run (they need data and minutes), but each must still be accepted by its
    # tool's parser: a renamed or removed option would otherwise leave the README quietly wrong.
    import shlex

    from minicache import convert, demo
    from minicache.calibrate import cli as calibrate_cli
    from minicache.evaluate import bench_cli
    from minicache.evaluate import cli as eval_cli

    parsers = {"minicache-calibrate": calibrate_cli, "minicache-eval": eval_cli, "minicache-bench": bench_cli,
               "minicache-convert": convert, "minicache-demo": demo}
    commands = command_lines((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 20 and any("--kv-compact" in c for c in commands)
    for command in commands:
        tool, *argv = shlex.split(command)
        parser = parsers[tool].build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            raise AssertionError(f"the README's command does not parse: {command}") from exit_


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
