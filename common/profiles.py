"""The two profiles the scripts compare: all that differs between baseline.py and modified.py.

Everything else (the experiment and the engine) is an argument, identical in both runs.
"""

from common.config import Profile

BASELINE = Profile(
    name="baseline",
    precision="fp32",  # fp32 weights and arithmetic, TF32 off
    save_total_limit=None,  # keep every epoch's checkpoint
    load_best_model_at_end=False,  # end with the last epoch's model
    pin_memory=False,
)

MODIFIED = Profile(
    name="modified",
    precision="mixed",  # bf16 autocast over fp32 master weights (fp16 + GradScaler where bf16 is missing)
    save_total_limit=1,  # keep one checkpoint (the Trainer also keeps the best beside the newest)
    load_best_model_at_end=True,  # end with the best epoch by selection accuracy
    pin_memory=True,
)
