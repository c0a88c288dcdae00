"""The console summary table: where the run's time went, both training throughputs with what they measure, and what
an eval-only run evaluated."""

from __future__ import annotations

from common.artifacts import TIME_PHASES
from common.reporting import summary_table

TIMING = {
    "wall_s": 200.0,
    "phases_s": {"startup": 20.0, "eval_zero_shot": 10.0, "train_steps": 100.0, "select": 15.0,
                 "checkpoint_save": 30.0, "checkpoint_wait": 0.0, "eval_fine_tuned": 10.0, "final_save": 10.0,
                 "other": 5.0},  # load_best absent: it did not happen
    "train_runtime_s": 150.0,
    "train_tokens_per_s": 10_000.0,
    "train_steps_tokens_per_s": 15_000.0,
    "train_samples_per_s": 40.0,
}


def value(table: str, label: str) -> str:
    """The value of the row whose label is `label` (the table is two columns: label, value)."""
    for line in table.splitlines():
        if line.strip().startswith(label + "  ") or line.strip() == label:
            return line.strip()[len(label):].strip()
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_summary_shows_each_phase_with_its_share_of_the_wall_clock() -> None:
    table = summary_table({"status": "finished", "timing": TIMING})
    assert value(table, "wall time (s)") == "200.0"
    assert value(table, "startup") == "20.0  (10.0%)"
    assert value(table, "train_steps") == "100.0  (50.0%)"
    assert value(table, "checkpoint_save") == "30.0  (15.0%)"
    assert value(table, "other") == "5.0  (2.5%)"
    for absent in ("load_best", "checkpoint_wait"):  # 0 or absent: not shown
        assert not any(line.strip().startswith(absent) for line in table.splitlines())
    names = [name for name, _ in TIME_PHASES if TIMING["phases_s"].get(name)]
    positions = [table.index(f"  {name}  ") for name in names]
    assert positions == sorted(positions)  # in the order they happen


def test_summary_puts_both_throughputs_side_by_side_with_what_they_measure() -> None:
    table = summary_table({"timing": TIMING})
    assert value(table, "train non-padding tokens/s (over train runtime)") == "10,000"
    assert value(table, "train non-padding tokens/s (training steps only, no selection or saves)") == "15,000"
    assert value(table, "train runtime (s, Trainer: steps, selection passes, saves)") == "150.0"
    lines = table.splitlines()
    over_runtime = next(i for i, line in enumerate(lines) if "(over train runtime)" in line and "tokens" in line)
    assert "training steps only" in lines[over_runtime + 1]


def test_old_run_without_phases_says_not_recorded() -> None:
    old = {k: v for k, v in TIMING.items() if k not in ("phases_s", "train_steps_tokens_per_s")}
    table = summary_table({"status": "finished", "timing": old})
    assert value(table, "where the time went").startswith("not recorded")
    assert "training steps only" not in table  # no number, no row
    assert "startup" not in table


def test_a_phase_unknown_to_this_code_still_shows() -> None:
    timing = {"wall_s": 10.0, "phases_s": {"startup": 4.0, "compile": 6.0}}
    table = summary_table({"timing": timing})
    assert value(table, "compile") == "6.0  (60.0%)"
ACCURACY = {"loglik": {"acc_pct": 55.0, "acc_norm_pct": 50.0}}


def test_an_eval_only_summary_names_the_evaluated_model_not_a_zero_shot_phase():
    table = summary_table({"model": "runs/modified/final_model", "eval_only": True,
                           "accuracy": {"zero_shot": ACCURACY, "n_examples": 40}})
    line = next(line for line in table.splitlines() if "loglik acc (%)" in line)
    assert line.split() == ["runs/modified/final_model", "(eval-only)", "loglik", "acc", "(%)", "55.00"]
    assert "zero_shot" not in table


def test_a_training_run_summary_keeps_both_phases():
    table = summary_table({"model": "smoke", "eval_only": False,
                           "accuracy": {"zero_shot": ACCURACY, "fine_tuned": ACCURACY}})
    assert "zero_shot loglik acc (%)" in table and "fine_tuned loglik acc (%)" in table
