"""Shared fixtures: the README's own --smoke commands, run once per session in a scratch directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def readme_commands() -> list[list[str]]:
    """Every command in the README's indented code blocks, as words (comments dropped, continuations joined)."""
    commands, pending = [], ""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("    ") and not pending:
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        first = text.split(maxsplit=1)[0] if text else ""
        if first and not any(c in first for c in "/.,"):  # a program, not a file in the layout block
            words = shlex.split(re.sub(r"\s#.*$", "", text))
            while "&&" in words:
                commands.append(words[:words.index("&&")])
                words = words[words.index("&&") + 1:]
            commands.append(words)
    return commands


def in_scratch_dir(words: list[str]) -> list[str]:
    """A README command as run from a scratch directory: this interpreter, the scripts by their path here."""
    if words[0] != "python3":
        return words
    rest = [str(ROOT / w) if w in ("baseline.py", "modified.py") else w for w in words[1:]]
    return [sys.executable, *rest]


def run_in(cwd: Path, words: list[str], timeout_s: int = 300) -> subprocess.CompletedProcess:
    env = {**OFFLINE_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(in_scratch_dir(words), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def is_smoke_training(words: list[str]) -> bool:
    return words[0] == "python3" and "--smoke" in words and "--eval-only" not in words


@pytest.fixture(scope="session")
def readme_runs(tmp_path_factory) -> Path:
    """A scratch directory in which every README `--smoke` training command has run, in the README's order."""
    cwd = tmp_path_factory.mktemp("readme")
    launched_s = {}  # each script's launch, epoch seconds: the phase-timing test's outside clock
    for words in filter(is_smoke_training, readme_commands()):
        launched_s[words[1]] = time.time()
        done = run_in(cwd, words)
        assert done.returncode == 0, f"{' '.join(words)}:\n{done.stderr[-3000:]}"
    (cwd / "launched_s.json").write_text(json.dumps(launched_s))
    return cwd


@pytest.fixture(scope="session")
def smoke_runs(readme_runs) -> dict[str, Path]:
    runs = {script: readme_runs / "runs" / script.removesuffix(".py") for script in ("baseline.py", "modified.py")}
    for script, run_dir in runs.items():
        assert (run_dir / "metrics.json").is_file(), f"the README's quick start has no `python3 {script} --smoke`"
    return runs
