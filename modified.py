"""Fine-tune on PIQA with the modified profile: mixed precision, one checkpoint kept (best epoch loaded), pinned memory.

    python3 modified.py --smoke            # offline, tiny model, bundled sample, CPU ok
    python3 modified.py                    # meta-llama/Llama-3.2-1B on PIQA -> runs/modified/
    python3 modified.py --help             # every argument
"""

import sys

from common.profiles import MODIFIED as PROFILE  # common/profiles.py: the only difference from baseline.py
from common.run import run

if __name__ == "__main__":
    sys.exit(run(PROFILE))
