"""The default calibration corpus, shipped with minicache.

``default.jsonl`` holds 64 records of real, human-written text (about 87,000 tokens of the SmolLM2
tokenizer) of four kinds, interleaved in the file (prose, docs, code, chat, prose, ...) so that
any prefix of it and any random held-out part have every kind:

* ``prose`` – chapters of Jane Austen's novels and State of the Union addresses (public domain);
* ``docs`` – the Python 3.11 tutorial and HOWTOs, reStructuredText sources (PSF licence);
* ``code`` – Python standard library modules (PSF licence), node-semver (ISC) and SQLite's
  ``sqlite3.h`` (public domain);
* ``chat`` – Python FAQ questions and answers as user/assistant turns (PSF licence).

Each line is ``{"kind": ..., "source": ..., "text": ...}`` or, for chat, ``{"kind": "chat",
"source": ..., "messages": [...]}``; :func:`minicache.data.read_samples` reads it (the extra keys
are ignored). ``SOURCES.md`` beside it gives every source, its licence and the attributions;
``scripts/build_default_corpus.py`` rebuilds it from the packages it names.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEFAULT_CORPUS", "SOURCES", "kinds"]

#: The default calibration corpus (JSON Lines).
DEFAULT_CORPUS: Path = Path(__file__).with_name("default.jsonl")
#: Its sources and licences.
SOURCES: Path = Path(__file__).with_name("SOURCES.md")


def kinds(path: str | Path = DEFAULT_CORPUS) -> dict[str, int]:
    """Records per kind (``prose``, ``docs``, ``code``, ``chat``), in order of first appearance."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                kind = json.loads(line).get("kind", "unknown")
                counts[kind] = counts.get(kind, 0) + 1
    return counts
