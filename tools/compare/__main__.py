"""python3 -m tools.compare RUN_DIR RUN_DIR... [--out DIR]: the report, the printed tables, and exit status
0 (written, partial runs too), 2 (not a run directory, or fewer than two), 1 (the report cannot be written)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.compare.caveats import same_run_warnings
from tools.compare.report import write_report
from tools.compare.runs import NotARunError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.compare",
        description="Compare run directories: a Markdown report (compare.md) with tables, plots and significance tests.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--out", type=Path, default=None, help="where compare.md and the plots go (default: the first run's parent)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run directories, e.g. runs/baseline runs/modified")
    for warning in same_run_warnings(args.runs):
        print(f"warning: {warning}", file=sys.stderr)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file, and --out takes the directory that compare.md and the plots go "
              f"into: pass --out {args.out.parent} or the name of a new directory", file=sys.stderr)
        return 2
    try:
        report = write_report(args.runs, args.out)
    except NotARunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable
        print(f"error: cannot write the report: {err}", file=sys.stderr)
        return 1
    print(report.console)
    written = [p.file for p in report.plots if p.file]
    print(f"\nwrote {report.path}" + (f" and {', '.join(written)}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
