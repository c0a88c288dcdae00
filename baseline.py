"""Fine-tune on PIQA with the baseline profile: full fp32, every epoch's checkpoint kept, no pinned memory.

    python3 baseline.py --smoke            # offline, tiny model, bundled sample, CPU ok
    python3 baseline.py                    # meta-llama/Llama-3.2-1B on PIQA -> runs/baseline/
    python3 baseline.py --help             # every argument
"""

import sys

from common.config import Profile
from common.run import run

PROFILE = Profile(
    name="baseline",
    precision="fp32",
    save_total_limit=None,
    load_best_model_at_end=False,
    pin_memory=False,
)

if __name__ == "__main__":
    sys.exit(run(PROFILE))
