"""The console summary names what was evaluated."""

from common.reporting import summary_table

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
