"""A shipped profile is untrusted input (issue 16): hostile or broken files give one clear line, fast,
in bounded memory, through the loader and through every command that reads a profile."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicache.profile import MAX_PROFILE_DEPTH, MergeProfile, ProfileError

ROOT = Path(__file__).resolve().parents[1]

# 9 ** 6 ≈ 531,000 list items from under 400 bytes, if aliases were expanded.
ALIAS_BOMB = (
    "format_version: 2\ncalibration:\n"
    "  a: &a [x, x, x, x, x, x, x, x, x]\n"
    "  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "  f: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
)

CASES = {
    "alias bomb": (ALIAS_BOMB, "line 3: a YAML anchor or alias; allowed: plain YAML without anchors"),
    "nesting 500 deep": (
        "format_version: 2\ncalibration: " + "[" * 500 + "]" * 500 + "\n",
        f"nested deeper than {MAX_PROFILE_DEPTH} levels",
    ),
    "duplicate key": (
        "format_version: 2\ngroups: [{layers: [1, 2]}]\ngroups: []\n",
        "line 3: duplicate key 'groups' (first on line 2); allowed: each key once",
    ),
    "duplicate nested key": (
        "format_version: 2\ngroups:\n  - layers: [1, 2]\n    keys: {t: 0.5, t: 0.6}\n",
        "line 4: duplicate key 't'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_yaml_is_refused_at_once(tmp_path, case):
    text, message = CASES[case]
    path = tmp_path / "minicache_config.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ProfileError) as err:
        MergeProfile.load(path)
    assert time.perf_counter() - started < 2.0
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_the_alias_bomb_stays_in_bounded_memory(tmp_path):
    """In a process limited to 1.5 GiB of address space (the bomb expands to gigabytes unbounded)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))\n"
        "from minicache.profile import MergeProfile, ProfileError\n"
        "try:\n"
        f"    MergeProfile.load({str(path)!r})\n"
        "except ProfileError as err:\n"
        "    print('refused:', err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "anchor or alias" in proc.stdout


@pytest.mark.parametrize("encoding", ["utf-16", "binary"])
def test_a_profile_that_is_not_utf8_names_the_file(tmp_path, encoding):
    path = tmp_path / "p.yaml"
    if encoding == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.write_text("format_version: 2\n", encoding="utf-16")
    with pytest.raises(ProfileError, match=rf"^{path}: not UTF-8 text \(.* at byte \d+\)"):
        MergeProfile.load(path)


def test_an_oversized_profile_is_not_parsed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("format_version: 2\ncalibration: {note: '" + "x" * (5 * 2**20) + "'}\n")
    started = time.perf_counter()
    with pytest.raises(ProfileError, match=r"bytes; allowed: a profile of at most 4 MiB"):
        MergeProfile.load(path)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("command", ["eval", "demo", "bench"])
def test_commands_refuse_a_hostile_profile_with_one_line(tmp_path, capsys, command):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    if command == "eval":
        from minicache.evaluate.cli import main

        data = tmp_path / "text.txt"
        data.write_text("some text to score")
        code = main(["--profile", str(path), "--data", str(data)])
    elif command == "demo":
        from minicache.demo import main

        code = main(["--profile", str(path), "--model", str(tmp_path / "missing")])
    else:
        from minicache.evaluate.bench_cli import main

        code = main(["--profile", str(path), "--model-shape", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "anchor or alias" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
