"""The calibrator's promise on text it never saw (issue 21 item 4).

Calibrate SmolLM2 on one kind of text (Debian's licence texts), then score the profile on two other
kinds (prose and code from the built-in corpus, which the calibration never saw): the perplexity
increase there must stay within the budget plus the half-width of the 95 % interval the profile
states. A search that trusted a lucky point estimate, or an interval that understated its
uncertainty, fails here.
"""

import json

import pytest
import torch

from minicache.calibrate.api import calibrate
from minicache.calibrate.corpus import DEFAULT_CORPUS
from minicache.calibrate.search import Budget
from minicache.data import Sample, token_windows
from minicache.evaluate.quality import evaluate_profile

BUDGET = 0.01
PREFIX, SCORED = 512, 256


def _corpus_windows(tokenizer, kind: str, count: int) -> torch.Tensor:
    records = [json.loads(line) for line in DEFAULT_CORPUS.read_text().splitlines()]
    samples = [Sample(line=i + 1, text=r["text"]) for i, r in enumerate(records) if r["kind"] == kind]
    return token_windows(samples, tokenizer, PREFIX + SCORED, max_windows=count)


@pytest.mark.slow  # one calibration and two evaluations of the real model: ~4 min on 2 cores
def test_a_profile_keeps_its_promise_on_two_unseen_kinds_of_text(smollm2, license_text, tmp_path):
    model, tokenizer = smollm2
    data = tmp_path / "licences.jsonl"
    chunks = [license_text[i : i + 3000] for i in range(0, len(license_text), 3000)]
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    result = calibrate(model, tokenizer, data, budget=Budget("ppl_increase", BUDGET), num_samples=16,
                       eval_windows=8, progress=False, log=lambda _: None)
    measured = result.measured
    assert result.profile.groups, "something fits a 1 % budget on SmolLM2"
    low, high = measured.ppl_increase_ci95
    assert high <= BUDGET, "the search accepted the set on the upper end of its interval"
    allowed = BUDGET + (high - low) / 2
    for kind in ("prose", "code"):
        windows = _corpus_windows(tokenizer, kind, 16)
        assert windows.shape[0] == 16
        unseen = evaluate_profile(model, windows, PREFIX, result.profile)
        assert unseen.ppl_increase <= allowed, (
            f"{kind}: {unseen.ppl_increase:+.2%} on unseen text, promised at most {allowed:+.2%} "
            f"(budget {BUDGET:.0%}, stated {measured.ppl_increase:+.2%} [{low:+.2%}..{high:+.2%}])"
        )
