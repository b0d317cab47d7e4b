"""Wall time of a bench sweep and its slowest runs, from the records of a `vpeft bench` output folder.

make bench                                          # or any vpeft bench ... --out DIR
python benchmarks/sweep_time.py results/bench-mini
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("results/bench-mini"))
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    records = [json.loads(p.read_text()) for p in sorted(args.out.glob("runs/*/*/*/result.json"))]
    records = [r for r in records if r.get("status") == "ok"]
    if not records:
        raise SystemExit(f"no finished runs under {args.out}/runs")
    total = sum(r["wall_seconds"] for r in records)
    print(f"{len(records)} runs, {total:.0f} s of run wall time in all ({total / len(records):.1f} s per run)")
    by_method: dict[str, list[float]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r["wall_seconds"])
    print("\n| method | runs | mean s/run | train s/run | images/s |")
    print("|---|---|---|---|---|")
    for method, secs in sorted(by_method.items(), key=lambda kv: -statistics.fmean(kv[1])):
        mine = [r for r in records if r["method"] == method]
        print(f"| {method} | {len(secs)} | {statistics.fmean(secs):.1f} | "
              f"{statistics.fmean(r['train_seconds'] for r in mine):.1f} | "
              f"{statistics.fmean(r['images_per_s'] for r in mine):.0f} |")  # fmt: skip
    print(f"\nslowest {args.top} runs:")
    for r in sorted(records, key=lambda r: -r["wall_seconds"])[: args.top]:
        print(f"  {r['wall_seconds']:6.1f} s  {r['method']} on {r['task']} (seed {r['seed']})")


if __name__ == "__main__":
    main()
