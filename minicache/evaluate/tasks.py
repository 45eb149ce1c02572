"""Long-context tasks in the style of RULER (arXiv 2404.06654), generated offline and seeded.

Each prompt is one chat turn, ``[turn start] instruction · context … | question [turn end] answer
prefix``: the part before ``|`` goes through the cache first (and is compressed there), the question
and the greedy answer are computed against what the cache holds, as in the passkey task. A prompt
is exactly ``context_length`` tokens; its answer is correct when every expected string appears in
the generated text as a whole word (exact match, no partial credit).

Tasks (:data:`TASKS`), with the forms a 135M-parameter instruct model answers:

* ``niah_single`` – one ``special magic number`` for a key word, hidden in real prose;
* ``niah_multikey`` – four needles with different keys in real prose, one asked for;
* ``niah_multivalue`` – two numbers for the same key, both asked for;
* ``variable_tracking`` – ``VAR X = 12345`` and, elsewhere, ``VAR Y = VAR X`` among filler: which
  variables hold the value (the answer is opened with ``VAR X and VAR``: the model names Y);
* ``common_words`` – a numbered list of words, two thirds of them one word: which is the most
  common (not in the default suite: SmolLM2-135M does no better than chance at it);
* ``qa_quote`` – few-shot over a long passage of real prose: two solved examples of continuing a
  quote from it, then the assistant opens a six-word quote and must continue with the next three.

Haystacks and passages are the prose records of the built-in corpus (Jane Austen, State of the
Union addresses; see ``minicache/calibrate/corpus/SOURCES.md``). Everything is seeded by
``(seed, task, length, sample)``, so adding a length or a task leaves the other prompts unchanged.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache

import torch
from transformers import DynamicCache

from minicache.calibrate.corpus import DEFAULT_CORPUS
from minicache.evaluate.passkey import greedy_answer, template_parts
from minicache.runtime.memory import cache_bytes, compression_ratio

#: Key words of the needles (common nouns, each a few tokens at most).
KEYS = (
    "apple", "river", "candle", "garden", "window", "violin", "harbor", "pencil", "lantern", "meadow",
    "copper", "island", "mirror", "falcon", "saddle", "orchard", "canyon", "ribbon", "basket", "glacier",
)
#: Words of the common-word lists.
WORDS = (
    "table", "cloud", "stone", "music", "paper", "horse", "bread", "chair", "light", "water", "plant",
    "clock", "sugar", "shirt", "bottle", "tiger", "wheel", "honey", "train", "cotton", "forest", "metal",
    "pocket", "spoon", "engine", "butter", "circle", "letter", "market", "signal",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TaskPrompt:
    """One task prompt, tokenized.

    Attributes
    ----------
    task : str
        A key of :data:`TASKS`.
    context_length : int
        Total tokens, ``len(context_ids) + len(question_ids)``.
    sample : int
        Index of the prompt within its (task, length) cell.
    context_ids, question_ids : tuple of int
        What goes through the cache first; then the question, end of turn and answer prefix.
    answers : tuple of str
        Every one must appear in the answer as a whole word.
    max_new_tokens : int
        Greedy tokens generated for the answer.
    """

    task: str
    context_length: int
    sample: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if len(self.context_ids) + len(self.question_ids) != self.context_length:
            raise ValueError(f"{self.task} prompt of {len(self.context_ids)} + {len(self.question_ids)} tokens, "
                             f"not {self.context_length}")
        if not self.answers or self.max_new_tokens < 1:
            raise ValueError(f"{self.task} prompt without an answer or answer tokens")


def score_answer(answer: str, expected: Sequence[str]) -> bool:
    """Whether every expected string appears in ``answer`` as a whole word (case-sensitive).

    ``"is 4821937."`` contains ``"4821937"``; ``"48219370"`` and ``"482193"`` do not.
    """
    return all(re.search(rf"(?<![\w]){re.escape(e)}(?![\w])", answer) for e in expected)


# ---- building ------------------------------------------------------------------------------------
@cache
def _prose() -> tuple[str, ...]:
    """Sentences of the built-in corpus's prose records, in order."""
    sentences: list[str] = []
    with open(DEFAULT_CORPUS, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("kind") == "prose":
                text = " ".join(record["text"].split())
                sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if 3 <= len(s.split()) <= 60]
    return tuple(sentences)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


@dataclass(frozen=True)
class _Spec:
    """What a task generator returns: text pieces; the builder fills and cuts to the length."""

    instruction: str
    inserts: list[str]  # placed at evenly spread depths in the filler, in order
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int
    filler: str = "prose"  # "prose" (real sentences) or "noise" (repeated sentences) or "none"
    items: list[str] | None = None  # the whole body instead of filler (common_words): cut from the end


_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _niah_single(rng: random.Random) -> _Spec:
    key, value = rng.choice(KEYS), _number(rng)
    return _Spec(
        "A special magic number is hidden in the text below. Memorize it: I will ask for it.",
        [f"The special magic number for {key} is: {value}."],
        f"What is the special magic number for {key} in the text above?",
        f"The special magic number for {key} is", (value,), 12,
    )


def _niah_multikey(rng: random.Random) -> _Spec:
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    asked = rng.randrange(len(keys))
    return _Spec(
        "Special magic numbers for several words are hidden in the text below. Memorize them: I will ask for one.",
        [f"The special magic number for {k} is: {v}." for k, v in zip(keys, values, strict=True)],
        f"What is the special magic number for {keys[asked]} in the text above?",
        f"The special magic number for {keys[asked]} is", (values[asked],), 12,
    )


def _niah_multivalue(rng: random.Random) -> _Spec:
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(2)]
    return _Spec(
        "Two special magic numbers for one word are hidden in the text below. Memorize them: I will ask for both.",
        [f"One of the special magic numbers for {key} is: {v}." for v in values],
        f"What are the two special magic numbers for {key} in the text above?",
        f"The two special magic numbers for {key} are", tuple(values), 24,
    )


def _variable_tracking(rng: random.Random) -> _Spec:
    names = ["".join(rng.choice(_LETTERS) for _ in range(5)) for _ in range(2)]
    value = str(rng.randrange(10_000, 100_000))
    inserts = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, 2)]
    return _Spec(
        "Memorize the variable assignments in the text below. I will ask which variables hold a value.",
        [f" {s} ." for s in inserts],
        f"Find all variables that are assigned the value {value} in the text above.",
        f"According to the chain of variable assignments in the text above, 2 variables are assigned the value "
        f"{value}, they are: VAR {names[0]} and VAR", (names[1],), 12, filler="noise",
    )


def _common_words(rng: random.Random) -> _Spec:
    words = rng.sample(WORDS, len(WORDS))
    common, rare = words[:1], words[1:]
    # two items in three are the common word wherever the list is cut; the others are spread over
    # 29 words, so the common one is about 20 times as frequent as any other
    pool = [w for _ in range(400) for w in (common[0], common[0], rng.choice(rare))]
    rng.shuffle(pool)
    return _Spec(
        "Below is a numbered list of words. One of them appears much more often than the others.",
        [], "What is the most common word in the list above?",
        "The most common word in the list is", tuple(common), 8, filler="none", items=pool,
    )


def _qa_quote(rng: random.Random) -> _Spec:
    return _Spec("Read the passage below carefully. I will ask about its exact wording.", [], "", "", (), 8,
                 filler="quote")


#: Task name -> generator of its text pieces.
TASKS: dict[str, Callable[[random.Random], _Spec]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "qa_quote": _qa_quote,
}


def _quote_question(rng: random.Random, passage: list[str]) -> tuple[str, str, tuple[str, ...]]:
    """Two solved examples and a question about the passage's wording: ``(question, prefix, answer)``."""
    picks = rng.sample([s for s in passage if len(s.split()) >= 10], 3)

    def split(sentence: str) -> tuple[str, str]:
        words = sentence.split()
        start = rng.randrange(0, len(words) - 9)
        return " ".join(words[start : start + 6]), " ".join(words[start + 6 : start + 9])

    shots = [split(s) for s in picks]
    lines = [f'Continue a quote from the passage above: "{q} {a}"' for q, a in shots[:2]]
    question, answer = shots[2]
    lines.append("Continue a quote from the passage above.")
    return "\n".join(lines), f'"{question}', (answer,)


def make_task_prompt(tokenizer, task: str, context_length: int, *, seed: int = 0, sample: int = 0) -> TaskPrompt:
    """One prompt of ``task``, exactly ``context_length`` tokens.

    Raises
    ------
    ValueError
        Unknown task, or a length too short for the task's fixed parts.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"minicache-task:{seed}:{task}:{context_length}:{sample}")
    spec = TASKS[task](rng)
    parts = template_parts(tokenizer)
    before, after = parts if parts is not None else ("", "\n\n")
    head = _ids(tokenizer, before + spec.instruction + "\n\n")
    if spec.filler == "quote":
        sentences = _prose()
        start = rng.randrange(len(sentences))
        passage = list(sentences[start:] + sentences[:start])
        budget = context_length - len(head) - 120  # room for the question (checked below)
        kept, used = [], 0
        for s in passage:
            n = len(_ids(tokenizer, " " + s))
            if used + n > budget:
                break
            kept.append(s)
            used += n
        question, prefix, answers = _quote_question(rng, kept[:-3])  # the last few may be cut below
        tail = _ids(tokenizer, "\n\n" + question + after + prefix)
        body = _ids(tokenizer, " ".join(kept))
        room = context_length - len(head) - len(tail)
        if room < 0 or len(body) < room // 2:
            raise ValueError(f"context length {context_length} is too short for {task}")
        body = (body + _ids(tokenizer, " " + _NOISE) * (room // 10 + 1))[:room]  # pad the last few tokens
        quoted = prefix.removeprefix('"') + " " + answers[0]
        if quoted not in tokenizer.decode(body):
            raise ValueError(f"{task}: the quoted words fell outside the passage at length {context_length}")
        return TaskPrompt(task, context_length, sample, tuple(head + body), tuple(tail), answers, spec.max_new_tokens)

    tail = _ids(tokenizer, "\n\n" + spec.question + after + spec.answer_prefix)
    room = context_length - len(head) - len(tail)
    if spec.items is not None:  # a numbered list, as long as fits
        body: list[int] = []
        listed = 0
        for word in spec.items:
            piece = _ids(tokenizer, f"{listed + 1}. {word}\n")
            if len(body) + len(piece) > room:
                break
            body += piece
            listed += 1
        body += [_ids(tokenizer, "\n")[0]] * (room - len(body))
        counts = {w: spec.items[:listed].count(w) for w in set(spec.items)}
        top = sorted(counts.values(), reverse=True)
        if len(top) > 1 and top[0] < 3 * top[1]:  # too short for the common word to stand out
            raise ValueError(f"context length {context_length} is too short for {task}")
        return TaskPrompt(task, context_length, sample, tuple(head + body), tuple(tail), spec.answers,
                          spec.max_new_tokens)
    inserts = [_ids(tokenizer, " " + text) for text in spec.inserts]
    if spec.filler == "noise":
        units = [_ids(tokenizer, " " + _NOISE)]
    else:
        sentences = _prose()
        start = rng.randrange(len(sentences))
        units = [_ids(tokenizer, " " + s) for s in sentences[start : start + 400]]
    filler_room = room - sum(len(i) for i in inserts)
    filler: list[list[int]] = []
    used, k = 0, 0
    while used < filler_room:
        unit = units[k % len(units)]
        filler.append(unit)
        used += len(unit)
        k += 1
    if filler_room <= 0 or len(filler) < len(inserts) + 1:
        raise ValueError(f"context length {context_length} is too short for {task}")
    # needles at seeded depths, in order, between whole filler sentences
    slots = sorted(rng.sample(range(1, len(filler)), len(inserts)))
    body = []
    for i, unit in enumerate(filler):
        for slot, insert in zip(slots, inserts, strict=True):
            if slot == i:
                body += insert
        body += unit
    # cut the filler's end to the exact length, never a needle
    excess = len(body) - room
    last_needle = max(_find(body, insert) + len(insert) for insert in inserts)
    if excess > 0:
        if len(body) - excess < last_needle:
            raise ValueError(f"context length {context_length} is too short for {task}")
        body = body[:room]
    return TaskPrompt(task, context_length, sample, tuple(head + body), tuple(tail), spec.answers, spec.max_new_tokens)


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise ValueError("needle not found")


def make_task_prompts(tokenizer, tasks: Sequence[str], context_lengths: Sequence[int], samples: int,
                      seed: int = 0) -> list[TaskPrompt]:
    """``samples`` prompts per (task, length), tasks outermost."""
    return [make_task_prompt(tokenizer, t, n, seed=seed, sample=i)
            for t in tasks for n in context_lengths for i in range(samples)]


# ---- running -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskMethod:
    """A cache to test: ``make_cache(model)`` gives a fresh cache; ``prefill_context(model)``, if any,
    is entered around the context's forward pass (a kvpress press)."""

    label: str
    make_cache: Callable[[object], object]
    prefill_context: Callable[[object], object] | None = None


@dataclass(frozen=True)
class TaskRecord:
    """One method's answer to one prompt."""

    method: str
    task: str
    context_length: int
    sample: int
    expected: tuple[str, ...]
    answer: str
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def run_tasks(model, tokenizer, prompts: Sequence[TaskPrompt], methods: Sequence[TaskMethod], *,
              progress: Callable[[str], None] | None = None) -> tuple[list[TaskRecord], dict]:
    """Every method answers every prompt (one prompt at a time: prompts differ in their split).

    The context's keys and values are computed once with a `DynamicCache` and replayed into each
    method's cache (exact prefill, as in the passkey task), except for methods with a prefill
    context, which run the context themselves.

    Returns
    -------
    records : list of TaskRecord
    compression : dict
        ``{method: {task: compression ratio after the answer}}``.
    """
    device = next(model.parameters()).device
    records: list[TaskRecord] = []
    held: dict[tuple[str, str], list[int]] = {}
    for n, prompt in enumerate(prompts, 1):
        context = torch.tensor([prompt.context_ids], device=device)
        question = torch.tensor([prompt.question_ids], device=device)
        prefilled = DynamicCache(config=model.config)
        model(input_ids=context, cache=prefilled)
        for method in methods:
            cache = method.make_cache(model)
            if method.prefill_context is None:
                for idx, layer in enumerate(prefilled.layers):
                    cache.update(layer.keys, layer.values, idx)
            else:
                with method.prefill_context(model):
                    model(input_ids=context, cache=cache)
            ids = greedy_answer(model, cache, question, context.shape[1], prompt.max_new_tokens)
            seen = prompt.context_length + prompt.max_new_tokens - 1
            kv, full = cache_bytes(cache, model.config, 1, next(model.parameters()).dtype, seen=seen)
            sums = held.setdefault((method.label, prompt.task), [0, 0])
            sums[0] += kv
            sums[1] += full
            text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
            records.append(TaskRecord(method.label, prompt.task, prompt.context_length, prompt.sample,
                                      prompt.answers, text, score_answer(text, prompt.answers)))
        if progress is not None and (n % 10 == 0 or n == len(prompts)):
            progress(f"{n}/{len(prompts)} prompts")
    compression: dict[str, dict[str, float]] = {}
    for (label, task), (kv, full) in held.items():
        compression.setdefault(label, {})[task] = compression_ratio(full, kv)
    return records, compression


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``hits / n`` (well-behaved at 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def task_table(records: Sequence[TaskRecord]) -> dict:
    """``{method: {task: {length: {"accuracy", "n", "ci95"}}}}`` (lengths as strings, for JSON)."""
    cells: dict[tuple[str, str, int], list[bool]] = {}
    for r in records:
        cells.setdefault((r.method, r.task, r.context_length), []).append(r.correct)
    table: dict = {}
    for (method, task, length), hits in cells.items():
        table.setdefault(method, {}).setdefault(task, {})[str(length)] = {
            "accuracy": sum(hits) / len(hits), "n": len(hits), "ci95": list(wilson_interval(sum(hits), len(hits))),
        }
    return table
