"""Fine-tune on PIQA with the modified profile: mixed precision, one checkpoint kept (best epoch loaded), pinned memory.

    python3 modified.py --smoke            # offline, tiny model, bundled sample, CPU ok
    python3 modified.py                    # meta-llama/Llama-3.2-1B on PIQA -> runs/modified/
    python3 modified.py --help             # every argument
"""

import sys

from common.launch import main  # reads the command line before importing torch
from common.profiles import MODIFIED as PROFILE  # common/profiles.py: the only difference from baseline.py

if __name__ == "__main__":
    sys.exit(main(PROFILE))
