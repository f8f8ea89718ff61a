"""Aggregate run records into tables (mean ± std (n) per method, dataset and metric)."""

from __future__ import annotations

import math

METRICS = ("nmi", "acc", "ari")


def _fmt(values: list[float]) -> str:
    import statistics

    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f} ({len(values)})"


def print_summary(records: list[dict]) -> None:
    """One line per run, then the aggregate table of these runs."""
    for r in records:
        m = r.get("metrics") or {}
        if r.get("status") == "completed" and m:
            print(f"{r['method']:8s} {r['dataset']:12s} seed {r.get('seed')}: NMI {m['nmi']:.4f}  ACC {m['acc']:.4f}  "
                  f"ARI {m['ari']:.4f}  ({(r.get('timing') or {}).get('wall_s', float('nan')):.1f} s)")
        else:
            err = (r.get("error") or {}).get("message", "")
            print(f"{r.get('method')} {r.get('dataset')} seed {r.get('seed')}: {r.get('status')} {err[:200]}")
    print()
    print(markdown_table(records))


def markdown_table(records: list[dict]) -> str:
    from tabulate import tabulate

    groups: dict[tuple[str, str], dict] = {}
    for r in records:
        g = groups.setdefault((r.get("method", "?"), r.get("dataset", "?")), {"ok": [], "other": {}})
        if r.get("status") == "completed" and r.get("metrics"):
            g["ok"].append(r["metrics"])
        else:
            st = r.get("status", "unknown")
            g["other"][st] = g["other"].get(st, 0) + 1
    rows = []
    for (method, dataset), g in sorted(groups.items()):
        row = [method, dataset]
        for m in METRICS:
            row.append(_fmt([x[m] for x in g["ok"] if x.get(m) is not None and not math.isnan(x[m])]))
        row.append(", ".join(f"{v} {k}" for k, v in sorted(g["other"].items())) or "")
        rows.append(row)
    return tabulate(rows, headers=["method", "dataset", "NMI %", "ACC %", "ARI %", "not completed"], tablefmt="github")


def table_command(args: list[str]) -> int:
    from bench.store import load_records

    opts = dict(a.split("=", 1) for a in args if "=" in a)
    results_dir = opts.get("results_dir", "results")
    problems: list[str] = []
    records = load_records(results_dir, problems=problems)
    for key in ("method", "dataset"):
        if key in opts:
            wanted = set(opts[key].strip("[]").split(","))
            records = [r for r in records if r.get(key) in wanted]
    if not records:
        print(f"no run records under {results_dir}/runs")
        return 0
    print(markdown_table(records))
    for p in problems:
        print(f"warning: {p}")
    return 0
