"""The README cannot rot: every command it shows exists here, and every one that can run offline runs."""

from __future__ import annotations

import configparser
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, is_smoke_training, readme_commands, run_in

from common.config import parse_arguments

COMMANDS = readme_commands()
SCRIPTS = ("baseline.py", "modified.py")


def program_path(name: str) -> str | None:
    """An executable of this environment first (the virtualenv's bin), then the PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def is_script(words: list[str]) -> bool:
    return words[0] == "python3" and len(words) > 1 and words[1] in SCRIPTS


def test_the_readme_shows_commands():
    assert any(is_smoke_training(words) for words in COMMANDS)
    assert any(is_script(words) and "--eval-only" in words for words in COMMANDS)


@pytest.mark.parametrize("words", [w for w in COMMANDS if w[0] not in ("python3", "pip")], ids=" ".join)
def test_every_other_program_exists_in_the_installed_versions(words):
    """`hf auth login`, `torchrun`, `accelerate launch`: the program and its subcommand answer --help here."""
    path = program_path(words[0])
    assert path, f"{words[0]}: not installed"
    subcommand = [w for w in words[1:3] if not w.startswith("-")][:2] if words[0] in ("hf", "accelerate") else []
    done = run_in(ROOT, [path, *subcommand, "--help"], timeout_s=120)
    assert done.returncode == 0, f"{' '.join(words)}: {done.stderr[-1000:]}"
    for word in words:
        if word.startswith("common/"):
            assert (ROOT / word).exists(), word


def test_install_lines_work_on_a_plain_cpu_machine():
    installs = [w for w in COMMANDS if w[:2] == ["pip", "install"]]
    torch_lines = [w for w in installs if any(x.startswith("torch==") for x in w)]
    assert any("https://download.pytorch.org/whl/cpu" in w for w in torch_lines), "say how to get the CPU build"
    for words in installs:
        if "-r" in words:
            assert (ROOT / words[words.index("-r") + 1]).is_file()


def test_pytest_lines_name_registered_markers():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    markers = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].strip().splitlines()}
    for words in COMMANDS:
        if words[:3] == ["python3", "-m", "pytest"] and "-m" in words[3:]:
            expression = words[3:][words[3:].index("-m") + 1]
            assert set(expression.replace("(", " ").replace(")", " ").split()) - {"and", "or", "not"} <= markers


@pytest.mark.parametrize("words", [w for w in COMMANDS if is_script(w) and "--help" not in w], ids=" ".join)
def test_every_script_command_parses(words, tmp_path, monkeypatch):
    """Real runs need the Hub or a GPU; their arguments at least are all accepted, each as the value it gives."""
    monkeypatch.chdir(tmp_path)
    options = words[2:]
    if options and options[0].endswith(".json"):
        Path(options[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(options[0]).write_text(json.dumps({"seed": 42}))  # the README's example config file
    args, engine = parse_arguments(options)
    if options and options[0].endswith(".json"):
        given = int(options[options.index("--seed") + 1]) if "--seed" in options else 42
        assert args.seed == given  # the file's seed, unless a flag after the file gives one
        options = options[1:]
    for i, option in enumerate(options):
        if not option.startswith("--"):
            continue
        name = option[2:].replace("-", "_")
        value = options[i + 1] if i + 1 < len(options) and not options[i + 1].startswith("--") else None
        owners = [a for a in (args, engine) if hasattr(a, name.removeprefix("no_"))]
        assert owners, f"{option} names no argument"
        owner = owners[0]
        if value is not None:
            assert str(getattr(owner, name)) == value, option
        else:  # a switch: --smoke sets smoke, --no-liger clears liger
            assert getattr(owner, name.removeprefix("no_")) is (not name.startswith("no_")), option


def test_every_offline_command_runs(readme_runs):
    """In README order, from one scratch directory: the --smoke runs (the session fixture ran them), --help,
    every compare, and every --eval-only example on the smoke runs (with --smoke for the offline data)."""
    ran = []
    for words in COMMANDS:
        if is_smoke_training(words) or words[0] != "python3":
            continue
        if "--help" in words or words[1:3] == ["-m", "tools.compare"]:
            command = words
        elif is_script(words) and "--eval-only" in words:
            command = [*words, "--smoke"]
        else:
            continue
        done = run_in(readme_runs, command)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        ran.append(command)
    assert any("--help" in c for c in ran) and any("tools.compare" in c for c in ran)
    assert (readme_runs / "runs" / "compare.md").is_file()
    # The README's --eval-only examples wrote directories of their own and left the training runs as they were.
    assert sorted(p.name for p in (readme_runs / "runs").glob("modified-eval*"))
    assert json.loads((readme_runs / "runs" / "modified" / "metrics.json").read_text())["status"] == "finished"
    assert (readme_runs / "runs" / "modified" / "final_model" / "config.json").is_file()
