"""Sum the counts the fault-injection tests wrote (one JSON line per test) and print them.

    python scripts/chaos_report.py TALLY.jsonl [--pytest-status N]

Exits non-zero when a record was lost or wrong, when no fault was injected, or when
the pytest status given is not 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIELDS = ("faults", "runs", "survived", "lost_or_wrong")


def load(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}, line {n}: not JSON ({exc})") from exc
        rows.append({"test": str(row.get("test", "?")), **{k: int(row.get(k, 0)) for k in FIELDS}})
    return rows


def report(rows: list[dict]) -> str:
    width = max([len(r["test"]) for r in rows] + [4])
    lines = [f"{'test':<{width}}  {'faults':>6}  {'runs':>4}  {'survived':>8}  {'lost/wrong':>10}"]
    for r in rows:
        lines.append(f"{r['test']:<{width}}  {r['faults']:>6}  {r['runs']:>4}  {r['survived']:>8}  {r['lost_or_wrong']:>10}")
    total = {k: sum(r[k] for r in rows) for k in FIELDS}
    lines += [
        "",
        f"faults injected:           {total['faults']}",
        f"runs survived them:        {total['survived']} of {total['runs']}",
        f"records lost or wrong:     {total['lost_or_wrong']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tally", type=Path)
    ap.add_argument("--pytest-status", type=int, default=0)
    ns = ap.parse_args(argv)
    rows = load(ns.tally)
    print(report(rows))
    lost = sum(r["lost_or_wrong"] for r in rows)
    faults = sum(r["faults"] for r in rows)
    if ns.pytest_status != 0:
        print(f"the fault-injection tests failed (pytest exit status {ns.pytest_status})", file=sys.stderr)
        return ns.pytest_status
    if lost or not faults or sum(r["survived"] for r in rows) != sum(r["runs"] for r in rows):
        print("chaos: FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
