"""Shared code for baseline.py and modified.py: one PIQA fine-tuning experiment, two Trainer profiles."""

import sys


def _interrupted_in_one_line(kind, value, traceback):
    """Ctrl-C while a script is still importing (before common/launch.py can catch it) ends in one line."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


if sys.excepthook is sys.__excepthook__:  # leave a debugger's or IPython's hook alone
    sys.excepthook = _interrupted_in_one_line
