"""Figures of the benchmark suite, from its pytest-benchmark JSON.

    python scripts/perf_plot.py                   # results/perf/latest.json -> docs/perf-scaling.png, docs/perf-steps.png
    python scripts/perf_plot.py some.json --out figure.png --steps-out steps.png

perf-scaling: every benchmark whose extra_info holds `series` and `n` (tests/perf/test_core_perf.py) is
drawn at (n, mean seconds); points of the same series are joined and labelled with the fitted slope
(the exponent p in time ~ n^p).  Single points are drawn as markers.

perf-steps: where a training step's time goes, per backbone and method, as stacked bars built from the
step benchmarks (bench/stepbench.py): the online backbone's forward and backward ("bare"), the target
backbone's forward, the rest of the network (heads, loss, EMA: model - bare - target) and what the step adds
to the network's work (indexing, augmentation and for CoNR the re-ranking: step - model).
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


def load_steps(path: Path) -> dict[str, dict[str, float]]:
    """{backbone (batch): {kind: median seconds}} from the interleaved train-step benchmarks."""
    data = json.loads(path.read_text())
    out: dict[str, dict[str, float]] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        med = info.get("median_s")
        if "steps" in info and isinstance(med, dict) and {"bare", "target", "model"} <= set(med):
            out[f"{info['backbone']} (batch {info['batch']})"] = {k: float(v) for k, v in med.items()}
    return out


def plot_steps(steps: dict[str, dict[str, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("online backbone forward+backward", "#1f77b4"), ("target backbone forward", "#6baed6"),
             ("heads, loss, EMA", "#fdae6b"), ("indexing, augmentation, re-ranking", "#d62728")]
    rows = []
    for case, t in sorted(steps.items()):
        for method in ("byol", "conr"):
            if method in t:
                heads = max(t["model"] - t["bare"] - t["target"], 0.0)
                rest = max(t[method] - t["model"], 0.0)
                rows.append((f"{method.upper() if method == 'byol' else 'CoNR'}, {case}",
                             [t["bare"], t["target"], heads, rest], t[method]))
    fig, ax = plt.subplots(figsize=(11, 0.9 * len(rows) + 1.8), dpi=120)
    for i, (_, segs, total) in enumerate(rows):
        left = 0.0
        for (name, colour), w in zip(parts, segs):
            ax.barh(i, w / total * 100, left=left, color=colour, label=name if i == 0 else None)
            if w / total > 0.06:
                ax.text(left + w / total * 50, i, f"{100 * w / total:.0f}%", ha="center", va="center", fontsize=9)
            left += w / total * 100
        ax.text(101, i, f"{total * 1000:.0f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel("share of the training step (%)")
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.22 if len(rows) > 2 else -0.35),
              frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=str(ROOT / "results/perf/latest.json"))
    ap.add_argument("--out", default=str(ROOT / "docs/perf-scaling.png"))
    ap.add_argument("--title", default="Cost against n (make perf; log-log)")
    ap.add_argument("--steps-out", default=str(ROOT / "docs/perf-steps.png"))
    a = ap.parse_args(argv)
    path = Path(a.json)
    if not path.is_file():
        print(f"perf_plot: {path} not found; run `make perf` first", file=sys.stderr)
        return 2
    series, steps = load_series(path), load_steps(path)
    if not series and not steps:
        print(f"perf_plot: no benchmark in {path} has extra_info series and n, or step medians", file=sys.stderr)
        return 1
    if series:
        plot(series, Path(a.out), a.title)
        print(f"wrote {a.out} ({len(series)} series)")
    if steps:
        plot_steps(steps, Path(a.steps_out), "Where a training step's time goes (make perf)")
        print(f"wrote {a.steps_out} ({len(steps)} backbones)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
