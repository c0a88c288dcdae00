"""PIQA data: from the Hub, from a folder in the release layout, or the bundled sample.

Every loader returns plain `PiqaExample`s, checked up front: a bad file gets one `DataError`
naming the file and line, before any model is loaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from common import hub
from common.prompts import encode_pairs, format_context, format_continuation

SAMPLE_DIR = Path(__file__).parent / "sample"
HUB_DATASET = "ybisk/piqa"
HUB_REVISION = "refs/convert/parquet"
SPLIT_FILES = {"train": ("train.jsonl", "train-labels.lst"), "validation": ("valid.jsonl", "valid-labels.lst")}
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data problem the user must fix; the message names the file and line."""


@dataclass(frozen=True)
class PiqaExample:
    id: str
    goal: str
    sol1: str
    sol2: str
    label: int  # 0: sol1 is correct, 1: sol2 is correct

    @property
    def correct_solution(self) -> str:
        return self.sol2 if self.label == 1 else self.sol1


def decode_line(raw: bytes, path: Path, line_no: int) -> str:
    """A line of a data file as UTF-8 text; one that is not is a DataError naming the file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8") from None


def read_release_split(data_dir: Path, split: str) -> list[PiqaExample]:
    """Read `<split>.jsonl` + `<split>-labels.lst` (PIQA's release layout), validating every line."""
    examples_name, labels_name = SPLIT_FILES[split]
    examples_path, labels_path = Path(data_dir) / examples_name, Path(data_dir) / labels_name
    for path in (examples_path, labels_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found (a PIQA data dir holds {examples_name} and {labels_name})")

    records = []
    with examples_path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = decode_line(raw, examples_path, line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{examples_path}:{line_no}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{examples_path}:{line_no}: expected a JSON object")
            for field in ("goal", "sol1", "sol2"):
                if not isinstance(record.get(field), str):
                    raise DataError(f"{examples_path}:{line_no}: missing or non-text field '{field}'")
            records.append((line_no, record))

    labels = []
    with labels_path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = decode_line(raw, labels_path, line_no)
            if not line.strip():
                continue
            if line.strip() not in ("0", "1"):
                raise DataError(f"{labels_path}:{line_no}: label must be 0 or 1, got {line.strip()!r}")
            labels.append(int(line))

    if not records:
        raise DataError(f"{examples_path}: the {split} split is empty")
    if len(labels) != len(records):
        raise DataError(
            f"{labels_path}:{len(labels)}: {len(labels)} labels for {len(records)} examples in {examples_path}"
        )
    return [
        PiqaExample(id=f"{split}-{line_no}", goal=r["goal"], sol1=r["sol1"], sol2=r["sol2"], label=label)
        for (line_no, r), label in zip(records, labels)
    ]


def read_hub_split(split: str, cache_dir: str | None = None) -> list[PiqaExample]:
    """PIQA from the Hub through a parquet-backed copy (the canonical repo's loading script is refused by datasets>=4)."""
    from datasets import load_dataset

    try:
        rows = load_dataset(HUB_DATASET, revision=HUB_REVISION, split=split, cache_dir=cache_dir)
    except Exception as err:  # anything the Hub or datasets raise becomes one clear line
        raise DataError(hub.failure_message(f"PIQA ({HUB_DATASET})", err)) from err
    return [
        PiqaExample(id=f"{split}-{i + 1}", goal=r["goal"], sol1=r["sol1"], sol2=r["sol2"], label=int(r["label"]))
        for i, r in enumerate(rows)
    ]


def load_split(split: str, data_dir: str | None, smoke: bool = False) -> list[PiqaExample]:
    """--data-dir if given, else the bundled sample under --smoke, else the Hub."""
    if data_dir:
        return read_release_split(Path(data_dir).expanduser(), split)
    if smoke:
        return read_release_split(SAMPLE_DIR, split)
    return read_hub_split(split)


def draw(examples: list[PiqaExample], count: int | None, seed: int, what: str) -> list[PiqaExample]:
    """A deterministic random subset of `count` examples (all of them, shuffled, when count is None)."""
    if count is not None and count > len(examples):
        raise DataError(f"{what}: asked for {count} examples but only {len(examples)} exist")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled if count is None else shuffled[:count]


@dataclass
class ExperimentData:
    train: list[PiqaExample]
    selection: list[PiqaExample]  # held out from train; drives load_best_model_at_end
    report: list[PiqaExample]  # validation examples: reported, never used for training or selection


def build_experiment_data(
    data_dir: str | None,
    smoke: bool,
    train_samples: int | None,
    selection_samples: int,
    eval_samples: int | None,
    seed: int,
    need_train: bool = True,
) -> ExperimentData:
    """Split the data once, the same way for both scripts: selection is carved out of train, report from validation."""
    report = draw(load_split("validation", data_dir, smoke), eval_samples, seed, "--eval-samples (validation split)")
    if not need_train:
        return ExperimentData(train=[], selection=[], report=report)
    pool = load_split("train", data_dir, smoke)
    if selection_samples >= len(pool):
        raise DataError(f"--selection-samples {selection_samples}: the train split has only {len(pool)} examples")
    shuffled = draw(pool, None, seed, "train split")
    selection, rest = shuffled[:selection_samples], shuffled[selection_samples:]
    train = draw(rest, train_samples, seed, f"--train-samples (train split minus {selection_samples} held out)")
    return ExperimentData(train=train, selection=selection, report=report)


def training_pairs(examples: list[PiqaExample], tokenizer) -> list[tuple[list[int], list[int]]]:
    """Each example's prompt and correct solution as (context ids, answer ids), encoded exactly as evaluation scores
    them (`encode_pairs`), in one batched call (one call per example took seconds for PIQA's 16,000)."""
    if not examples:  # --eval-only (a tokenizer refuses an empty batch)
        return []
    texts = [(format_context(e.goal), format_continuation(e.correct_solution)) for e in examples]
    return encode_pairs(tokenizer, texts)


def training_feature(context_ids: list[int], answer_ids: list[int], eos_token_id: int | None, max_length: int) -> dict:
    """Context + answer, then EOS; the loss is on the answer tokens only (context labels are IGNORE_INDEX)."""
    answer_ids = answer_ids + ([eos_token_id] if eos_token_id is not None else [])
    input_ids = context_ids + answer_ids
    labels = [IGNORE_INDEX] * len(context_ids) + answer_ids
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(input_ids) > max_length,
    }


def tokenize_for_training(example: PiqaExample, tokenizer, max_length: int) -> dict:
    """One example's training feature (training_feature), with `truncated`."""
    context_ids, answer_ids = training_pairs([example], tokenizer)[0]
    return training_feature(context_ids, answer_ids, tokenizer.eos_token_id, max_length)


def training_features(pairs: list[tuple[list[int], list[int]]], eos_token_id: int | None,
                      max_length: int) -> tuple[list[dict], int]:
    """The training features of `training_pairs`; returns them and how many examples `max_length` cut."""
    features = [training_feature(context, answer, eos_token_id, max_length) for context, answer in pairs]
    truncated_count = sum(f.pop("truncated") for f in features)
    return features, truncated_count


def round_up(length: int, multiple: int | None) -> int:
    """`length` padded to a multiple of `multiple` (unchanged without one)."""
    return -(-length // multiple) * multiple if multiple else length


class PadToLongest:
    """Dynamic padding per batch (right side); labels padded with IGNORE_INDEX so padding never counts."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
