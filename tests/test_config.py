"""Arguments are declared once, checked up front; the two scripts differ only in their profile."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baseline
import modified
from common import profiles
from common.config import (
    ConfigError,
    EngineArguments,
    ExperimentArguments,
    Profile,
    parse_arguments,
    redact,
    resolved_config,
)
from common.precision import resolve_precision
from common.training import build_training_arguments, training_argument_values

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_differ_only_in_their_docstring_and_the_profile_they_name():
    """`diff baseline.py modified.py`: the docstrings, and the one line that names the script's profile."""
    import difflib

    differing = [
        line[1:].strip() for line in difflib.unified_diff(
            (ROOT / "baseline.py").read_text().splitlines(), (ROOT / "modified.py").read_text().splitlines(),
            lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    docstring = [line for line in differing if line.startswith(('"""', "python3 "))]
    code = [line.split("#")[0].strip() for line in differing if line not in docstring]
    assert sorted(code) == ["from common.profiles import BASELINE as PROFILE",
                            "from common.profiles import MODIFIED as PROFILE"]
    assert baseline.PROFILE is profiles.BASELINE and modified.PROFILE is profiles.MODIFIED


def test_the_profiles_differ_in_precision_checkpoint_management_and_pinned_memory_only():
    assert {f.name for f in dataclasses.fields(Profile)} == {
        "name", "precision", "save_total_limit", "load_best_model_at_end", "pin_memory"}
    assert (profiles.BASELINE.precision, profiles.MODIFIED.precision) == ("fp32", "mixed")
    assert (profiles.BASELINE.save_total_limit, profiles.MODIFIED.save_total_limit) == (None, 1)
    assert (profiles.BASELINE.load_best_model_at_end, profiles.MODIFIED.load_best_model_at_end) == (False, True)
    assert (profiles.BASELINE.pin_memory, profiles.MODIFIED.pin_memory) == (False, True)


def test_engine_settings_are_flags_shared_by_both_scripts(tmp_path):
    """Every engine setting reaches the TrainingArguments of both profiles identically; only the profile's differ."""
    args, engine = parse_arguments(["--smoke", "--gradient-accumulation-steps", "4", "--no-liger",
                                    "--optim", "adamw_torch", "--train-sampling-strategy", "random"])
    assert (engine.gradient_accumulation_steps, engine.liger, engine.optim) == (4, False, "adamw_torch")
    a = build_training_arguments(args, engine, profiles.BASELINE, resolve_precision("fp32"), str(tmp_path))
    b = build_training_arguments(args, engine, profiles.MODIFIED, resolve_precision("mixed"), str(tmp_path))
    profile_fields = {"bf16", "fp16", "tf32", "save_total_limit", "load_best_model_at_end", "metric_for_best_model",
                      "greater_is_better", "dataloader_pin_memory"}
    differing = {f.name for f in dataclasses.fields(a) if f.name not in profile_fields
                 and repr(getattr(a, f.name)) != repr(getattr(b, f.name))}
    assert differing <= {"logging_dir"}, differing  # a timestamped folder name
    examples_per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps
    assert (a.gradient_accumulation_steps, examples_per_step) == (4, args.batch_size)
    assert str(getattr(a.optim, "value", a.optim)) == "adamw_torch" and a.train_sampling_strategy == "random"
    assert not a.use_liger_kernel


def test_engine_defaults_are_one_micro_batch_grouped_liger_and_fused_adamw():
    engine = EngineArguments()
    assert engine.gradient_accumulation_steps == 1 and engine.gradient_checkpointing
    assert engine.optim == "adamw_torch_fused" and engine.liger
    assert engine.train_sampling_strategy == "group_by_length" and not engine.cudnn_attention


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned memory is off without CUDA")
def test_precision_and_pinned_memory_reach_the_training_arguments(tmp_path):
    """From each script's profile to what the Trainer and torch are given."""
    args, engine = parse_arguments(["--smoke"])
    fp32 = build_training_arguments(args, engine, baseline.PROFILE, resolve_precision("fp32"), str(tmp_path))
    mixed = build_training_arguments(args, engine, modified.PROFILE, resolve_precision("mixed"), str(tmp_path))
    assert not fp32.bf16 and not fp32.fp16 and mixed.bf16 and not mixed.fp16  # bf16 autocast on the CPU
    assert resolve_precision(baseline.PROFILE.precision).autocast_dtype is None
    assert resolve_precision(modified.PROFILE.precision).autocast_dtype == torch.bfloat16
    assert not fp32.dataloader_pin_memory and not mixed.dataloader_pin_memory  # pinning needs CUDA
    on_gpu = [training_argument_values(args, engine, p, resolve_precision(p.precision, on_cuda=True), str(tmp_path))
              for p in (baseline.PROFILE, modified.PROFILE)]
    assert [v["dataloader_pin_memory"] for v in on_gpu] == [False, True]
    assert [v["tf32"] for v in on_gpu] == [False, None]  # fp32 means no TF32 matmuls; mixed leaves torch's default
    assert fp32.save_total_limit is None and mixed.save_total_limit == 1
    assert not fp32.load_best_model_at_end and mixed.load_best_model_at_end and mixed.metric_for_best_model == "accuracy"


def test_accelerate_launch_cannot_turn_fp32_into_mixed_precision(tmp_path, monkeypatch):
    """`accelerate launch` exports its config's mixed_precision, which the Trainer takes where bf16 and fp16 are both
    off: the baseline is refused rather than silently trained in bf16; the repository's FSDP config leaves it to the
    profile."""
    import yaml

    from common.preflight import check_trainer_arguments

    assert yaml.safe_load((ROOT / "common" / "fsdp.yaml").read_text())["mixed_precision"] == "no"
    args, engine = parse_arguments(["--smoke"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision is 'bf16'.*'fp32' precision means 'no'"):
        check_trainer_arguments(args, engine, baseline.PROFILE, resolve_precision("fp32"), tmp_path)
    check_trainer_arguments(args, engine, modified.PROFILE, resolve_precision("mixed"), tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_trainer_arguments(args, engine, baseline.PROFILE, resolve_precision("fp32"), tmp_path)


def test_help_documents_every_argument_as_the_readme_spells_it():
    out = subprocess.run([sys.executable, "modified.py", "--help"], cwd=ROOT, check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0
    for field in dataclasses.fields(ExperimentArguments) + dataclasses.fields(EngineArguments):
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
    args, _ = parse_arguments([str(path)])
    assert args.seed == 7 and args.eval_samples == "all" and args.model == "smoke" and args.learning_rate == 0.5


def test_json_config_file_and_flags_the_flags_win(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"smoke": True, "seed": 7, "max_steps": -1, "data_dir": None, "liger": False}))
    args, engine = parse_arguments([str(path), "--seed", "8", "--eval-only"])
    assert args.seed == 8 and args.eval_only and args.model == "smoke" and args.batch_size == 8 and not engine.liger
    assert parse_arguments([str(path), "--smoke", "false"])[0].model != "smoke"


@pytest.mark.parametrize("argv", [["--eval-sample", "10"], ["--batch", "8"], ["--data_dirr", "x"], ["--no-lig"]])
def test_no_abbreviation_is_ever_taken_for_an_option(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_arguments(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: unknown option {argv[0]}")


def test_smoke_defaults_yield_to_the_command_line():
    args, _ = parse_arguments(["--smoke", "--learning-rate", "0.01"])
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
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least 1"),
        (["--train-sampling-strategy", "sorted"], "--train-sampling-strategy must be one of"),
        (["--ddp-comm-hook", "powersgd"], "--ddp-comm-hook must be one of"),
    ],
)
def test_out_of_range_arguments_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--smoke", *argv])


def test_batch_must_split_into_micro_batches():
    args, _ = parse_arguments(["--smoke", "--batch-size", "6"])
    with pytest.raises(ConfigError, match="not divisible"):
        args.micro_batch_size(EngineArguments(gradient_accumulation_steps=4))


def test_secrets_are_redacted_and_absent_ones_stay_null():
    assert redact({"hub_token": "hf_abc", "seed": 1}) == {"hub_token": "<redacted>", "seed": 1}
    assert redact({"token": None}) == {"token": None}


def test_help_answers_before_torch_and_transformers_are_imported():
    """`--help` and a mistyped option are read before the seconds-long imports (--help within 2 s)."""
    code = ("import sys, time\nstarted = time.perf_counter()\nimport modified\n"
            "for argv in (['--help'], ['--batchsize', '8']):\n"
            "    try:\n        modified.main(modified.PROFILE, argv)\n    except SystemExit:\n        pass\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)), time.perf_counter() - started)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    imported, took_s = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert imported == "[]", done.stdout
    assert float(took_s) < 2.0


def test_every_switch_that_is_on_by_default_has_an_off_flag_with_its_own_help():
    out = subprocess.run([sys.executable, "baseline.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout
    text = " ".join(out.split())
    on_by_default = [f.name.replace("_", "-") for f in dataclasses.fields(EngineArguments) if f.default is True]
    assert on_by_default
    for name in on_by_default:
        assert f"--no-{name} Turn --{name} off" in text, name
    assert parse_arguments(["--smoke", "--no-gradient-checkpointing"])[1].gradient_checkpointing is False
    assert parse_arguments(["--smoke", "--no_liger"])[1].liger is False


def test_a_runs_config_json_repeats_it(tmp_path):
    """`python3 modified.py runs/modified/config.json` parses to the arguments the run had; how it was
    started (--overwrite, --resume) and the redacted token are not replayed."""
    typed = ["--smoke", "--seed", "7", "--learning-rate", "0.002", "--eval-samples", "all", "--no-liger",
             "--gradient-accumulation-steps", "2", "--output-dir", "runs/x", "--overwrite", "--token", "hf_secret"]
    args, engine = parse_arguments(typed)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(resolved_config(args, engine, profiles.MODIFIED)))
    again, engine_again = parse_arguments([str(path)], profile=profiles.MODIFIED)
    assert engine_again == engine
    assert again == dataclasses.replace(args, overwrite=False, token=None)
    assert parse_arguments([str(path), "--resume"], profile=profiles.MODIFIED)[0].resume  # flags after it still win


def test_a_runs_config_json_is_refused_by_the_other_script(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(resolved_config(*parse_arguments(["--smoke"]), profiles.MODIFIED)))
    with pytest.raises(SystemExit):
        parse_arguments([str(path)], profile=profiles.BASELINE)
    assert capsys.readouterr().err == (f"error: {path}: written by a run of modified.py (its profile section): "
                                       f"run python3 modified.py {path}\n")


def test_a_resume_must_continue_the_recorded_experiment_with_the_same_script():
    from common.config import check_resumes_the_same_run

    args, engine = parse_arguments(["--smoke"])
    saved = json.loads(json.dumps(resolved_config(args, engine, profiles.MODIFIED)))  # as config.json holds it
    check_resumes_the_same_run(saved, args, profiles.MODIFIED)
    moved, _ = parse_arguments(["--smoke", "--output-dir", "elsewhere", "--resume", "--gradient-accumulation-steps", "2"])
    check_resumes_the_same_run(saved, moved, profiles.MODIFIED)  # where and how it runs may change
    other, _ = parse_arguments(["--smoke", "--seed", "7", "--learning-rate", "0.5"])
    with pytest.raises(ConfigError, match=r"--learning-rate 0.001 -> 0.5; --seed 42 -> 7"):
        check_resumes_the_same_run(saved, other, profiles.MODIFIED)
    with pytest.raises(ConfigError, match="made by modified.py"):
        check_resumes_the_same_run(saved, args, profiles.BASELINE)
