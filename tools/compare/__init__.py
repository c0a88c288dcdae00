"""Compare two or more run directories: a Markdown report with tables, plots and paired significance tests.

    python3 -m tools.compare runs/baseline runs/modified [--out DIR]

Writes DIR/compare.md and DIR/compare_*.png (DIR defaults to the first run's parent) and prints the tables.
Every number carries its unit; accuracy differences carry McNemar's exact test and a 95% interval, so that a
difference of a few examples is not read as a gain. See docs/compare.md for how to read the report.

    runs.py      read a run directory (metrics, config, GPU log, predictions) and note what is missing
    stats.py     Wilson interval, McNemar's exact test, Newcombe's paired interval; the paired tests between runs
    tables.py    the measurement, time-phase, ratio, settings and paired-test rows; markdown_table
    plots.py     where the time went (a bar per run), GPU memory over time, training loss, selection accuracy (PNG)
    report.py    compare.md and the console text: write_report(run_dirs, out_dir)
    __main__.py  the command line: arguments, one-line errors, exit status 0 / 1 / 2
"""
