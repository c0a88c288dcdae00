"""Data loading: the bundled sample, the release layout, every bad-input case, subsets, answer-only labels."""

import json
from pathlib import Path

import pytest

from common.data import (
    IGNORE_INDEX,
    SAMPLE_DIR,
    DataError,
    PadToLongest,
    PiqaExample,
    build_experiment_data,
    read_release_split,
    tokenize_for_training,
)
from common.models import byte_level_tokenizer
from common.prompts import format_context, format_continuation


def write_split(directory: Path, split: str, lines: list[str], labels: list[str]) -> Path:
    names = {"train": ("train.jsonl", "train-labels.lst"), "validation": ("valid.jsonl", "valid-labels.lst")}[split]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / names[0]).write_text("".join(line + "\n" for line in lines))
    (directory / names[1]).write_text("".join(label + "\n" for label in labels))
    return directory


GOOD = json.dumps({"goal": "Dry a wet phone", "sol1": "Put it in a bag of rice", "sol2": "Put it in the oven"})


def test_bundled_sample_loads_and_is_balanced():
    train = read_release_split(SAMPLE_DIR, "train")
    valid = read_release_split(SAMPLE_DIR, "validation")
    assert len(train) >= 60 and len(valid) >= 30
    for split in (train, valid):
        assert {e.label for e in split} == {0, 1}
    assert not {e.goal for e in train} & {e.goal for e in valid}


@pytest.mark.parametrize(
    "lines, labels, message",
    [
        (["{not json"], ["0"], "valid.jsonl:1: malformed JSON"),
        ([GOOD, json.dumps({"goal": "g", "sol1": "a"})], ["0", "1"], "valid.jsonl:2: missing or non-text field 'sol2'"),
        ([GOOD, "[1, 2]"], ["0", "1"], "valid.jsonl:2: expected a JSON object"),
        ([GOOD, GOOD], ["0", "2"], "valid-labels.lst:2: label must be 0 or 1, got '2'"),
        ([GOOD, GOOD], ["1"], "1 labels for 2 examples"),
        ([], [], "the validation split is empty"),
    ],
)
def test_bad_release_files_name_file_and_line(tmp_path, lines, labels, message):
    write_split(tmp_path, "validation", lines, labels)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_release_split(tmp_path, "validation")


def test_missing_file_is_named(tmp_path):
    (tmp_path / "valid.jsonl").write_text(GOOD + "\n")
    with pytest.raises(DataError, match="valid-labels.lst: file not found"):
        read_release_split(tmp_path, "validation")


def test_more_samples_than_exist_is_refused():
    with pytest.raises(DataError, match="asked for 1000 examples but only"):
        build_experiment_data(None, True, None, 8, 1000, seed=1)


def test_subsets_are_deterministic_disjoint_and_seeded():
    a = build_experiment_data(None, True, 20, 8, 10, seed=3)
    b = build_experiment_data(None, True, 20, 8, 10, seed=3)
    c = build_experiment_data(None, True, 20, 8, 10, seed=4)
    assert [e.id for e in a.train] == [e.id for e in b.train]
    assert [e.id for e in a.report] == [e.id for e in b.report]
    assert [e.id for e in a.train] != [e.id for e in c.train]
    assert not {e.id for e in a.train} & {e.id for e in a.selection}
    assert all(e.id.startswith("validation-") for e in a.report)
    assert all(e.id.startswith("train-") for e in a.train + a.selection)
    assert (len(a.train), len(a.selection), len(a.report)) == (20, 8, 10)


@pytest.mark.parametrize("label", [0, 1])
def test_training_labels_cover_the_correct_answer_only(label):
    tokenizer = byte_level_tokenizer()
    example = PiqaExample("x", goal="Open a jar", sol1="Twist the lid", sol2="Freeze the lid", label=label)
    feature = tokenize_for_training(example, tokenizer, max_length=512)
    answer = [t for t in feature["labels"] if t != IGNORE_INDEX]
    expected = tokenizer(format_continuation(example.correct_solution), add_special_tokens=False)["input_ids"]
    assert answer == expected + [tokenizer.eos_token_id]
    context_len = len(tokenizer(format_context(example.goal))["input_ids"])
    assert feature["labels"][:context_len] == [IGNORE_INDEX] * context_len
    assert feature["input_ids"][context_len:] == answer
    assert not feature["truncated"]


def test_truncation_is_reported():
    tokenizer = byte_level_tokenizer()
    example = PiqaExample("x", goal="g" * 50, sol1="a" * 50, sol2="b", label=0)
    assert tokenize_for_training(example, tokenizer, max_length=20)["truncated"]


def test_padding_never_counts_in_the_loss():
    batch = PadToLongest(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [5], "labels": [5]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_data_dir_under_home_is_found_as_written(tmp_path, monkeypatch):
    """`--data-dir ~/piqa` (or a config file's "data_dir") expands `~`, as --model and --output-dir do."""
    import shutil

    from common.data import load_split

    sample = Path(__file__).resolve().parent.parent / "common" / "sample"
    shutil.copytree(sample, tmp_path / "piqa")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_split("validation", "~/piqa") == load_split("validation", str(tmp_path / "piqa"))
