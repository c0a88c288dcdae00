"""Fine-tune on PIQA with the baseline profile: fp32, every epoch's checkpoint kept, no pinned memory.

    python3 baseline.py --smoke            # offline, tiny model, bundled sample, CPU ok
    python3 baseline.py                    # meta-llama/Llama-3.2-1B on PIQA -> runs/baseline/
    python3 baseline.py --help             # every argument
"""

import sys

from common.launch import main  # reads the command line before importing torch
from common.profiles import BASELINE as PROFILE  # common/profiles.py: the only difference from modified.py

if __name__ == "__main__":
    sys.exit(main(PROFILE))
