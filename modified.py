"""Fine-tune on PIQA with the modified profile: mixed precision, best checkpoint only, pinned memory.

    python3 modified.py --smoke            # offline, tiny model, bundled sample, CPU ok
    python3 modified.py                    # meta-llama/Llama-3.2-1B on PIQA -> runs/modified/
    python3 modified.py --help             # every argument
"""

import sys

from common.config import Profile
from common.run import run

PROFILE = Profile(
    name="modified",
    precision="mixed",
    save_total_limit=1,
    load_best_model_at_end=True,
    pin_memory=True,
)

if __name__ == "__main__":
    sys.exit(run(PROFILE))
