"""Sample data: validation with line numbers, seeded split, token windows."""

import json
from types import SimpleNamespace

import pytest
import torch

from minicache.data import DataError, Sample, read_samples, split_samples, token_windows


def write(tmp_path, lines: list[str], name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_text_messages_and_input_ids(tmp_path):
    path = write(
        tmp_path,
        [
            json.dumps({"text": "hello world"}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"input_ids": [1, 2, 3]}),
        ],
    )
    samples = read_samples(path)
    assert [s.line for s in samples] == [1, 3, 4]
    assert samples[0].text == "hello world"
    assert samples[1].messages[0]["content"] == "hi"
    assert samples[2].input_ids == (1, 2, 3)


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('{"txt": "typo"}', "expected exactly one of the fields"),
        ('{"text": "  "}', "'text' is empty"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"text": "a", "input_ids": [1]}', "expected exactly one of the fields"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "messages[0] must be an object"),
        ('{"input_ids": [1, -2]}', "non-negative integers"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError) as err:
        read_samples(path)
    assert f"{path}:2" in str(err.value)
    assert message in str(err.value)


def test_plain_text_under_another_name_is_pointed_at_txt(tmp_path):
    # /usr/share/common-licenses/GPL-3 has no suffix: read as JSON Lines, it fails on line 1; say what to do.
    path = tmp_path / "GPL-3"
    path.write_text("GNU GENERAL PUBLIC LICENSE\nVersion 3\n")
    with pytest.raises(DataError, match=r"GPL-3:1: not valid JSON .*name ends in \.txt"):
        read_samples(path)
    bad_jsonl = tmp_path / "data.jsonl"
    bad_jsonl.write_text("not json\n")
    with pytest.raises(DataError) as err:  # a .jsonl file is JSON Lines by name: no hint
        read_samples(bad_jsonl)
    assert ".txt" not in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no records"):
        read_samples(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        read_samples(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="text file is empty"):
        read_samples(write(tmp_path, [" "], name="empty.txt"))


def test_split_is_seeded_disjoint_and_complete():
    samples = [Sample(line=i, text=str(i)) for i in range(1, 21)]
    calib, held = split_samples(samples, 0.25, seed=3)
    assert len(held) == 5 and len(calib) == 15
    assert {s.line for s in calib} | {s.line for s in held} == set(range(1, 21))
    assert not {s.line for s in calib} & {s.line for s in held}
    assert split_samples(samples, 0.25, seed=3) == (calib, held)
    assert split_samples(samples, 0.25, seed=4) != (calib, held)
    assert split_samples(samples[:1], 0.25, seed=0) == (samples[:1], [])


class ToyTokenizer:
    eos_token_id = 0

    def __len__(self):
        return 100

    def __call__(self, text, **kwargs):
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


def test_token_windows_join_samples_with_eos():
    samples = [Sample(line=1, text="1 2 3"), Sample(line=2, text="4 5"), Sample(line=3, input_ids=(6, 7, 8, 9))]
    windows = token_windows(samples, ToyTokenizer(), length=4)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three windows of 4
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert token_windows(samples, ToyTokenizer(), length=4, max_windows=2).shape == (2, 4)
    with pytest.raises(DataError, match="outside the vocabulary"):
        token_windows([Sample(line=7, input_ids=(500,))], ToyTokenizer(), length=4)


def test_spread_windows_come_from_all_over_the_data():
    # 12 samples of one window each (3 ids + separator): ids tell where a window came from
    samples = [Sample(line=i + 1, input_ids=(8 * i + 1, 8 * i + 2, 8 * i + 3)) for i in range(12)]
    first = token_windows(samples, ToyTokenizer(), length=4, max_windows=3)
    assert first[:, 0].tolist() == [1, 9, 17], "without spread: the first windows"
    spread = token_windows(samples, ToyTokenizer(), length=4, max_windows=3, spread=True)
    assert spread[:, 0].tolist() == [17, 49, 81], "windows 2, 6, 10: the middle of each third of the data"
    assert token_windows(samples, ToyTokenizer(), length=4, max_windows=20, spread=True).shape == (12, 4)
    assert torch.equal(token_windows(samples, ToyTokenizer(), length=4, max_windows=12, spread=True),
                       token_windows(samples, ToyTokenizer(), length=4)), "every window when all are wanted"
