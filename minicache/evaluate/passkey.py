"""Passkey retrieval: a number hidden at a controlled depth in filler text, asked for at the end.

The long-context check of DESIGN.md §5 (Landmark Attention / LongLoRA style). A prompt is

    [chat turn start] instruction · filler · … · NEEDLE · … · filler | question [turn end, answer prefix]

with the needle ``"The pass key is 68203. Remember it. 68203 is the pass key."`` placed after a
fraction ``depth`` of the filler, and the whole prompt exactly ``context_length`` tokens long. The
part before ``|`` (the *context*) goes through the cache first; the question and the answer are
then computed against what the cache stores, so merged layers are read back through the merge
(prefill attention itself is always exact, DESIGN.md §2). The answer is ``max_new_tokens`` greedy
tokens; it is correct when the first number in it is exactly the passkey.

Every method of a run answers the same prompts. Because a fresh cache's prefill attends exact KV,
the context's keys and values are the same whatever the cache: they are computed once with a
`DynamicCache` and handed to each method's cache through ``Cache.update``, layer by layer, as the
model itself would (``share_prefill``; a test checks this equals running the model per cache).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from minicache.evaluate.quality import continuation_kwargs
from minicache.runtime.memory import cache_bytes, compression_ratio

#: Filler sentences, repeated (the haystack of the passkey papers).
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
#: Start of the answer, given to the model so that a small one answers in the expected form.
ANSWER_PREFIX = "The pass key is"
_NUMBER = re.compile(r"\d+")
_MARK = "\uE000MINICACHE-PASSKEY\uE000"  # a private-use sentinel that no chat template contains


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey-retrieval prompt, already tokenized.

    Attributes
    ----------
    context_ids : tuple of int
        Instruction, filler and needle: what goes through the cache before the question.
    question_ids : tuple of int
        Question, end of the user turn and the answer prefix.
    passkey : str
        The number hidden in the filler (decimal digits).
    context_length : int
        Total length in tokens (``len(context_ids) + len(question_ids)``).
    depth : float
        Requested depth of the needle in the filler, in [0, 1].
    needle_start, needle_end : int
        Token span of the needle in ``context_ids``.
    filler_start, filler_end : int
        Token span of the filler (needle included) in ``context_ids``.
    sample : int
        Index of the prompt within its (length, depth) cell.
    """

    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    passkey: str
    context_length: int
    depth: float
    needle_start: int
    needle_end: int
    filler_start: int
    filler_end: int
    sample: int = 0

    def __post_init__(self) -> None:
        if len(self.context_ids) + len(self.question_ids) != self.context_length:
            raise ValueError(
                f"prompt of {len(self.context_ids)} + {len(self.question_ids)} tokens, not {self.context_length}"
            )
        if not self.filler_start <= self.needle_start < self.needle_end <= self.filler_end <= len(self.context_ids):
            raise ValueError("needle outside the filler")
        if not (self.passkey.isdigit() and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"bad passkey {self.passkey!r} or depth {self.depth}")

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.context_ids + self.question_ids

    @property
    def needle_depth(self) -> float:
        """Where the needle actually starts, as a fraction of the filler without the needle."""
        span = (self.filler_end - self.filler_start) - (self.needle_end - self.needle_start)
        return (self.needle_start - self.filler_start) / span if span else 0.0


def passkey_for(seed: int, context_length: int, depth: float, sample: int, digits: int = 5) -> str:
    """The passkey of one cell sample: a ``digits``-digit number (no leading zero), seeded.

    Seeded by the cell itself (not by a position in a grid), so adding a length or a depth to a run
    leaves the other prompts unchanged.
    """
    rng = random.Random(f"minicache-passkey:{seed}:{context_length}:{depth!r}:{sample}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False).input_ids)


def template_parts(tokenizer) -> tuple[str, str] | None:
    """Chat-template text before and after a user message (with the assistant turn opened), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_MARK) != 1:
        return None
    head, tail = text.split(_MARK)
    return head, tail


def make_passkey_prompt(
    tokenizer, context_length: int, depth: float, *, seed: int = 0, sample: int = 0
) -> PasskeyPrompt:
    """Build one prompt of exactly ``context_length`` tokens with the needle at ``depth``.

    The filler is whole copies of :data:`FILLER`; the needle goes after ``round(depth · n)`` of the
    ``n`` copies, and the last copy is cut to make the length exact. With a chat template the text
    is one user message, and the assistant's turn is opened with :data:`ANSWER_PREFIX`. The pieces
    are tokenized separately and joined, so the needle and the split between context and question
    sit on token boundaries.

    Raises
    ------
    ValueError
        ``depth`` outside [0, 1], or ``context_length`` too short to hold one copy of the filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    parts = template_parts(tokenizer)
    if parts is None:  # no chat template: plain text, the tokenizer's own BOS
        head = _ids(tokenizer, INSTRUCTION, special=True)
        tail = _ids(tokenizer, f"\n\n{QUESTION} {ANSWER_PREFIX}")
    else:
        head = _ids(tokenizer, parts[0] + INSTRUCTION)
        tail = _ids(tokenizer, f"\n\n{QUESTION}{parts[1]}{ANSWER_PREFIX}")
    passkey = passkey_for(seed, context_length, depth, sample)
    needle = _ids(tokenizer, " " + NEEDLE.format(passkey=passkey))
    unit = _ids(tokenizer, " " + FILLER)
    room = context_length - len(head) - len(needle) - len(tail)
    if room < len(unit):
        need = len(head) + len(needle) + len(tail) + len(unit)
        raise ValueError(f"context length {context_length} is too short for a passkey prompt (at least {need} tokens)")
    copies, cut = divmod(room, len(unit))
    before = round(depth * copies)
    filler_before = unit * before
    filler_after = unit * (copies - before) + unit[:cut]
    context = head + filler_before + needle + filler_after
    return PasskeyPrompt(
        context_ids=tuple(context),
        question_ids=tuple(tail),
        passkey=passkey,
        context_length=context_length,
        depth=float(depth),
        needle_start=len(head) + len(filler_before),
        needle_end=len(head) + len(filler_before) + len(needle),
        filler_start=len(head),
        filler_end=len(context),
        sample=sample,
    )


def make_passkey_prompts(
    tokenizer, context_lengths: Sequence[int], depths: Sequence[float], samples_per_cell: int, seed: int = 0
) -> list[PasskeyPrompt]:
    """Every prompt of a run: ``samples_per_cell`` per (context length, depth), lengths outermost."""
    return [
        make_passkey_prompt(tokenizer, length, depth, seed=seed, sample=i)
        for length in context_lengths
        for depth in depths
        for i in range(samples_per_cell)
    ]


def extract_passkey(text: str) -> str | None:
    """The first run of decimal digits in a generated answer, or None when there is none."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def score_passkey(answer: str, passkey: str) -> bool:
    """Exact match: the first number in ``answer`` is ``passkey``, digit for digit.

    ``" 68203."`` and ``"The pass key is 68203"`` match ``"68203"``; ``"682031"``, ``"6820"``,
    ``"6 8 2 0 3"`` and ``"none"`` do not.
    """
    return extract_passkey(answer) == passkey


# ---- running -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyRecord:
    """One method's answer to one prompt."""

    method: str
    context_length: int
    depth: float
    sample: int
    passkey: str
    answer: str
    correct: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PasskeyMethod:
    """A cache to test: ``label`` and ``make_cache(model) -> Cache`` (a fresh, empty cache)."""

    label: str
    make_cache: Callable[[object], object]


def _replay(cache, prefilled: DynamicCache):
    """Hand a prefilled full cache's keys/values to ``cache`` layer by layer, as a forward pass would."""
    for idx, layer in enumerate(prefilled.layers):
        cache.update(layer.keys, layer.values, idx)
    return cache


@torch.inference_mode()
def greedy_answer(model, cache, question: torch.Tensor, seen: int, max_new_tokens: int) -> torch.Tensor:
    """Greedy answer ``[B, max_new_tokens]`` to ``question`` ``[B, q]`` after ``seen`` cached tokens
    (a cache that evicted some of them is continued at the true positions)."""
    logits = model(input_ids=question, cache=cache, **continuation_kwargs(cache, seen, question)).logits
    seen += question.shape[1]
    tokens = [logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        step = tokens[-1][:, None]
        logits = model(input_ids=step, cache=cache, **continuation_kwargs(cache, seen, step)).logits
        seen += 1
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def run_passkey(
    model,
    tokenizer,
    prompts: Sequence[PasskeyPrompt],
    methods: Sequence[PasskeyMethod],
    *,
    batch_size: int = 4,
    max_new_tokens: int = 8,
    share_prefill: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[PasskeyRecord], dict[str, dict[int, float]]]:
    """Answer every prompt with every method.

    Parameters
    ----------
    prompts : sequence of PasskeyPrompt
        Batched in order, ``batch_size`` prompts of the same length at a time.
    methods : sequence of PasskeyMethod
        Caches to compare; all of them answer the same prompts.
    share_prefill : bool
        Compute the context's keys/values once with a `DynamicCache` and replay them into every
        method's cache (equal to running the model on each cache; see the module docstring).
        False runs the context through the model once per method.
    progress : callable, optional
        Called with one line per batch of prompts (how many each method got right).

    Returns
    -------
    records : list of PasskeyRecord
        One per (prompt, method).
    compression : dict
        ``{method: {context_length: compression_ratio}}`` of the caches after the question, over
        all prompts of that length (full-cache bytes ÷ bytes held).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = next(model.parameters()).device
    records: list[PasskeyRecord] = []
    held: dict[tuple[str, int], list[int]] = {}
    batches: list[list[PasskeyPrompt]] = []
    for prompt in prompts:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and len(last[0].context_ids) == len(prompt.context_ids) \
                and len(last[0].question_ids) == len(prompt.question_ids):
            last.append(prompt)
        else:
            batches.append([prompt])
    for batch in batches:
        context = torch.tensor([p.context_ids for p in batch], dtype=torch.long, device=device)
        question = torch.tensor([p.question_ids for p in batch], dtype=torch.long, device=device)
        prefilled = None
        if share_prefill:
            prefilled = DynamicCache(config=model.config)
            model(input_ids=context, attention_mask=torch.ones_like(context), cache=prefilled)
        for method in methods:
            cache = method.make_cache(model)
            if prefilled is not None:
                _replay(cache, prefilled)
            else:
                model(input_ids=context, attention_mask=torch.ones_like(context), cache=cache)
            answers = greedy_answer(model, cache, question, context.shape[1], max_new_tokens)
            kv_bytes, kv_full = cache_bytes(cache)
            sums = held.setdefault((method.label, batch[0].context_length), [0, 0])
            sums[0] += kv_bytes
            sums[1] += kv_full
            for prompt, ids in zip(batch, answers.tolist(), strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                records.append(
                    PasskeyRecord(
                        method=method.label,
                        context_length=prompt.context_length,
                        depth=prompt.depth,
                        sample=prompt.sample,
                        passkey=prompt.passkey,
                        answer=text,
                        correct=score_passkey(text, prompt.passkey),
                    )
                )
        if progress is not None:
            new = records[-len(batch) * len(methods):]
            hits = ", ".join(
                f"{m.label} {sum(r.correct for r in new if r.method == m.label)}/{len(batch)}" for m in methods
            )
            depths = ", ".join(f"{d:g}" for d in sorted({p.depth for p in batch}))
            progress(f"length {batch[0].context_length}, depth {depths}: {hits}")
    compression: dict[str, dict[int, float]] = {}
    for (label, length), (kv_bytes, kv_full) in held.items():
        compression.setdefault(label, {})[length] = compression_ratio(kv_full, kv_bytes)
    return records, compression


def accuracy_table(records: Sequence[PasskeyRecord]) -> dict:
    """Accuracy per method and context length, and per method, length and depth.

    Returns
    -------
    dict
        ``{"by_length": {method: {length: acc}}, "by_cell": {method: {length: {depth: acc}}},
        "counts": {method: {length: n}}}`` with accuracies in [0, 1].
    """
    cells: dict[tuple[str, int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r.method, r.context_length, r.depth), []).append(r.correct)
    by_length: dict[str, dict[int, list[bool]]] = {}
    by_cell: dict[str, dict[int, dict[float, float]]] = {}
    for (method, length, depth), hits in cells.items():
        by_cell.setdefault(method, {}).setdefault(length, {})[depth] = sum(hits) / len(hits)
        by_length.setdefault(method, {}).setdefault(length, []).extend(hits)
    return {
        "by_length": {m: {n: sum(h) / len(h) for n, h in per.items()} for m, per in by_length.items()},
        "by_cell": by_cell,
        "counts": {m: {n: len(h) for n, h in per.items()} for m, per in by_length.items()},
    }
