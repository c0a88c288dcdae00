"""Arguments are declared once, checked up front; the two scripts differ only in their profile."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import baseline
import modified
from common.config import ConfigError, ExperimentArguments, Profile, parse_arguments, redact
from common.training import build_training_arguments

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_differ_only_in_their_profile():
    def body(name: str) -> list[str]:
        lines = (ROOT / name).read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("PROFILE = Profile("))
        end = next(i for i in range(start, len(lines)) if lines[i] == ")")
        return lines[:start] + lines[end + 1:]

    def code(lines: list[str]) -> list[str]:
        docstring_end = next(i for i, line in enumerate(lines) if i > 0 and line.strip() == '"""')
        return lines[docstring_end + 1:]

    assert code(body("baseline.py")) == code(body("modified.py"))


def test_profiles_hold_the_settings_the_issue_names():
    assert baseline.PROFILE.precision == "fp32"
    assert baseline.PROFILE.save_total_limit is None
    assert not baseline.PROFILE.load_best_model_at_end
    assert not baseline.PROFILE.pin_memory
    assert baseline.PROFILE.gradient_accumulation_steps == 4 and baseline.PROFILE.gradient_checkpointing
    assert modified.PROFILE.precision == "mixed"
    assert modified.PROFILE.save_total_limit == 1
    assert modified.PROFILE.load_best_model_at_end
    assert modified.PROFILE.pin_memory


def test_experiment_is_identical_in_both_training_arguments(tmp_path):
    args = parse_arguments(["--smoke"])
    a = build_training_arguments(args, baseline.PROFILE, str(tmp_path))
    b = build_training_arguments(args, modified.PROFILE, str(tmp_path))
    for name in ("seed", "data_seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                 "weight_decay", "eval_strategy", "save_strategy"):
        assert getattr(a, name) == getattr(b, name), name
    examples_per_step = lambda t: t.per_device_train_batch_size * t.gradient_accumulation_steps  # noqa: E731
    assert examples_per_step(a) == examples_per_step(b) == args.batch_size
    assert not a.bf16 and not a.fp16 and b.bf16
    assert a.save_total_limit is None and b.save_total_limit == 1
    assert not a.load_best_model_at_end and b.load_best_model_at_end and b.metric_for_best_model == "accuracy"


def test_help_documents_every_argument_as_the_readme_spells_it():
    out = subprocess.run([sys.executable, "modified.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for field in dataclasses.fields(ExperimentArguments):
        assert f"--{field.name.replace('_', '-')}" in out.stdout
        assert f"--{field.name} " not in out.stdout or "_" not in field.name  # one spelling: the README's
        assert field.metadata.get("help"), f"{field.name} has no help text"
    assert "'modified' profile" in out.stdout and "llama-3.2-1b-random" in out.stdout
    text = " ".join(out.stdout.split())
    assert text.count("(default: 500)") == 1  # each default said once
    assert "(default: None)" not in text and "(default: False)" not in text


def test_json_config_file_is_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"smoke": True, "seed": 7, "eval_samples": "all", "learning-rate": 0.5}))
    args = parse_arguments([str(path)])
    assert args.seed == 7 and args.eval_samples == "all" and args.model == "smoke" and args.learning_rate == 0.5


def test_json_config_file_and_flags_the_flags_win(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"smoke": True, "seed": 7, "max_steps": -1, "data_dir": None}))
    args = parse_arguments([str(path), "--seed", "8", "--eval-only"])
    assert args.seed == 8 and args.eval_only and args.model == "smoke" and args.batch_size == 8
    assert parse_arguments([str(path), "--smoke", "false"]).model != "smoke"


@pytest.mark.parametrize("argv", [["--eval-sample", "10"], ["--batch", "8"], ["--data_dirr", "x"]])
def test_no_abbreviation_is_ever_taken_for_an_option(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_arguments(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: unknown option {argv[0]}")


def test_smoke_defaults_yield_to_the_command_line():
    args = parse_arguments(["--smoke", "--learning-rate", "0.01"])
    assert args.learning_rate == 0.01 and args.model == "smoke"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be greater than 0"),
        (["--learning-rate", "-1"], "--learning-rate must be greater than 0"),
        (["--num-train-epochs", "0"], "--num-train-epochs must be greater than 0"),
        (["--eval-samples", "0"], "--eval-samples must be greater than 0"),
        (["--eval-samples", "some"], "--eval-samples must be a positive integer or 'all'"),
        (["--eval-method", "vibes"], "--eval-method must be one of"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_out_of_range_arguments_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--smoke", *argv])


def test_batch_must_split_into_micro_batches():
    args = parse_arguments(["--smoke", "--batch-size", "6"])
    with pytest.raises(ConfigError, match="not divisible"):
        args.micro_batch_size(Profile("x", "fp32", None, False, False, gradient_accumulation_steps=4))


def test_secrets_are_redacted_and_absent_ones_stay_null():
    assert redact({"hub_token": "hf_abc", "seed": 1}) == {"hub_token": "<redacted>", "seed": 1}
    assert redact({"token": None}) == {"token": None}
