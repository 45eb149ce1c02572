"""The newcomer path (issue 22): plain-text data, re-runnable main job, reports that never overwrite each
other, CLI messages that say what is meant, and report details."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from minicache.calibrate.cli import main as calibrate_main
from minicache.data import read_samples, split_text

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPHS = "\n\n".join(f"Paragraph {i}. " + "Words of a sentence that runs on. " * 30 for i in range(12))


# ---- 3. plain-text calibration data ---------------------------------------------------------------
def test_plain_text_is_split_into_samples_at_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(PARAGRAPHS)
    whole = read_samples(path)
    assert len(whole) == 1, "evaluation reads a text as one stream (its windows do not change)"
    samples = read_samples(path, split_text_files=True)
    assert len(samples) >= 4 and all(len(s.text) >= 3000 for s in samples[:-1])
    assert "".join(s.text for s in samples).replace("\n", "") == PARAGRAPHS.replace("\n", "")
    assert [s.line for s in samples][:2] == [1, 1 + 2 * (len(samples[0].text.split("\n\n")))]
    # A paragraph far longer than a sample is cut at its lines.
    long = split_text("\n".join(f"line {i} " + "x" * 100 for i in range(200)), chars=1000)
    assert len(long) > 10 and all(len(s.text) < 2000 for s in long)


def test_calibrate_checks_plain_text_before_loading_the_model(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only one short paragraph.")
    assert calibrate_main(["--data", str(short), "--model", "/nonexistent/model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1 sample; calibration needs at least 2" in err and "add text" in err
    assert not (tmp_path / "o").exists()
    long = tmp_path / "long.txt"
    long.write_text(PARAGRAPHS)
    # Two samples or more: the format check passes and the next problem is the model itself.
    assert calibrate_main(["--data", str(long), "--model", "/nonexistent/model", "--out", str(tmp_path / "o"),
                           "--allow-small-data"]) == 2
    err = capsys.readouterr().err
    assert "1 sample" not in err and "/nonexistent/model" in err


# ---- 4. re-runnable main job, reports named after the profile ---------------------------------------
def _stub_checkout(tmp_path: Path) -> Path:
    """A copy of scripts/run.sh whose set-up does nothing and whose minicache-calibrate records its arguments."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "run.sh").write_text((ROOT / "scripts" / "run.sh").read_text())
    (root / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\n")
    tool = root / ".venv" / "bin" / "minicache-calibrate"
    tool.parent.mkdir(parents=True)
    tool.write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/calls"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return root


def test_the_main_job_can_run_twice(tmp_path):
    root = _stub_checkout(tmp_path)
    for _ in range(2):
        subprocess.run(["bash", str(root / "scripts" / "run.sh")], check=True)
    subprocess.run(["bash", str(root / "scripts" / "run.sh"), "--data", "x.jsonl", "--out", "mine"], check=True)
    calls = (root / ".venv" / "bin" / "calls").read_text().splitlines()
    assert calls == ["--force", "--force", "--data x.jsonl --out mine"], "the main job owns its output folder"
    assert "/minicache-smollm2-135m/" in (ROOT / ".gitignore").read_text()


def test_reports_are_named_after_their_profile(tmp_path):
    from minicache.calibrate.report import report_files, report_stem, write_report
    from minicache.calibrate.statistics import PairStatistics
    from minicache.profile import MergeProfile

    pytest.importorskip("matplotlib")
    stats = PairStatistics(num_layers=4, num_heads=2, window=4)
    x = torch.randn(1, 2, 10, 8)
    for p in range(3):
        stats.add_pair(p, 0, x, x + 0.1 * p)
        stats.add_pair(p, 1, x, x - 0.1 * p)
    assert report_stem(tmp_path / "minicache_config.yaml") == "minicache"
    written = []
    for name in ("a", "b"):
        profile = MergeProfile(calibration={"data": {"path": None, "source": "built-in corpus (16 prose records)",
                                                     "samples": 8, "tokens": 100, "seed": 0}})
        written += write_report(tmp_path, profile, stats, None, "ppl_increase", 0.01, f"summary {name}",
                                stem=report_stem(tmp_path / f"{name}.yaml"))
    assert {p.name for p in written} == {f"{n}_{part}" for n in "ab" for part in ("report.md", "similarity.png",
                                                                                   "groups.png")}
    a = report_files(tmp_path, "a")["report.md"].read_text()
    assert "summary a" in a and "a_groups.png" in a and "minicache_" not in a
    assert "- data: built-in corpus (16 prose records) (8 samples" in a, "no `None` for runs on the built-in corpus"


# ---- 6. messages that say what is meant ----------------------------------------------------------
def test_a_mistyped_option_is_named_as_such(capsys):
    from minicache.evaluate.cli import main as eval_main

    with pytest.raises(SystemExit) as info:
        eval_main(["--profle", "x.yaml", "--data", "d.txt"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --profle (did you mean --profile?)" in err and "required" not in err
    with pytest.raises(SystemExit):
        calibrate_main(["--budjet", "0.02"])
    assert "did you mean --budget?" in capsys.readouterr().err


def test_compare_suggests_a_builtin_method(tmp_path, capsys):
    from minicache.evaluate.cli import main as eval_main

    data = tmp_path / "d.txt"
    data.write_text("some text")
    assert eval_main(["--compare", "ful,paper", "--data", str(data)]) == 2
    assert "'ful' is neither a built-in method nor a profile on disk (did you mean 'full'?)" in (
        capsys.readouterr().err
    )


def test_a_large_budget_is_spelled_out(tmp_path, capsys):
    assert calibrate_main(["--budget", "1", "--model", "/nonexistent/model", "--out", str(tmp_path / "o")]) == 2
    assert "warning: --budget 1 accepts +100% perplexity (0.01 is +1 %)" in capsys.readouterr().err


def test_mismatch_warning_when_the_mismatch_is_allowed():
    from minicache.profile import MergeProfile, ModelMismatchWarning
    from tests.tiny_configs import tiny_config

    profile = MergeProfile.preset("paper", tiny_config("llama", num_hidden_layers=6))
    with pytest.warns(ModelMismatchWarning) as record:
        profile.check_model(tiny_config("llama", num_hidden_layers=8), allow_mismatch=True)
    text = str(record[0].message)
    assert "used anyway" in text and "pass allow_mismatch" not in text


def test_passkey_progress_names_every_depth_of_a_batch():
    from minicache.evaluate.passkey import PasskeyMethod, make_passkey_prompts, run_passkey
    from minicache.evaluate.quality import full_cache_factory
    from tests.eval_helpers import CharTokenizer
    from tests.test_passkey import tiny_model

    model, tok = tiny_model(), CharTokenizer()
    prompts = make_passkey_prompts(tok, [400], [0.2, 0.8], 1, seed=0)
    lines: list[str] = []
    run_passkey(model, tok, prompts, [PasskeyMethod("full", lambda m: full_cache_factory(None, m))],
                batch_size=2, max_new_tokens=2, progress=lines.append)
    assert lines == [lines[0]] and "depth 0.2, 0.8:" in lines[0], lines


def test_bench_budget_table_gives_absolute_numbers():
    from minicache.evaluate.bench import format_table

    entry = {"context_length": 512, "verification_ok": True}
    result = {
        "results": [], "ratios": [],
        "budget": {"kv_budget_bytes": 2**20, "entries": [
            {**entry, "cache": "full", "bytes_per_sequence": 2**19, "max_batch": 2, "max_batch_ratio": 1.0,
             "full_max_batch": 2, "bytes_per_sequence_ratio": 1.0},
            {**entry, "cache": "paper", "bytes_per_sequence": int(0.93 * 2**19), "max_batch": 3,
             "max_batch_ratio": 1.5, "full_max_batch": 2, "bytes_per_sequence_ratio": 0.93},
        ]},
    }
    table = format_table(result)
    assert "| paper | 512 | 0.46 | 0.930 | 3 | 2 | 1.50 | yes |" in table, table


def test_the_report_has_no_empty_gamma_column_and_names_the_search_steps(tmp_path):
    from minicache.calibrate.report import write_report
    from minicache.calibrate.search import SearchResult, SearchStep
    from minicache.calibrate.statistics import PairStatistics
    from minicache.evaluate.quality import QualityResult
    from minicache.profile import MergeProfile

    pytest.importorskip("matplotlib")
    stats = PairStatistics(num_layers=4, num_heads=2, window=4)
    result = QualityResult(ppl_full=10, ppl=10.1, ppl_increase=0.01, kl_mean=0.01, kl_q95=0.02, top1_agreement=0.9,
                           kv_bytes_full=100, kv_bytes=90, compression_ratio=100 / 90, tokens_scored=10,
                           windows=1, prefix_length=4, continuation_length=4)
    search = SearchResult(chosen=(), final=result, steps=[SearchStep("probe", ((2, 3),), result)],
                          predicted={(2, 3): 0.01})
    written = write_report(tmp_path, MergeProfile(), stats, search, "ppl_increase", 0.01, "s")
    text = (tmp_path / "minicache_report.md").read_text()
    assert "| step | groups | ppl_increase | 95 % interval | fits | compression |" in text and "| γ |" not in text
    assert "| probe | [[2, 3]] | +0.01000 | none (1 window) | no | 1.1111x |" in text, "no interval: cannot fit"
    assert "held-out:" not in text, "no held-out line without recorded data"
    assert len(written) == 4
    assert os.path.getsize(tmp_path / "minicache_groups.png") > 0


# ---- 5. progress follows the work --------------------------------------------------------------------
def test_calibration_reports_its_two_capture_phases(tmp_path):
    """The second half of the capture also measures every candidate under every option (much more work
    per batch): it gets its own progress bar and a line saying what it measures."""
    import json

    from transformers import AutoModelForCausalLM

    from minicache.calibrate.api import calibrate
    from minicache.calibrate.search import Budget
    from minicache.profile import Defaults
    from tests.test_plugins import TinyTokenizer
    from tests.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=4)).eval()
    data = tmp_path / "ids.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"input_ids": torch.randint(3, 128, (96,), generator=g).tolist()}) + "\n"
                            for _ in range(16)))
    lines: list[str] = []
    bars: list[str] = []
    import minicache.calibrate.capture as capture_module

    real = capture_module.progress_bar

    def recording(total, enabled, desc, unit="tok"):
        bars.append(desc)
        return real(total, False, desc, unit)

    capture_module.progress_bar = recording
    try:
        calibrate(model, TinyTokenizer(), data, budget=Budget("ppl_increase", 10.0), num_samples=8, max_length=96,
                  eval_windows=2, defaults=Defaults(residual_length=16, block_size=16), probes=3, log=lines.append,
                  allow_small_data=True)
    finally:
        capture_module.progress_bar = real
    # 3 pairs x 7 t x (plain, aligned) + 2 triples x (plain, aligned), for keys and for values
    assert bars == ["capturing KV statistics (1/2)", "measuring 92 candidate options (2/2)"], bars
    assert any(line.startswith("measuring the restore error of 5 candidate groups") for line in lines), lines
