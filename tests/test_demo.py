"""`minicache-demo`: an honest agreement metric, the profile shipped with a model, checked arguments."""

from __future__ import annotations

import re

import pytest

from minicache import MergeProfile
from minicache.demo import main as demo_main
from minicache.profile import Defaults, MergeGroup
from tests.test_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # 4 layers, 512 positions: room for a prompt that merges well past the residual window.
    return write_tiny_model(tmp_path_factory.mktemp("demo") / "model", max_position_embeddings=512)


def _aggressive(config) -> MergeProfile:
    d = Defaults(residual_length=8, block_size=8, gamma=0.0, sink_tokens=0)
    s = d.settings(t=0.5)
    return MergeProfile(groups=(MergeGroup((0, 1), s, s), MergeGroup((2, 3), s, s)), defaults=d)


def _agreement(text: str) -> float:
    match = re.search(r"teacher-forced top-1 agreement with the full cache after the merged prompt: ([\d.]+)%", text)
    assert match, text
    return float(match.group(1)) / 100


def test_agreement_is_measured_after_the_merged_prompt(tmp_path, tiny_dir, capsys):
    from transformers import AutoConfig

    from minicache.evaluate.quality import evaluate_profile
    from minicache.models import load_model

    profile = _aggressive(AutoConfig.from_pretrained(tiny_dir))
    path = profile.save(tmp_path / "aggressive.yaml")
    code = demo_main(["--model", str(tiny_dir), "--profile", str(path), "--prompt-tokens", "200",
                      "--new-tokens", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    agreement = _agreement(out)
    # Merging every token of every layer at gamma 0 changes the model's predictions: a metric that
    # scored the prompt and the continuation in one pass (exact keys and values) would say 100 %.
    assert agreement < 1.0
    # It is minicache-eval's metric on the same window of the same text: the prompt, then its next tokens.
    from minicache.demo import default_prompt_text

    model, tokenizer = load_model(str(tiny_dir))
    ids = tokenizer(default_prompt_text(), return_tensors="pt", truncation=True, max_length=224).input_ids
    want = evaluate_profile(model, ids, 200, profile).top1_agreement
    assert abs(agreement - want) < 0.002
    assert "profile: 2 groups" in out and "paper preset: paper preset" not in out


def test_a_converted_model_directory_brings_its_profile(tmp_path, tiny_dir, capsys):
    from transformers import AutoConfig

    from minicache.convert import main as convert_main

    profile = _aggressive(AutoConfig.from_pretrained(tiny_dir))
    profile.save(tmp_path / "p.yaml")
    shipped = tmp_path / "shipped"
    assert convert_main(["--model", str(tiny_dir), "--out", str(shipped), "--profile", str(tmp_path / "p.yaml")]) == 0
    capsys.readouterr()
    assert demo_main(["--model", str(shipped), "--prompt-tokens", "120", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "shipped with the model" in out and "profile: 2 groups [0-1, 2-3]" in out
    assert demo_main(["--model", str(tiny_dir), "--prompt-tokens", "120", "--new-tokens", "4"]) == 0
    assert "profile: paper preset:" in capsys.readouterr().out, "no profile shipped: the paper preset"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
        (["--prompt-tokens", "-5"], "--prompt-tokens must be at least 1"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1"),
        (["--prompt-tokens", "500", "--new-tokens", "64"], "exceeds the model's 512 positions"),
    ],
)
def test_bad_lengths_are_usage_errors(tiny_dir, capsys, args, message):
    assert demo_main(["--model", str(tiny_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
