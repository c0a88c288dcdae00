"""Every mistake a user can type: one `error:` line, exit code 2, no traceback, and nothing destroyed.

Each case runs the real entry point, `run(profile, argv)`, from a scratch directory that holds a finished run (with
its final_model), a run interrupted before its first checkpoint, a folder that is no run, and a good model.
After every case each of their files is byte-for-byte what it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, ROOT

import baseline
from common.run import run

GOOD_LINE = json.dumps({"goal": "Keep bread fresh", "sol1": "Seal it in a bag", "sol2": "Leave it in the sun"})
FINISHED, INTERRUPTED, MODEL = "runs/baseline", "runs/stopped", "runs/baseline/final_model"


@pytest.fixture(scope="session")
def smoke_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    from common.models import byte_level_tokenizer, smoke_config

    directory = tmp_path_factory.mktemp("model") / "final_model"
    tokenizer = byte_level_tokenizer()
    LlamaForCausalLM(smoke_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def world(tmp_path, smoke_model_dir, monkeypatch) -> Path:
    """The scratch directory every case runs in (its working directory)."""
    finished = tmp_path / FINISHED
    shutil.copytree(smoke_model_dir, finished / "final_model")
    (finished / "metrics.json").write_text(json.dumps({"status": "finished"}))
    (finished / "config.json").write_text(json.dumps({"experiment": {"model": "smoke"}}))
    (finished / "predictions_fine_tuned.jsonl").write_text("earlier work\n")
    stopped = tmp_path / INTERRUPTED
    stopped.mkdir(parents=True)
    (stopped / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    (stopped / "config.json").write_text("{}")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "thesis.tex").write_text("months of work")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # run() narrows it to one GPU; undone afterwards
    return tmp_path


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def data_dir(valid_lines: list[str], valid_labels: list[str]) -> str:
    directory = Path("data")
    directory.mkdir()
    (directory / "train.jsonl").write_text((GOOD_LINE + "\n") * 40)
    (directory / "train-labels.lst").write_text("0\n" * 40)
    (directory / "valid.jsonl").write_text("".join(line + "\n" for line in valid_lines))
    (directory / "valid-labels.lst").write_text("".join(label + "\n" for label in valid_labels))
    return str(directory)


def undecodable_data_dir() -> str:
    directory = data_dir([GOOD_LINE, GOOD_LINE], ["0", "1"])
    Path(directory, "valid.jsonl").write_bytes(GOOD_LINE.encode() + b"\n" + GOOD_LINE.replace("bag", "b\xe4g").encode("latin-1"))
    return directory


def truncated_gguf() -> str:
    """A real GGUF file (one 256 x 64 fp32 tensor) cut 1,000 bytes short, as an interrupted download leaves it."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter("whole.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = Path("whole.gguf").read_bytes()
    write("model.gguf", whole[:-1000])
    return "model.gguf"


def config_file(content: str) -> str:
    Path("config.json").write_text(content)
    return "config.json"


OVERWRITE_FINISHED = ["--output-dir", FINISHED, "--overwrite"]  # proves an error comes before anything is cleared

# name: (arguments after the script name, a fragment of the one line). Every case exits with code 2.
BAD_INPUTS = {
    # data files
    "malformed JSON": (lambda: ["--smoke", "--data-dir", data_dir(["{oops"], ["0"])], "valid.jsonl:1: malformed JSON"),
    "missing field": (lambda: ["--smoke", "--data-dir", data_dir([GOOD_LINE, '{"goal": "g", "sol1": "a"}'], ["0", "1"])],
                      "valid.jsonl:2: missing or non-text field 'sol2'"),
    "bad label": (lambda: ["--smoke", "--data-dir", data_dir([GOOD_LINE], ["yes"])], "valid-labels.lst:1: label must be 0 or 1"),
    "label count": (lambda: ["--smoke", "--data-dir", data_dir([GOOD_LINE, GOOD_LINE], ["0"])], "1 labels for 2 examples"),
    "empty split": (lambda: ["--smoke", "--data-dir", data_dir([], [])], "the validation split is empty"),
    "missing data file": (lambda: ["--smoke", "--data-dir", "empty"], "valid.jsonl: file not found"),
    "undecodable data file": (lambda: ["--smoke", "--data-dir", undecodable_data_dir()],
                              "valid.jsonl:2: not UTF-8 text (byte 0xe4 at column 53)"),
    "too many samples": (lambda: ["--smoke", "--eval-samples", "5000"], "asked for 5000 examples but only 40 exist"),
    # models
    "no such model": (lambda: ["--smoke", "--model", "./nowhere"], "no such file or directory"),
    "mistyped relative model path": (lambda: ["--smoke", "--model", "runs/basline/final_model"],
                                     "--model runs/basline/final_model: no such file or directory (runs/basline does"),
    "dir without model": (lambda: ["--smoke", "--model", "empty"], "the directory holds no model (no config.json)"),
    "dir without tokenizer": (lambda: ["--smoke", "--model", str(write("weights-only/config.json", b"{}").parent)],
                              "the directory holds no tokenizer"),
    "a model's file, not its folder": (lambda: ["--smoke", "--model", str(write("m/config.json", b"{}"))],
                                       "a file, not a model: pass the folder that holds it"),
    "run dir without final_model": (lambda: ["--smoke", "--model", INTERRUPTED], "a run directory without final_model/ (the run did not finish); it holds no checkpoint"),
    "truncated gguf": (lambda: ["--smoke", "--model", truncated_gguf()],
                       "--model model.gguf: truncated or corrupt GGUF file ("),
    "not a gguf": (lambda: ["--smoke", "--model", str(write("fake.gguf", b"not gguf"))], "not a GGUF file"),
    "hub offline": (lambda: ["--smoke", "--model", "nobody-15/no-such-model"],
                    ("not in the local cache, and HF_HUB_OFFLINE=1 keeps the Hugging Face Hub off. To run offline, "
                     "pass --model PATH")),
    # values
    "zero batch": (lambda: ["--smoke", "--batch-size", "0"], "--batch-size must be greater than 0"),
    "negative lr": (lambda: ["--smoke", "--learning-rate", "-0.1"], "--learning-rate must be greater than 0"),
    "zero epochs": (lambda: ["--smoke", "--num-train-epochs", "0"], "--num-train-epochs must be greater than 0"),
    "zero eval samples": (lambda: ["--smoke", "--eval-samples", "0"], "--eval-samples must be greater than 0"),
    "eval samples not a number": (lambda: ["--smoke", "--eval-samples", "some"], "positive integer or 'all'"),
    "unknown eval method": (lambda: ["--smoke", "--eval-method", "vibes"], "--eval-method must be one of"),
    "batch not divisible": (lambda: ["--smoke", "--batch-size", "6", "--gradient-accumulation-steps", "4"],
                            "not divisible by gradient accumulation 4"),
    # values the Trainer sees: refused before --overwrite clears anything
    "learning rate nan": (lambda: ["--smoke", "--learning-rate", "nan"], "--learning-rate must be greater than 0 and finite"),
    "learning rate inf": (lambda: ["--smoke", "--learning-rate", "inf"], "--learning-rate must be greater than 0 and finite"),
    "epochs nan": (lambda: ["--smoke", "--num-train-epochs", "nan"], "--num-train-epochs must be greater than 0 and finite"),
    "negative weight decay": (lambda: ["--smoke", "--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    "activation budget nan": (lambda: ["--smoke", "--activation-budget-gib", "nan"], "--activation-budget-gib must be 0"),
    "unknown optimizer": (lambda: ["--smoke", "--optim", "bogus"], "--optim 'bogus' is not one of the Trainer's choices"),
    "mistyped optimizer": (lambda: ["--smoke", "--optim", "adamw_torch_fusd"], "(did you mean 'adamw_torch_fused'?)"),
    "unknown scheduler": (lambda: ["--smoke", "--lr-scheduler-type", "bogus"],
                          "--lr-scheduler-type 'bogus' is not one of the Trainer's choices"),
    "scheduler needing arguments": (lambda: ["--smoke", "--lr-scheduler-type", "cosine_with_min_lr"],
                                    "the Trainer refuses these arguments: One of min_lr or min_lr_rate"),
    "seed out of range": (lambda: ["--smoke", "--seed=-1"], "--seed must be in [0, 2**32), got -1"),
    "empty data dir": (lambda: ["--smoke", "--data-dir", ""], "--data-dir is empty"),
    "optimizer package missing": (lambda: ["--smoke", "--optim", "adamw_anyprecision"],  # torchdistx: unmaintained
                                  "the Trainer refuses these arguments: Please install https://github.com/pytorch/torchdistx"),
    "max length cuts every answer": (lambda: ["--smoke", "--max-length", "1"],
                                     "--max-length 1 cuts the whole answer off 64 of 64 training examples"),
    "max length cuts some answers": (lambda: ["--smoke", "--max-length", "40"], "training examples (their prompts take up"),
    "engine value out of range": (lambda: ["--smoke", "--gradient-accumulation-steps", "0"],
                                  "--gradient-accumulation-steps must be at least 1"),
    "mistyped engine flag": (lambda: ["--smoke", "--no-ligr"], "unknown option --no-ligr"),
    # the command line itself
    "mistyped flag": (lambda: ["--smoke", "--batchsize", "8"], "unknown option --batchsize (did you mean --batch-size?)"),
    "abbreviated flag": (lambda: ["--smoke", "--eval-sample", "10"], "unknown option --eval-sample (did you mean --eval-samples?)"),
    "not an integer": (lambda: ["--smoke", "--batch-size", "eight"], "--batch-size: invalid int value: 'eight'"),
    "missing value": (lambda: ["--smoke", "--seed"], "--seed: expected one argument"),
    "stray value": (lambda: ["--smoke", "--seed", "1", "foo"], "unexpected value 'foo'"),
    "resume and overwrite": (lambda: ["--smoke", "--resume", "--overwrite"], "contradict each other"),
    "resume and eval-only": (lambda: ["--smoke", "--resume", "--eval-only"], "pick one"),
    # config files
    "config file missing": (lambda: ["nothere.json", "--smoke"], "nothere.json: config file not found"),
    "config file not JSON": (lambda: [config_file("{smoke: true")], "config.json: not valid JSON"),
    "config file unknown key": (lambda: [config_file('{"smoke": true, "batchsize": 8}'), "--seed", "1"],
                                "config.json: unknown key 'batchsize' (did you mean 'batch_size'?)"),
    "config file bad value": (lambda: [config_file('{"smoke": true, "seed": "abc"}')], "config.json: --seed: invalid int"),
    "config file is a directory": (lambda: [str(mkdir("x.json")), "--smoke"], "x.json: a directory, not a config file"),
    "config file not first": (lambda: ["--smoke", config_file('{"seed": 1}')], "a JSON config file must come first"),
    # run directories
    "finished run, no flag": (lambda: ["--smoke", "--output-dir", FINISHED], "holds a finished run: pass --output-dir"),
    "eval-only into a finished run": (lambda: ["--smoke", "--eval-only", "--model", MODEL, "--output-dir", FINISHED],
                                      "holds a finished run: leave out --output-dir"),
    "eval-only --overwrite of the model's run": (
        lambda: ["--smoke", "--eval-only", "--model", MODEL, "--output-dir", FINISHED, "--overwrite"],
        "--overwrite would delete --model runs/baseline/final_model, which lies inside it: leave out --output-dir"),
    "training --overwrite of the model's run": (lambda: ["--smoke", "--model", FINISHED, *OVERWRITE_FINISHED],
                                                 "--overwrite would delete --model runs/baseline/final_model"),
    "resume a finished run": (lambda: ["--smoke", "--output-dir", FINISHED, "--resume"],
                              "nothing to resume: leave out --resume and pass --output-dir"),
    "resume with no checkpoint": (lambda: ["--smoke", "--output-dir", INTERRUPTED, "--resume"],
                                  "nothing to resume: pass --overwrite instead of --resume to start over, or leave out --resume"),
    "rerun of a run stopped early": (lambda: ["--smoke", "--output-dir", INTERRUPTED],
                                     "stopped before its first checkpoint (nothing to resume). Pass --overwrite"),
    "overwrite a folder that is no run": (lambda: ["--smoke", "--output-dir", "notarun", "--overwrite"],
                                          "holds no run (no metrics.json, config.json or checkpoint-*)"),
    "output dir under a file": (lambda: ["--smoke", "--output-dir", f"{write('notes.txt', b'notes')}/sub"],
                                "notes.txt/sub: notes.txt is a file, not a directory"),
    "resume a run that does not exist": (lambda: ["--smoke", "--output-dir", "runs/new", "--resume"],
                                         "does not exist: leave out --resume"),
}
# Cases that name no run directory of their own also pass `--output-dir runs/baseline --overwrite`.
NAMES_ITS_RUN_DIR = {"--output-dir", "--resume"}


def mkdir(name: str) -> Path:
    Path(name).mkdir()
    return Path(name)


def write(name: str, content: bytes) -> Path:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_bytes(content)
    return Path(name)


def run_entry_point(argv: list[str]) -> int:
    try:
        return run(baseline.PROFILE, argv)
    except SystemExit as stop:  # the command-line parser exits itself
        return stop.code


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line_and_destroys_nothing(world, capsys, case):
    make_argv, message = BAD_INPUTS[case]
    argv = make_argv()
    if not NAMES_ITS_RUN_DIR & set(argv) and not argv[0].endswith(".json"):
        argv += OVERWRITE_FINISHED
    before = fingerprint(world)
    code = run_entry_point(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err, err
    assert "Traceback" not in err
    after = fingerprint(world)
    assert {k: v for k, v in after.items() if k in before} == before, "a file changed or went missing"
    assert not (world / "runs" / "baseline-eval").exists()


def test_the_table_holds_every_bad_input_the_issue_names():
    assert len(BAD_INPUTS) >= 25


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, fixes", [
    ([], ["--data-dir DIR", "--model PATH"]),
    pytest.param(["--eval-only", "--data-dir", str(ROOT / "common" / "sample"), "--eval-samples", "10"], ["--model PATH"],
                 marks=pytest.mark.slow),
])
def test_unreachable_hub_ends_at_once_with_what_to_do_offline(tmp_path, extra, fixes):
    """The Hub at a closed local port: the probe fails at once, loading goes cache-only, and one line says what
    to pass offline. Nothing leaves this machine."""
    env = {k: v for k, v in OFFLINE_ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf_home")}
    started_s = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "modified.py"), "--model", "nobody-15/no-such-model", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    took_s = time.monotonic() - started_s
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "the Hugging Face Hub is unreachable" in lines[-1]
    assert all(fix in lines[-1] for fix in fixes), lines[-1]
    assert "from the local cache only" in done.stdout  # the probe took the fast path, not the loaders' retries
    assert took_s < 60
    assert not (tmp_path / "runs").exists()


def test_a_typo_in_the_real_entry_point_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "baseline.py"), "--batchsize", "8"], cwd=tmp_path,
                          env=OFFLINE_ENV, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr == "error: unknown option --batchsize (did you mean --batch-size?)\n"
