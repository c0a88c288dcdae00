"""The one prompt format that training and evaluation share (lm-evaluation-harness's `piqa` task)."""


def format_context(goal: str) -> str:
    return f"Question: {goal}\nAnswer:"


def format_continuation(solution: str) -> str:
    return f" {solution}"


def format_choice_prompt(goal: str, sol1: str, sol2: str) -> str:
    """Structured prompt for the generate method: lists both solutions, ends `Answer: Solution`."""
    return (
        f"Goal: {goal}\n"
        f"Solution 1: {sol1}\n"
        f"Solution 2: {sol2}\n"
        "Which solution achieves the goal? Answer with 1 or 2.\n"
        "Answer: Solution"
    )
