"""The rows as printed: a progress line per configuration, the grid (engine rows x precision), the full table and
the evaluation's timings."""

from __future__ import annotations

import json
from typing import Any

from tools.benchmark.configurations import PLAIN_LOOP


def num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Every configuration's row, with its speed against the seed's configuration and baseline's."""
    by_name = {r["name"]: r for r in rows}
    seed, base = by_name.get("seed-original", {}), by_name.get("baseline", {})
    header = ("| configuration | micro-batch x accum | non-pad tok/s | tok/s at median step | x seed | x baseline | "
              "padding % | MFU % | step ms (median) | peak alloc GiB | peak reserved GiB | NVML peak MiB | "
              "epoch (16,113 ex.) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if r.get("name") == "evaluation":
            continue
        if "error" in r:
            lines.append(f"| {r['name']} | | failed: {r['error'][:120]} |" + " |" * 10)
            continue
        x_seed = r["tokens_per_s"] / seed["tokens_per_s"] if seed.get("tokens_per_s") else None
        x_base = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        minutes = r["epoch_s"] / 60
        gpus = r.get("world_size", 1)
        label = r["name"] if gpus == 1 else f"{r['name']} (DDP, {gpus} GPUs: {r['tokens_per_s_per_gpu']:,.0f} per GPU)"
        if r.get("planned_timed_steps", 0) > r["timed_steps"]:  # a length-grouped row: its longest batches only
            label += f" (timed {r['timed_steps']} of {r['planned_timed_steps']} steps: --max-measure-s)"
        lines.append(
            f"| {label} | {r['micro_batch_size']} x {r['gradient_accumulation_steps']} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_median_step']:,.0f} | {num(x_seed, '.1f')} | "
            f"{num(x_base, '.1f')} | {r['padding_share_pct']:.1f} | "
            f"{r['mfu_pct']:.1f} | {r['step_ms_median']:,.0f} | {num(r['peak_allocated_gib'], '.1f')} | "
            f"{num(r['peak_reserved_gib'], '.1f')} | {num(r.get('nvml_peak_mib'), ',.0f')} | "
            f"{minutes:,.1f} min |"
        )
    return "\n".join(lines)


def format_grid(rows: list[dict[str, Any]]) -> str:
    """The question in two dimensions: each engine row (cumulative) for fp32 and mixed, and what mixed buys there."""
    cells: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("group") == "grid" and "error" not in r:
            cells.setdefault(r["row"], {})[r["profile"]["precision"]] = r
    header = ("| engine (each row adds one setting) | fp32 tok/s | fp32 reserved GiB | mixed tok/s | "
              "mixed reserved GiB | mixed / fp32 speed | mixed / fp32 reserved |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def cell(r, key, fmt):
        return "n/a" if r is None or r.get(key) is None else format(r[key], fmt)

    def ratio(fp32, mixed, key):
        if fp32 is None or mixed is None or not fp32.get(key) or mixed.get(key) is None:
            return "n/a"
        return f"{mixed[key] / fp32[key]:.2f}x"

    for label, by_precision in cells.items():
        fp32, mixed = by_precision.get("fp32"), by_precision.get("mixed")
        lines.append(f"| {label} | {cell(fp32, 'tokens_per_s', ',.0f')} | {cell(fp32, 'peak_reserved_gib', '.1f')} | "
                     f"{cell(mixed, 'tokens_per_s', ',.0f')} | {cell(mixed, 'peak_reserved_gib', '.1f')} | "
                     f"{ratio(fp32, mixed, 'tokens_per_s')} | {ratio(fp32, mixed, 'peak_reserved_gib')} |")
    return "\n".join(lines)


def row_lines(name: str, row: dict[str, Any], elapsed_s: float) -> list[str]:
    """What the console shows when a row is done: its failure, or its profile (if any) and headline numbers."""
    if "error" in row:
        return [f"[{elapsed_s:5.0f}s] {name}: FAILED {row['error'][:300]}"]
    if name == "evaluation":
        return []  # its runs printed their own lines
    lines = [json.dumps(row["profile_summary"], indent=1)] if "profile_summary" in row else []
    lines.append(f"[{elapsed_s:5.0f}s] {name}: {row['tokens_per_s']:,.0f} non-pad tok/s "
                 f"({row['tokens_per_s_median_step']:,.0f} at the median step), "
                 f"step {row['step_ms_median']:,.0f} ms, padding {row['padding_share_pct']:.0f}%, MFU "
                 f"{row['mfu_pct']:.1f}%, reserved {row['peak_reserved_gib'] or 0:.1f} GiB, "
                 f"loss {row['final_loss']:.3f}")
    return lines


def reference_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the Trainer costs, Trainer / plain loop non-padding tok/s, for each plain-loop row whose Trainer twin ran in
    the same call."""
    done = {r["name"]: r for r in rows if "error" not in r and r.get("tokens_per_s")}
    lines = []
    for plain in done.values():
        trainer = done.get(plain.get("trainer_twin", "")) if plain.get("engine_path") == PLAIN_LOOP else None
        if trainer is not None:
            lines.append(f"Trainer / plain loop, {trainer['name']}: {trainer['tokens_per_s']:,.0f} / "
                         f"{plain['tokens_per_s']:,.0f} non-pad tok/s = "
                         f"{trainer['tokens_per_s'] / plain['tokens_per_s']:.2f}x (the target: at least 0.95x)")
    return lines


def evaluation_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per timed evaluation of the 'evaluation' row (none without one)."""
    evaluation = next((r for r in rows if r.get("name") == "evaluation" and "runs" in r), None)
    if evaluation is None:
        return []
    return [f"evaluation ({evaluation['examples']} examples, loglik, {run['weights']}, bf16 autocast, "
            f"batch {run['batch_size']}, cuDNN attention {'on' if run['cudnn_attention'] else 'off'}): "
            f"{run['seconds']:.2f} s" for run in evaluation["runs"]]
