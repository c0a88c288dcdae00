"""The real job's size at PIQA's own token lengths, from the validation examples a machine has (offline runs).

    python3 -m tools.real_job_data SRC DST [--times 16]

SRC holds PIQA's release layout for one split (valid.jsonl + valid-labels.lst); DST gets train.jsonl and
train-labels.lst (SRC's examples repeated --times times: 16 x 1,000 = 16,000, PIQA's train split is 16,113) and
valid.jsonl and valid-labels.lst (SRC's once). Good for time, memory and disk; useless for accuracy, since the
training, selection and reported examples overlap.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--times", type=int, default=16, help="repetitions of SRC's examples in train.jsonl")
    args = parser.parse_args(argv)
    examples = (args.src / "valid.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    labels = (args.src / "valid-labels.lst").read_text(encoding="utf-8").splitlines(keepends=True)
    if len(examples) != len(labels):
        parser.error(f"{args.src}: {len(examples)} examples but {len(labels)} labels")
    args.dst.mkdir(parents=True, exist_ok=True)
    (args.dst / "train.jsonl").write_text("".join(examples * args.times), encoding="utf-8")
    (args.dst / "train-labels.lst").write_text("".join(labels * args.times), encoding="utf-8")
    (args.dst / "valid.jsonl").write_text("".join(examples), encoding="utf-8")
    (args.dst / "valid-labels.lst").write_text("".join(labels), encoding="utf-8")
    print(f"{args.dst}: {len(examples) * args.times:,} training and {len(examples):,} validation examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
