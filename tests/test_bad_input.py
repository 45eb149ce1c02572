"""The bad-input corpus (issue 16, items 3-7): every case answers with one clear line naming the file (and
line or option), exit code 2 for usage and input errors, no traceback, and no partial or orphan file.

Profile-file attacks (alias bombs, deep nesting, duplicate keys, encodings, size) are in test_untrusted.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minicache.data import DataError, read_samples, token_windows
from minicache.profile import MergeProfile
from tests.alignment_helpers import aligned_profile
from tests.eval_helpers import CharTokenizer
from tests.tiny_configs import tiny_config

REPO = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"Sentence {i} of a small text, with words and numbers like {i * 7}." for i in range(60))


def _one_clear_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def loads(monkeypatch):
    """Patch the model loader with a tiny random model (1,024 positions) and record every load."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=1024)).eval()
    calls: list[str] = []

    def load_model(spec, dtype=None, **kwargs):
        calls.append(spec)
        return model, CharTokenizer()

    monkeypatch.setattr("minicache.models.load_model", load_model)
    return calls


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


# ---- 7. usage errors are answered at once: nothing heavy is imported to reject an option ------------
CLI_MODULES = {
    "minicache-calibrate": "minicache.calibrate.cli",
    "minicache-eval": "minicache.evaluate.cli",
    "minicache-bench": "minicache.evaluate.bench_cli",
    "minicache-demo": "minicache.demo",
    "minicache-convert": "minicache.convert",
}


@pytest.mark.parametrize("command", sorted(CLI_MODULES))
def test_a_usage_error_is_one_line_without_importing_torch(command):
    script = (
        "import sys\n"
        f"from {CLI_MODULES[command]} import main\n"
        "try:\n"
        "    main(['--bogus'])\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    _one_clear_line(done.stderr, f"{command}: error: unrecognized arguments: --bogus", f"{command} --help")
    assert "did you mean" not in done.stderr, "no far-fetched suggestion for a word that is no option"


def test_a_typo_still_gets_its_suggestion(capsys):
    from minicache.evaluate.bench_cli import main

    with pytest.raises(SystemExit) as info:
        main(["--preset", "paper", "--json-ot", "x.json"])
    assert info.value.code == 2
    _one_clear_line(capsys.readouterr().err, "--json-ot (did you mean --json-out?)")


# ---- 3. context length is checked before any work ---------------------------------------------------
def test_eval_passkey_longer_than_the_model_is_refused(loads, capsys):
    from minicache.evaluate.cli import main

    code = main(["--preset", "paper", "--task", "passkey", "--context-lengths", "100000"])
    assert code == 2
    _one_clear_line(capsys.readouterr().err, "--max-new-tokens = 100008 tokens exceeds the model's 1024 positions")


def test_eval_perplexity_longer_than_the_model_is_refused(loads, text_file, capsys):
    from minicache.evaluate.cli import main

    code = main(["--preset", "paper", "--data", str(text_file), "--prefix-length", "1000",
                 "--continuation-length", "100"])
    assert code == 2
    _one_clear_line(capsys.readouterr().err, "--prefix-length + --continuation-length = 1100 tokens")


# ---- 4. outputs are checked before the work, and never overwritten without --force -------------------
@pytest.mark.parametrize("option", ["--json-out", "--markdown-out"])
def test_eval_refuses_to_overwrite_before_loading_the_model(option, loads, text_file, tmp_path, capsys):
    from minicache.evaluate.cli import main

    existing = tmp_path / "result.out"
    existing.write_text("earlier results")
    assert main(["--preset", "paper", "--data", str(text_file), option, str(existing)]) == 2
    _one_clear_line(capsys.readouterr().err, f"{option} {existing} exists; pass --force")
    assert existing.read_text() == "earlier results" and loads == []
    argv = ["--preset", "paper", "--data", str(text_file), "--prefix-length", "32", "--continuation-length", "16",
            "--num-windows", "2", option, str(existing), "--force"]
    assert main(argv) == 0
    assert existing.read_text() != "earlier results"


@pytest.mark.parametrize("option", ["--json-out", "--plot-out"])
def test_bench_output_onto_a_directory_fails_before_the_run(option, loads, tmp_path, capsys):
    from minicache.evaluate.bench_cli import main

    assert main(["--preset", "paper", option, str(tmp_path), "--force"]) == 2
    _one_clear_line(capsys.readouterr().err, f"{option} {tmp_path} is a directory")
    assert loads == []


def _calibrate(argv: list[str]) -> int:
    from minicache.calibrate.cli import main

    return main(argv)


@pytest.fixture
def calibration_data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(f'{{"text": "sample {i}: {TEXT[: 200 + i]}"}}\n' for i in range(4)))
    return path


def test_calibrate_out_onto_an_existing_file_fails_before_the_model(calibration_data, loads, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert _calibrate(["--data", str(calibration_data), "--out", str(taken)]) == 2
    _one_clear_line(capsys.readouterr().err, f"--out {taken} is an existing file")
    assert _calibrate(["--data", str(calibration_data), "--out", str(taken / "sub")]) == 2
    _one_clear_line(capsys.readouterr().err, f"--out: {taken} is a file, not a directory")
    assert taken.read_text() == "mine" and loads == []


def test_calibrate_into_a_read_only_directory_fails_before_the_model(calibration_data, loads, tmp_path, monkeypatch,
                                                                      capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    # chmod alone does not stop root (CI may run as root): the check asks os.access, so ask it here.
    monkeypatch.setattr("minicache.fileio.os.access",
                        lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    assert _calibrate(["--data", str(calibration_data), "--out", str(read_only / "profile.yaml")]) == 2
    _one_clear_line(capsys.readouterr().err, f"--out: {read_only} is not writable")
    assert loads == [] and list(read_only.iterdir()) == []


# ---- 6. data: the file and line are named, odd values refused, huge texts bounded -----------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "fine"}\n{"text": "\xff\xfe bad"}\n', "data.jsonl:2: not UTF-8 text"),
        ('{"text": "fine"}\n\n{"text": "caf\u00e9"\n'.encode("utf-16"), "data.jsonl:1: not UTF-8 text"),
        (b'{"input_ids": [true, false]}\n', "data.jsonl:1: 'input_ids' must be a non-empty list of non-negative"),
        (b'{"input_ids": [1, -2]}\n', "data.jsonl:1: 'input_ids' must be a non-empty list of non-negative"),
        (b'{"text": "fine"}\n{"text": "x"\n', "data.jsonl:2: not valid JSON (Expecting ',' delimiter; column"),
        (b'["a list"]\n', "data.jsonl:1:"),
        (b'{"txt": "typo"}\n', "data.jsonl:1:"),
        (b"\n\n", "data.jsonl: no records"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_samples(path)
    assert str(path.parent / message) in str(info.value) or message in str(info.value)
    assert "\n" not in str(info.value) and " at at " not in str(info.value)


def test_bad_data_is_one_line_from_every_command(tmp_path, loads, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "\xff"}\n')
    from minicache.evaluate.cli import main as eval_main

    assert eval_main(["--preset", "paper", "--data", str(path)]) == 2
    _one_clear_line(capsys.readouterr().err, f"{path}:1: not UTF-8 text")
    assert _calibrate(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_clear_line(capsys.readouterr().err, f"{path}:1: not UTF-8 text")
    assert loads == [] and not (tmp_path / "out").exists()


def test_an_out_of_vocabulary_id_names_file_and_line(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [5, 500]}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: token id 500 is outside the vocabulary \(size 128\)$"):
        token_windows(read_samples(path), CharTokenizer(), 2)


class _RecordingTokenizer(CharTokenizer):
    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def __call__(self, text, add_special_tokens=True, verbose=False):
        self.lengths.append(len(text))
        return super().__call__(text, add_special_tokens, verbose)


def test_a_huge_line_is_not_tokenized_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text('{"text": "' + "word " * 2_000_000 + '"}\n')  # 10 MB on one line
    tokenizer = _RecordingTokenizer()
    windows = token_windows(read_samples(path), tokenizer, 512, max_windows=2)
    assert windows.shape == (2, 512)
    assert tokenizer.lengths == [64 * 1024], "cut at 64 characters per token needed, not 10 MB"


# ---- 7. interruption and weights the process cannot read --------------------------------------------
@pytest.fixture
def enough_data(tmp_path) -> Path:
    """Data the size check passes without a warning at the default settings (40 samples of ~900 tokens)."""
    path = tmp_path / "enough.jsonl"
    path.write_text("".join(f'{{"text": "sample {i}: {TEXT}"}}\n' for i in range(40)))
    return path


def test_ctrl_c_in_calibrate_is_one_line_and_leaves_nothing(enough_data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minicache.calibrate.cli._run", interrupted)
    out = tmp_path / "new-profile"
    assert _calibrate(["--data", str(enough_data), "--out", str(out)]) == 130
    _one_clear_line(capsys.readouterr().err, "interrupted: nothing was written")
    assert not out.exists(), "the directory created for the run is removed again"


def test_sigterm_in_calibrate_takes_the_same_way_out(enough_data, tmp_path, monkeypatch, capsys):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not turned into an interruption")

    monkeypatch.setattr("minicache.calibrate.cli._run", terminated)
    assert _calibrate(["--data", str(enough_data), "--out", str(tmp_path / "p")]) == 130
    _one_clear_line(capsys.readouterr().err, "interrupted: nothing was written")
    assert signal.getsignal(signal.SIGTERM) is not None and not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_ctrl_c_in_eval_and_bench_is_one_line(command, text_file, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minicache.models.load_model", interrupted)
    out = tmp_path / "result.json"
    if command == "eval":
        from minicache.evaluate.cli import main

        code = main(["--preset", "paper", "--data", str(text_file), "--json-out", str(out)])
    else:
        from minicache.evaluate.bench_cli import main

        code = main(["--preset", "paper", "--json-out", str(out)])
    assert code == 130
    _one_clear_line(capsys.readouterr().err, "interrupted: nothing was written")
    assert not out.exists()


def test_an_interrupt_while_writing_waits_for_the_writing_to_finish(capsys):
    from minicache.calibrate.cli import _interrupts_deferred

    finished = False
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background by a shell
    with _interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        finished = True
    assert finished
    _one_clear_line(capsys.readouterr().err, "interrupt received while writing")
    assert signal.getsignal(signal.SIGINT) is before, "the handler from before the block is back"


def test_a_killed_calibrations_staging_directory_is_removed_by_the_next(tmp_path):
    from minicache.calibrate.cli import STAGING_PREFIX, output_lock

    stale = tmp_path / f"{STAGING_PREFIX}abc"
    stale.mkdir()
    (stale / "minicache_groups.png").write_bytes(b"half")
    with output_lock(tmp_path):
        assert not stale.exists()


def test_unreadable_weights_are_named(tmp_path, monkeypatch):
    from minicache.models import ModelSourceError, load_model
    from tests.test_models import write_tiny_model

    directory = write_tiny_model(tmp_path / "model")
    weights = directory / "model.safetensors"
    real_access = os.access
    monkeypatch.setattr("minicache.models.os.access",
                        lambda path, mode: False if Path(path) == weights else real_access(path, mode))
    with pytest.raises(ModelSourceError, match=rf"^{weights}: not readable \(permission denied\)$"):
        load_model(str(directory))


def test_a_pickled_checkpoint_is_one_line_from_the_commands(tmp_path, capsys):
    from tests.test_models import write_tiny_model

    directory = write_tiny_model(tmp_path / "model")
    (directory / "model.safetensors").unlink()
    # Not plain tensors: torch's weights-only loader refuses it (running it would run arbitrary code).
    torch.save({"model.embed_tokens.weight": argparse.Namespace(evil=True)}, directory / "pytorch_model.bin")
    from minicache.convert import main as convert_main

    capsys.readouterr()
    code = convert_main(["--model", str(directory), "--out", str(tmp_path / "converted")])
    assert code == 2
    _one_clear_line(capsys.readouterr().err, str(directory), "holds objects other than tensors")
    assert not (tmp_path / "converted").exists()


# ---- 5. a profile and its sidecar appear together; leftovers are cleaned by a later save -------------
def _profile(seed: int) -> MergeProfile:
    return aligned_profile(((0, 1),), heads=2, dim=16, seed=seed)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@contextlib.contextmanager
def _saves_killed_before_the_yaml():
    """Within the block, a profile save is interrupted after writing its sidecar, before its YAML."""
    import minicache.profile as profile_module

    real_write = profile_module.atomic_write

    def dies_before_the_yaml(target, data, overwrite):
        if Path(target).suffix == ".yaml":
            raise KeyboardInterrupt
        real_write(target, data, overwrite)

    profile_module.atomic_write = dies_before_the_yaml
    try:
        yield
    finally:
        profile_module.atomic_write = real_write


def test_an_interrupted_overwrite_leaves_the_old_profile_loadable(tmp_path):
    old, new = _profile(0), _profile(1)
    path = old.save(tmp_path / "p.yaml")
    with _saves_killed_before_the_yaml(), pytest.raises(KeyboardInterrupt):
        new.save(path, overwrite=True)
    assert MergeProfile.load(path) == old, "the old YAML still names its own sidecar, which is still there"
    assert len(list(tmp_path.glob("p.*.tensors"))) == 2  # the interrupted save's sidecar: an orphan for now
    new.save(path, overwrite=True)
    assert MergeProfile.load(path) == new
    assert len(list(tmp_path.glob("p.*.tensors"))) == 1, "the retry removes the old and the orphan sidecar"


def test_an_orphan_sidecar_does_not_block_the_retry(tmp_path):
    with _saves_killed_before_the_yaml(), pytest.raises(KeyboardInterrupt):
        _profile(0).save(tmp_path / "new")
    with pytest.raises(FileNotFoundError):  # no profile appears without its YAML
        MergeProfile.load(tmp_path / "new")
    _profile(2).save(tmp_path / "new")  # no --force needed: nothing was there
    assert MergeProfile.load(tmp_path / "new") == _profile(2)
    assert len([n for n in _files(tmp_path / "new") if n.endswith(".tensors")]) == 1, "the orphan is gone"


def test_yml_and_yaml_side_by_side_keep_their_own_sidecars(tmp_path):
    a, b, c = _profile(0), _profile(1), _profile(2)
    a.save(tmp_path / "x.yaml")
    b.save(tmp_path / "x.yml")
    assert MergeProfile.load(tmp_path / "x.yaml") == a and MergeProfile.load(tmp_path / "x.yml") == b
    c.save(tmp_path / "x.yml", overwrite=True)
    assert MergeProfile.load(tmp_path / "x.yaml") == a, "overwriting x.yml leaves x.yaml's sidecar alone"
    assert MergeProfile.load(tmp_path / "x.yml") == c
    a.save(tmp_path / "x.yml", overwrite=True)  # now both name one sidecar (same content)
    c.save(tmp_path / "x.yaml", overwrite=True)
    assert MergeProfile.load(tmp_path / "x.yml") == a and MergeProfile.load(tmp_path / "x.yaml") == c
    assert len(list(tmp_path.glob("x.*.tensors"))) == 2


def test_a_killed_saves_temporary_file_is_removed_by_a_later_save(tmp_path):
    stale = tmp_path / ".p.yaml.k9x2.tmp"
    stale.write_bytes(b"half a profile")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / ".p.yaml.live.tmp"  # another save, still running: left alone
    fresh.write_bytes(b"in progress")
    other = tmp_path / ".weights.safetensors.tmp"
    other.write_bytes(b"not ours")
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    _profile(0).save(tmp_path / "p.yaml")
    assert not stale.exists() and fresh.exists() and other.exists()
