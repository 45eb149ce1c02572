"""Passkey retrieval: prompt generator (length, depth, seeding), scorer, and the run on tiny models."""

from __future__ import annotations

import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache import MergeProfile, MiniCache
from minicache.evaluate.passkey import (
    NEEDLE,
    PasskeyMethod,
    PasskeyRecord,
    accuracy_table,
    extract_passkey,
    make_passkey_prompt,
    make_passkey_prompts,
    passkey_for,
    run_passkey,
    score_passkey,
)
from minicache.evaluate.quality import full_cache_factory
from minicache.profile import Defaults, MergeGroup, MergeSettings
from tests.eval_helpers import CharTokenizer
from tests.tiny_configs import tiny_config


# ---- scorer ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        ("68203", True),
        (" 68203.", True),
        ("The pass key is 68203. It", True),
        ("68203 is the pass key, not 11111", True),
        ("682031", False),  # a longer number is another number
        ("6820", False),
        ("6 8 2 0 3", False),  # exact match: no reassembling of digits
        ("11111, then 68203", False),  # only the first number counts
        ("the pass key", False),
        ("", False),
        ("-68203", True),  # the sign is not a digit; the number itself is right
    ],
)
def test_score_passkey_exact_match(answer, correct):
    assert score_passkey(answer, "68203") is correct


def test_extract_passkey():
    assert extract_passkey(" 123 456") == "123"
    assert extract_passkey("no digits") is None


# ---- generator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [400, 777, 1024])
def test_prompt_has_exact_length_and_the_needle(chat, length):
    tok = CharTokenizer(chat_template=chat)
    prompt = make_passkey_prompt(tok, length, 0.5, seed=3)
    assert len(prompt.input_ids) == length == prompt.context_length
    needle = tok.decode(prompt.context_ids[prompt.needle_start : prompt.needle_end])
    assert needle == " " + NEEDLE.format(passkey=prompt.passkey)
    assert len(prompt.passkey) == 5 and prompt.passkey[0] != "0"
    text = tok.decode(prompt.input_ids)
    assert text.count(prompt.passkey) == 2, "the passkey appears only in the needle"
    assert text.endswith("The pass key is")
    assert ("<user>" in text) is chat and ("<assistant>" in tok.decode(prompt.question_ids)) is chat
    assert "What is the pass key?" in tok.decode(prompt.question_ids)
    # Without a template the tokenizer's BOS starts the prompt; with one, the template's own text does.
    assert (prompt.input_ids[0] == tok.bos_token_id) is not chat


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
    tok = CharTokenizer()
    prompt = make_passkey_prompt(tok, 4000, depth)
    unit = len(tok(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
                   add_special_tokens=False).input_ids)
    filler = prompt.filler_end - prompt.filler_start - (prompt.needle_end - prompt.needle_start)
    # Whole filler copies before the needle: off by at most half a copy (rounding) plus the cut copy.
    assert abs(prompt.needle_depth - depth) * filler <= 1.5 * unit
    if depth == 0.0:
        assert prompt.needle_start == prompt.filler_start
    if depth == 1.0:
        assert prompt.needle_end >= prompt.filler_end - unit


def test_prompts_are_seeded_and_cells_independent():
    tok = CharTokenizer()
    a = make_passkey_prompts(tok, [500, 800], [0.2, 0.8], 3, seed=7)
    b = make_passkey_prompts(tok, [500, 800], [0.2, 0.8], 3, seed=7)
    assert a == b
    assert len(a) == 12 and [p.context_length for p in a[:6]] == [500] * 6
    assert len({p.passkey for p in a}) > 1, "samples of a cell get different passkeys"
    c = make_passkey_prompts(tok, [500, 800], [0.2, 0.8], 3, seed=8)
    assert [p.passkey for p in a] != [p.passkey for p in c]
    # Adding a length to the grid leaves the other prompts as they were.
    d = make_passkey_prompts(tok, [400, 500, 800], [0.2, 0.8], 3, seed=7)
    assert d[6:] == a
    assert passkey_for(7, 500, 0.2, 0) == a[0].passkey


def test_generator_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(tok, 100, 0.5)
    with pytest.raises(ValueError, match="outside"):
        make_passkey_prompt(tok, 1000, 1.5)


def test_real_tokenizer_prompt(smollm2):
    _, tok = smollm2
    prompt = make_passkey_prompt(tok, 1024, 0.5, seed=0)
    assert len(prompt.input_ids) == 1024
    assert tok.decode(prompt.context_ids[prompt.needle_start : prompt.needle_end]).strip() == NEEDLE.format(
        passkey=prompt.passkey
    )
    text = tok.decode(prompt.question_ids)
    assert "What is the pass key?" in text and text.endswith("assistant\nThe pass key is")
    assert abs(prompt.needle_depth - 0.5) < 0.05


# ---- accuracy ----------------------------------------------------------------------------------
def test_accuracy_table_known_counts():
    def rec(method, length, depth, correct):
        return PasskeyRecord(method, length, depth, 0, "12345", "", correct)

    records = [
        rec("full", 100, 0.1, True), rec("full", 100, 0.1, False), rec("full", 100, 0.9, True),
        rec("full", 100, 0.9, True), rec("full", 200, 0.1, False), rec("x", 100, 0.1, False),
    ]
    table = accuracy_table(records)
    assert table["by_cell"]["full"][100] == {0.1: 0.5, 0.9: 1.0}
    assert table["by_length"]["full"] == {100: 0.75, 200: 0.0}
    assert table["by_length"]["x"] == {100: 0.0}
    assert table["counts"]["full"] == {100: 4, 200: 1}


# ---- running -----------------------------------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=1024)).eval()


def tiny_methods(model):
    d = Defaults(residual_length=8, block_size=16, gamma=0.1)
    slerp = MergeSettings.create(t=0.6, gamma=0.1)
    average = MergeSettings.create(t=0.5, gamma=0.1, method="average")
    slerp_profile = MergeProfile(groups=(MergeGroup((1, 2), slerp, slerp),), defaults=d)
    average_profile = MergeProfile(groups=(MergeGroup((0, 1), average, average), MergeGroup((2, 3), slerp, slerp)),
                                   defaults=d)
    return [
        PasskeyMethod("full", lambda m: full_cache_factory(None, m)),
        PasskeyMethod("slerp", lambda m: MiniCache(slerp_profile, m)),
        PasskeyMethod("average", lambda m: MiniCache(average_profile, m)),
    ]


def test_shared_prefill_equals_running_every_cache():
    # The context's KV is computed once and replayed into each cache; that must be exactly what
    # running the model on that cache gives (prefill attention is exact, merging happens after).
    model, tok = tiny_model(), CharTokenizer()
    prompts = make_passkey_prompts(tok, [400], [0.3, 0.7], 2, seed=1)
    methods = tiny_methods(model)
    shared, comp_shared = run_passkey(model, tok, prompts, methods, batch_size=2, max_new_tokens=5)
    alone, comp_alone = run_passkey(model, tok, prompts, methods, batch_size=2, max_new_tokens=5,
                                    share_prefill=False)
    assert shared == alone
    assert comp_shared == comp_alone
    assert len(shared) == 4 * 3 and comp_shared["full"] == {400: 1.0}
    assert comp_shared["slerp"][400] > 1.0 and comp_shared["average"][400] > comp_shared["slerp"][400]


def test_full_cache_answers_like_plain_greedy_generation():
    model, tok = tiny_model(), CharTokenizer()
    prompt = make_passkey_prompt(tok, 400, 0.5, seed=2)
    records, _ = run_passkey(model, tok, [prompt], tiny_methods(model)[:1], max_new_tokens=6)
    ids = torch.tensor([prompt.input_ids])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0, 400:]
    assert records[0].answer == tok.decode(want.tolist())
    assert records[0].correct == score_passkey(records[0].answer, prompt.passkey)


@pytest.mark.slow
def test_smollm2_full_cache_finds_a_late_needle(smollm2):
    # Acceptance check on the real model (about a minute on 2 CPU cores): SmolLM2-135M-Instruct with
    # the full cache retrieves a passkey near the end of a 1,024-token prompt (it fails at depths
    # 0.1 and 0.5; benchmarks/results/passkey-cpu/ has the whole grid), and the shipped profile,
    # which merges layers 27-29 only, answers the same prompts the same way.
    model, tok = smollm2
    prompts = make_passkey_prompts(tok, [1024], [0.9], 2, seed=0)
    shipped = MergeProfile.load(pathlib.Path(__file__).parents[1] / "profiles" / "smollm2-135m-instruct")
    methods = [
        PasskeyMethod("full", lambda m: full_cache_factory(None, m)),
        PasskeyMethod("shipped", lambda m: MiniCache(shipped, m)),
    ]
    records, compression = run_passkey(model, tok, prompts, methods, batch_size=2)
    table = accuracy_table(records)
    assert table["by_length"]["full"][1024] == 1.0, [r.answer for r in records]
    assert table["by_length"]["shipped"][1024] == 1.0, [r.answer for r in records]
    assert compression["shipped"][1024] > 1.0
