"""RULER-style long-context tasks (issue 20): prompt construction, scoring, the runner and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from minicache.evaluate.compare import compare_tasks, parse_methods, tasks_markdown
from minicache.evaluate.task_names import RULER_TASKS
from minicache.evaluate.tasks import (
    TASKS,
    TaskMethod,
    make_task_prompt,
    run_tasks,
    score_answer,
    task_table,
    wilson_interval,
)
from tests.eval_helpers import CharTokenizer
from tests.tiny_configs import tiny_config


def test_task_names_match_the_generators():
    assert tuple(TASKS) == RULER_TASKS


def test_score_needs_every_answer_as_a_whole_word():
    assert score_answer(" is 4821937.", ["4821937"])
    assert not score_answer(" is 48219370.", ["4821937"])
    assert not score_answer(" is 482193", ["4821937"])
    assert score_answer(" ABCDE, FGHIJ and KLMNO", ["FGHIJ", "ABCDE", "KLMNO"])
    assert not score_answer(" ABCDE, FGHIJ", ["FGHIJ", "ABCDE", "KLMNO"])


def test_wilson_interval_is_sane_at_the_edges():
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2
    low, high = wilson_interval(15, 20)
    assert low < 0.75 < high
    assert wilson_interval(20, 20)[1] == 1.0


@pytest.mark.parametrize("task", RULER_TASKS)
def test_prompts_are_exact_seeded_and_hold_their_answer(task):
    tokenizer = CharTokenizer(chat_template=True)
    prompt = make_task_prompt(tokenizer, task, 3000, seed=0, sample=1)
    assert len(prompt.context_ids) + len(prompt.question_ids) == 3000
    assert prompt == make_task_prompt(tokenizer, task, 3000, seed=0, sample=1)
    assert prompt != make_task_prompt(tokenizer, task, 3000, seed=0, sample=2)
    context = tokenizer.decode(prompt.context_ids)
    if task == "common_words":
        numbered = re.findall(r"\d+\. ([a-z]+)", context)
        counts = sorted(((numbered.count(w), w) for w in set(numbered)), reverse=True)
        assert counts[0][1] == prompt.answers[0]
        assert counts[0][0] >= 5 * counts[1][0]  # it stands out
    elif task == "qa_quote":
        question = tokenizer.decode(prompt.question_ids)
        quoted = question.rsplit('"', 1)[-1]  # the answer prefix opens the quote
        assert f"{quoted} {prompt.answers[0]}" in context
    else:
        for answer in prompt.answers:
            assert answer in context
    assert "<assistant>" in tokenizer.decode(prompt.question_ids)  # the question ends the user turn


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="too short"):
        make_task_prompt(CharTokenizer(chat_template=True), "niah_multikey", 200)
    with pytest.raises(ValueError, match="unknown task"):
        make_task_prompt(CharTokenizer(), "nosuch", 2000)


def _tiny():
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=128, max_position_embeddings=4096)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_runner_replays_the_context_like_running_it():
    """A method without a prefill context gets the shared prefill replayed; with a (no-op) prefill
    context it runs the context itself: the answers must be the same."""
    from contextlib import nullcontext

    model, tokenizer = _tiny(), CharTokenizer(chat_template=True)
    prompts = [make_task_prompt(tokenizer, "niah_single", 1200, sample=i) for i in range(2)]
    make = lambda m: transformers.DynamicCache(config=m.config)  # noqa: E731
    records, compression = run_tasks(model, tokenizer, prompts, [
        TaskMethod("replayed", make), TaskMethod("own", make, lambda m: nullcontext())])
    by = {(r.method, r.sample): r.answer for r in records}
    assert all(by[("replayed", i)] == by[("own", i)] for i in range(2))
    assert compression == {"replayed": {"niah_single": 1.0}, "own": {"niah_single": 1.0}}
    table = task_table(records)
    assert table["own"]["niah_single"]["1200"]["n"] == 2


def test_compare_tasks_with_a_press_and_markdown():
    pytest.importorskip("kvpress")
    model, tokenizer = _tiny(), CharTokenizer(chat_template=True)
    result = compare_tasks(model, tokenizer, parse_methods("kvpress:knorm@0.5,paper"), ["niah_single"], [1200], 2)
    assert result["methods"] == ["full", "kvpress:knorm@0.5", "paper"]
    assert result["compression"]["kvpress:knorm@0.5"]["niah_single"] > 1.5  # half the context, not the answer
    assert result["compression"]["full"]["niah_single"] == 1.0
    markdown = tasks_markdown(result)
    assert "niah_single @1200" in markdown and "`kvpress:knorm@0.5`" in markdown
    json.dumps(result)


def test_cli_refuses_unknown_tasks(capsys):
    from minicache.evaluate.cli import main

    assert main(["--compare", "full", "--task", "ruler", "--tasks", "niah_single,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
