"""What a comparison cannot answer is said: the same run named twice, runs made on a CPU; --out naming a file is
an error that says what to pass."""

import json
from pathlib import Path

from tools.compare.__main__ import main


def fake_run(path: Path, device: str) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"status": "finished", "profile": path.name,
                                                   "environment": {"device": device}}))
    return path


def test_the_same_run_twice_is_warned_about(tmp_path, capsys):
    run = fake_run(tmp_path / "runs" / "baseline", "NVIDIA H200")
    assert main([str(run), str(tmp_path / "runs" / ".." / "runs" / "baseline"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "are the same run directory" in err


def test_runs_made_on_a_cpu_carry_the_warning_that_they_do_not_answer_the_gpu_question(tmp_path, capsys):
    runs = [fake_run(tmp_path / name, "cpu") for name in ("baseline", "modified")]
    assert main([*map(str, runs), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "compare.md").read_text()
    assert "baseline, modified ran on a CPU: its speed and memory do not answer the question" in report
    gpu_runs = [fake_run(tmp_path / "gpu" / name, "NVIDIA H200") for name in ("baseline", "modified")]
    assert main([*map(str, gpu_runs), "--out", str(tmp_path / "gpu_out")]) == 0
    assert "ran on a CPU" not in (tmp_path / "gpu_out" / "compare.md").read_text()


def test_out_naming_an_existing_file_says_to_pass_a_directory(tmp_path, capsys):
    runs = [fake_run(tmp_path / name, "cpu") for name in ("baseline", "modified")]
    (tmp_path / "compare.md").write_text("an earlier report")
    assert main([*map(str, runs), "--out", str(tmp_path / "compare.md")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out {tmp_path / 'compare.md'} is a file, and --out takes the directory that compare.md "
                   f"and the plots go into: pass --out {tmp_path} or the name of a new directory\n")
    assert (tmp_path / "compare.md").read_text() == "an earlier report"
