"""Log-log plot of how each benchmarked cost grows with n, from a pytest-benchmark JSON.

    python scripts/perf_plot.py                                   # results/perf/latest.json -> docs/perf-scaling.png
    python scripts/perf_plot.py some.json --out figure.png

Every benchmark whose extra_info holds `series` and `n` (tests/perf/test_core_perf.py) is drawn at
(n, mean seconds); points of the same series are joined and labelled with the fitted slope
(the exponent p in time ~ n^p).  Single points are drawn as markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    data = json.loads(path.read_text())
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "series" in info and "n" in info:
            series[info["series"]].append((int(info["n"]), float(b["stats"]["mean"])))
    return {k: sorted(v) for k, v in series.items()}


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(12, 7), dpi=120)
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for i, (name, pts) in enumerate(sorted(series.items())):
        n = np.array([p[0] for p in pts], dtype=float)
        t = np.array([p[1] for p in pts], dtype=float)
        label = name
        if len(pts) >= 2 and len(set(n)) >= 2:
            slope = np.polyfit(np.log(n), np.log(t), 1)[0]
            label = f"{name}  (slope {slope:.2f})"
            ax.plot(n, t, marker=markers[i % len(markers)], color=colours[i % len(colours)], linewidth=2, label=label)
        else:
            ax.plot(n, t, marker=markers[i % len(markers)], color=colours[i % len(colours)], linestyle="none",
                    markersize=9, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (points, batch size, or images)", fontsize=12)
    ax.set_ylabel("mean time per call (s)", fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=str(ROOT / "results/perf/latest.json"))
    ap.add_argument("--out", default=str(ROOT / "docs/perf-scaling.png"))
    ap.add_argument("--title", default="Cost against n (make perf; log-log)")
    a = ap.parse_args(argv)
    path = Path(a.json)
    if not path.is_file():
        print(f"perf_plot: {path} not found; run `make perf` first", file=sys.stderr)
        return 2
    series = load_series(path)
    if not series:
        print(f"perf_plot: no benchmark in {path} has extra_info series and n", file=sys.stderr)
        return 1
    plot(series, Path(a.out), a.title)
    print(f"wrote {a.out} ({len(series)} series)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
