"""Sample data for calibration and evaluation: JSON Lines or plain text, validated before any model loads.

Accepted JSON Lines records (one JSON object per line, blank lines ignored):

* ``{"text": "..."}`` – plain text;
* ``{"messages": [{"role": "user", "content": "..."}, ...]}`` – a chat, rendered with the
  tokenizer's chat template;
* ``{"input_ids": [1, 2, 3]}`` – already tokenized.

A ``.txt`` file is one text; calibration splits it into samples of whole paragraphs
(``read_samples(..., split_text=True)``), so that one part of it calibrates and another verifies.
Data flows one way: samples → token windows → capture/evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where windows are made: command-line tools parse arguments first
    import torch

_FIELDS = ("text", "messages", "input_ids")
# A generous bound on characters per token: texts longer than this many characters per token
# needed are cut before tokenizing (a 10 MB line is not tokenized whole for two windows).
_CHARS_PER_TOKEN_BOUND = 64


class DataError(ValueError):
    """Bad sample data; the message names the file and line."""


@dataclass(frozen=True)
class Sample:
    """One validated record. Exactly one of ``text``, ``messages``, ``input_ids`` is set."""

    line: int
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    input_ids: tuple[int, ...] | None = None
    source: str | None = None

    @property
    def where(self) -> str:
        """``file:line`` (or ``line N``) for messages."""
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"

    def tokenize(self, tokenizer, max_tokens: int | None = None) -> list[int]:
        """Token ids; ``max_tokens`` bounds the work on a huge text (its tail is not tokenized)."""
        if self.input_ids is not None:
            return list(self.input_ids)
        if self.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(
                    f"{self.where}: 'messages' needs a tokenizer with a chat template; this one has none"
                )
            ids = tokenizer.apply_chat_template(list(self.messages), tokenize=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        text = self.text
        if max_tokens is not None and len(text) > _CHARS_PER_TOKEN_BOUND * max_tokens:
            # No tokenizer makes tokens longer than this on average: the cut keeps every token needed.
            text = text[: _CHARS_PER_TOKEN_BOUND * max_tokens]
        return tokenizer(text, add_special_tokens=True, verbose=False).input_ids


def _validate_record(record: object, where: str) -> Sample:
    line = int(where.rsplit(":", 1)[-1])
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with one of {_FIELDS}, got {type(record).__name__}")
    present = [f for f in _FIELDS if f in record]
    if len(present) != 1:
        found = ", ".join(sorted(record)) or "no keys"
        raise DataError(f"{where}: expected exactly one of the fields {_FIELDS}; found {found}")
    field = present[0]
    value = record[field]
    if field == "text":
        if not isinstance(value, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: 'text' is empty")
        return Sample(line=line, text=value)
    if field == "messages":
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["content"].strip() for m in value):
            raise DataError(f"{where}: every message's 'content' is empty")
        return Sample(line=line, messages=tuple(value))
    # bool is an int in Python, but [true, false] are not token ids.
    if not isinstance(value, list) or not value or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        raise DataError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
    return Sample(line=line, input_ids=tuple(value))


#: Characters per sample when a plain text is split (about 750 tokens of English).
TEXT_SAMPLE_CHARS = 3000


def split_text(text: str, chars: int = TEXT_SAMPLE_CHARS) -> list[Sample]:
    """Cut plain text into samples of whole paragraphs (blank-line separated), at least ``chars``
    characters each (the last may be shorter); a paragraph longer than twice that is cut at lines.
    Each sample's ``line`` is the line its text starts on."""
    pieces: list[tuple[int, str]] = []  # (first line, text) of paragraphs, or of lines of long ones
    line, paragraph, start = 1, [], 1
    for raw in text.splitlines(keepends=True):
        if raw.strip():
            if not paragraph:
                start = line
            paragraph.append(raw)
        elif paragraph:
            pieces.append((start, "".join(paragraph)))
            paragraph = []
        line += 1
    if paragraph:
        pieces.append((start, "".join(paragraph)))
    cut: list[tuple[int, str]] = []
    for first, piece in pieces:
        if len(piece) <= 2 * chars:
            cut.append((first, piece))
            continue
        for offset, one in enumerate(piece.splitlines(keepends=True)):
            cut.append((first + offset, one))
    samples: list[Sample] = []
    buffer: list[str] = []
    first = 1
    for at, piece in cut:
        if not buffer:
            first = at
        buffer.append(piece)
        if sum(map(len, buffer)) >= chars:
            samples.append(Sample(line=first, text="\n".join(buffer)))
            buffer = []
    if buffer:
        samples.append(Sample(line=first, text="\n".join(buffer)))
    return samples


def read_samples(path: str | os.PathLike, *, split_text_files: bool = False) -> list[Sample]:
    """Read and validate every record of a ``.jsonl``/``.json`` or ``.txt`` file.

    ``split_text_files``: a ``.txt`` file becomes several samples of whole paragraphs
    (:func:`split_text`) instead of one, as calibration needs (a part calibrates, a part verifies).

    Raises
    ------
    DataError
        With ``file:line`` for bad JSON, a missing field, an empty text, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        samples = split_text(text) if split_text_files else [Sample(line=1, text=text)]
        return [replace(sample, source=str(path)) for sample in samples]
    samples = []
    with path.open("rb") as handle:
        for number, raw_bytes in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                hint = ""
                if not samples and path.suffix not in (".jsonl", ".json"):  # likely plain text by another name
                    hint = f"; plain text is read from a file whose name ends in .txt (this one: {path.name!r})"
                raise DataError(f"{where}: not valid JSON ({err.msg}; column {err.colno}){hint}") from None
            samples.append(replace(_validate_record(record, where), source=str(path)))
    if not samples:
        raise DataError(f"{path}: no records (expected JSON Lines with one of {_FIELDS} per line)")
    return samples


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_samples(samples: list[Sample], held_out: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split into (calibration, held-out) parts, both non-empty when there are 2+ samples."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_held = min(len(samples) - 1, max(1, round(len(samples) * held_out))) if len(samples) > 1 else 0
    held = sorted(order[:n_held])
    calib = sorted(order[n_held:])
    return [samples[i] for i in calib], [samples[i] for i in held]


#: With ``spread``, :func:`token_windows` chooses among the windows of at most this many times the
#: tokens it needs (bounds the tokenizing of a large data file).
SPREAD_FACTOR = 16


def token_windows(
    samples: list[Sample], tokenizer, length: int, max_windows: int | None = None, *, spread: bool = False
) -> torch.Tensor:
    """Cut the samples' tokens into non-overlapping windows of ``length`` tokens.

    Samples are joined into one stream separated by the EOS token, as in language-model
    pre-training, so short samples still contribute.

    Parameters
    ----------
    spread : bool
        With ``max_windows``: take the windows evenly spaced over the data (at most
        :data:`SPREAD_FACTOR` times the tokens needed are read) instead of its first tokens, so that
        data made of several kinds of text is represented by all of them.

    Returns
    -------
    torch.Tensor
        ``[num_windows, length]`` int64 token ids (possibly zero windows).
    """
    wanted = max_windows
    if spread and max_windows is not None:
        max_windows = max_windows * SPREAD_FACTOR
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = len(tokenizer)
    for sample in samples:
        needed = None if max_windows is None else length * max_windows - len(stream)
        ids = sample.tokenize(tokenizer, max_tokens=needed)
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise DataError(f"{sample.where}: token id {bad[0]} is outside the vocabulary (size {vocab})")
        stream.extend(ids + separator)
        if max_windows is not None and len(stream) >= length * max_windows:
            break
    count = len(stream) // length
    if max_windows is not None:
        count = min(count, max_windows)
    import torch

    windows = torch.tensor(stream[: count * length], dtype=torch.long).view(count, length)
    if wanted is not None and count > wanted:  # spread: the middle window of each of `wanted` equal stretches
        windows = windows[[(2 * i + 1) * count // (2 * wanted) for i in range(wanted)]]
    return windows
