"""`minicache-eval`: argument errors, single runs (output keys unchanged), --compare and --task passkey.

End-to-end runs use a tiny random model and a character tokenizer (``load_model`` is patched).
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache.evaluate import cli
from minicache.evaluate.compare import MethodSpec, parse_methods, passkey_markdown, quality_markdown
from minicache.evaluate.quality import QualityResult
from minicache.profile import Defaults, MergeGroup, MergeProfile, MergeSettings
from tests.eval_helpers import CharTokenizer
from tests.tiny_configs import tiny_config

TEXT = " ".join(f"Sentence {i} of a small text, with words and numbers like {i * 7}." for i in range(60))


@pytest.fixture
def tiny(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=1024)).eval()
    tokenizer = CharTokenizer(chat_template=True)
    loads = []

    def load_model(spec, dtype=None, **kwargs):
        loads.append(spec)
        return model, tokenizer

    monkeypatch.setattr("minicache.models.load_model", load_model)
    return model, tokenizer, loads


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def small_profile(tmp_path, tiny):
    # Small windows so that a 32-token prefix is merged; averaging on one pair, SLERP on another.
    d = Defaults(residual_length=8, block_size=8, gamma=0.1)
    avg = MergeSettings.create(t=0.5, gamma=0.1, method="average")
    slerp = d.settings()
    profile = MergeProfile(groups=(MergeGroup((0, 1), avg, avg), MergeGroup((2, 3), slerp, slerp)), defaults=d)
    return profile.save(tmp_path / "small.yaml")


# ---- argument errors (the model is never loaded) ------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--baseline", "full"], "--task perplexity needs --data"),
        (["--compare", "full,full", "--task", "passkey"], "method 'full' is listed twice"),
        (["--compare", "full,/no/such/profile", "--task", "passkey"], "no MiniCache profile at /no/such/profile"),
        (["--compare", "full,,paper", "--task", "passkey"], "empty method name"),
        (["--compare", "baseline:paper", "--task", "passkey"], "'paper' is not a baseline; known: full, average"),
        (["--compare", "preset:average", "--task", "passkey"], "'average' is not a preset; known: paper"),
        (
            ["--preset", "paper", "--task", "passkey", "--samples-per-cell", "0"],
            "--samples-per-cell must be at least 1",
        ),
        (["--preset", "paper", "--data", "DATA", "--num-windows", "0"], "--num-windows must be at least 1"),
        (["--preset", "paper", "--data", "/no/such.txt"], "/no/such.txt: no such file"),
    ],
)
def test_errors_before_loading_the_model(argv, message, tiny, data, capsys):
    argv = [str(data) if a == "DATA" else a for a in argv]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert tiny[2] == [], "the model is not loaded for a bad command line"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "paper", "--task", "passkey", "--depths", "0.5,x"], "not a comma-separated list of numbers"),
        (["--preset", "paper", "--task", "passkey", "--depths", "0.5,1.5"], "every depth must be in [0, 1]"),
        (["--preset", "paper", "--task", "passkey", "--context-lengths", "1024,0"], "must be at least 1"),
        (["--preset", "paper", "--task", "passkey", "--context-lengths", "1k"], "not a comma-separated list"),
        (["--preset", "paper", "--baseline", "full"], "not allowed with argument"),
        (["--baseline", "median"], "invalid choice: 'median'"),
        (["--task", "passkey"], "one of the arguments --profile --preset --baseline --compare is required"),
        (["--preset", "paper", "--task", "needle"], "invalid choice: 'needle'"),
    ],
)
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_method_specs():
    specs = parse_methods("full,paper,average,baseline:full,preset:paper")
    assert [(s.kind, s.name) for s in specs] == [
        ("baseline", "full"), ("preset", "paper"), ("baseline", "average"), ("baseline", "full"), ("preset", "paper")
    ]
    config = tiny_config("llama", num_hidden_layers=30)
    profile, factory = specs[2].build(config)
    assert factory is None and [g.layers for g in profile.groups] == [(s, s + 1) for s in range(15, 29, 2)]
    assert {(s.method, s.params.t) for g in profile.groups for s in (g.keys, g.values)} == {("average", 0.5)}
    profile, factory = specs[0].build(config)
    assert factory is not None and not profile.groups
    with pytest.raises(ValueError, match="kind 'profile' only"):
        MethodSpec("x", "profile", "x")


# ---- end to end ----------------------------------------------------------------------------------
PPL_ARGS = ["--prefix-length", "32", "--continuation-length", "16", "--num-windows", "3", "--batch-size", "2"]


@pytest.mark.parametrize("baseline", ["full", "average"])
def test_single_run_json_keys_are_unchanged(baseline, tiny, data, capsys):
    assert cli.main(["--baseline", baseline, "--data", str(data), "--json", *PPL_ARGS]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == [f.name for f in fields(QualityResult)] + ["profile", "dtype", "data", "seconds"]
    assert out["profile"] == f"baseline:{baseline}" and out["windows"] == 3
    assert out["data"] == str(data), "the JSON says which text it scored"
    if baseline == "full":
        assert out["ppl_increase"] == pytest.approx(0.0, abs=1e-5) and out["top1_agreement"] == 1.0


def test_single_run_table(tiny, data, small_profile, capsys):
    assert cli.main(["--profile", str(small_profile), "--data", str(data), *PPL_ARGS]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"profile            {small_profile} (float32)")
    assert "compression" in text and "top-1 agreement" in text


def test_compare_perplexity(tiny, data, small_profile, tmp_path, capsys):
    json_out, md_out = tmp_path / "out" / "table.json", tmp_path / "out" / "table.md"
    argv = ["--compare", f"full,paper,average,{small_profile}", "--data", str(data), *PPL_ARGS,
            "--json-out", str(json_out), "--markdown-out", str(md_out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(json_out.read_text())
    assert doc["task"] == "perplexity" and doc["data"] == str(data)
    rows = {r["method"]: r for r in doc["results"]}
    assert list(rows) == ["full", "paper", "average", str(small_profile)]
    assert rows["full"]["ppl_increase"] == pytest.approx(0.0, abs=1e-5) and rows["full"]["kl_mean"] < 1e-6
    # Every method is scored against the same reference on the same tokens.
    assert len({r["ppl_full"] for r in rows.values()}) == 1 and {r["tokens_scored"] for r in rows.values()} == {48}
    assert rows[str(small_profile)]["compression_ratio"] > 1.0 and rows[str(small_profile)]["kl_mean"] > 0
    assert rows["full"]["describe"] == "DynamicCache (full)" and "method average" in rows["average"]["describe"]
    markdown = md_out.read_text()
    assert captured.out.strip() == markdown.strip() == quality_markdown(doc["results"]).strip()
    lines = markdown.splitlines()
    assert lines[0].startswith("| method | ppl | ppl increase |")
    assert len([x for x in lines if x.startswith("| `")]) == 4
    assert "[" in captured.err  # progress lines go to stderr


def test_compare_json_on_stdout(tiny, data, capsys):
    assert cli.main(["--compare", "full,average", "--data", str(data), "--json", *PPL_ARGS]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in doc["results"]] == ["full", "average"]


def test_passkey_task_single_method_includes_the_full_cache(tiny, small_profile, tmp_path, capsys):
    md_out = tmp_path / "passkey.md"
    argv = ["--task", "passkey", "--profile", str(small_profile), "--context-lengths", "400,500",
            "--depths", "0.2,0.8", "--samples-per-cell", "2", "--max-new-tokens", "4", "--json",
            "--markdown-out", str(md_out)]
    assert cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "passkey" and doc["methods"] == ["full", str(small_profile)]
    assert set(doc["by_length"]["full"]) == {"400", "500"}
    assert set(doc["by_cell"][str(small_profile)]["500"]) == {"0.2", "0.8"}
    assert doc["counts"]["full"] == {"400": 4, "500": 4}
    assert len(doc["records"]) == 2 * 2 * 2 * 2
    # Both methods answered the very same prompts.
    by_method = {}
    for r in doc["records"]:
        by_method.setdefault(r["method"], []).append((r["context_length"], r["depth"], r["sample"], r["passkey"]))
    assert by_method["full"] == by_method[str(small_profile)]
    assert doc["compression"]["full"] == {"400": 1.0, "500": 1.0}
    assert doc["compression"][str(small_profile)]["500"] > 1.0
    markdown = md_out.read_text()
    assert markdown.strip() == passkey_markdown(doc).strip()
    assert "| method | acc @ 400 | acc @ 500 | compression @ 400 | compression @ 500 |" in markdown
    assert "| method | length | depth 0.2 | depth 0.8 |" in markdown


def test_passkey_compare_does_not_repeat_full(tiny, capsys):
    argv = ["--task", "passkey", "--compare", "average,full", "--context-lengths", "400", "--depths", "0.5",
            "--samples-per-cell", "1", "--max-new-tokens", "2", "--json"]
    assert cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["methods"] == ["average", "full"]
