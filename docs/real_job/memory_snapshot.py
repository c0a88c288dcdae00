"""Run baseline.py or modified.py with torch's allocator history recorded, and dump what is allocated when the run
ends (an out-of-memory error included): the live blocks grouped by the Python line that allocated them.

    python3 docs/real_job/memory_snapshot.py OUT.txt SCRIPT.py [ARGS...]
"""

import collections
import runpy
import sys

import torch


def live_blocks_by_line(snapshot: dict) -> list[tuple[str, int, int]]:
    totals = collections.defaultdict(lambda: [0, 0])
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if f["filename"].endswith(".py")]
            where = " <- ".join(f"{f['filename'].split('site-packages/')[-1]}:{f['line']}" for f in frames[:4]) or "?"
            totals[where][0] += block["size"]
            totals[where][1] += 1
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda t: -t[1])


if __name__ == "__main__":
    out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.cuda.memory._record_memory_history(max_entries=200_000, context="alloc", stacks="python")
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException as err:  # noqa: BLE001 - what is allocated at the failure is the point
        print(f"{type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
    finally:
        rows = live_blocks_by_line(torch.cuda.memory._snapshot())
        with open(out, "w") as f:
            f.write(f"allocated {torch.cuda.memory_allocated() / 2**20:,.0f} MiB at the end\n")
            f.writelines(f"{size / 2**20:10,.1f} MiB {count:6d} blocks  {where}\n" for where, size, count in rows[:40])
