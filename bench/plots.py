"""Figures for the report: training curves, confusion matrices, cluster sizes and a results overview.

Figures are built with matplotlib's object API on the Agg canvas (never pyplot), so drawing
them changes no global state and needs no display.  Each is saved as PNG and PDF.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
METRIC_NAMES = {"nmi": "NMI", "acc": "ACC", "ari": "ARI"}


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style():
    import matplotlib

    return matplotlib.rc_context(STYLE)


def save(fig, folder: str | Path, stem: str) -> list[Path]:
    """Write <folder>/<stem>.png and .pdf; returns both paths."""
    from bench.io import atomic_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, meta in (("png", {"Software": None}), ("pdf", {"Creator": None, "Producer": None,
                                                           "CreationDate": None})):
        path = folder / f"{stem}.{ext}"
        atomic_save(path, lambda p, ext=ext, meta=meta: fig.savefig(p, format=ext, metadata=meta))
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------------------------
# training curves


def stage_layout(histories: list[list[dict]]) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """Stages in the order they run, the x offset of each (so that stages follow one another on one
    axis) and the x where each starts."""
    order: list[str] = []
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    starts: dict[str, float] = {}
    for hist in histories:
        for row in hist:
            stage = str(row.get("stage") or "")
            epoch = row.get("epoch")
            if not isinstance(epoch, (int, float)):
                continue
            if stage not in first:
                order.append(stage)
                first[stage], last[stage] = epoch, epoch
            first[stage] = min(first[stage], epoch)
            last[stage] = max(last[stage], epoch)
    offsets: dict[str, float] = {}
    end = None
    for stage in order:
        offsets[stage] = 0.0 if end is None else end + 1 - first[stage]
        end = offsets[stage] + last[stage]
        starts[stage] = offsets[stage] + first[stage]
    return order, offsets, starts


def history_series(hist: list[dict], offsets: dict[str, float], key: str, scale: float = 1.0):
    xs, ys = [], []
    for row in hist:
        epoch = row.get("epoch")
        stage = str(row.get("stage") or "")
        if not isinstance(epoch, (int, float)) or key not in row:
            continue
        value = row.get(key)
        y = float(value) * scale if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        xs.append(offsets.get(stage, 0.0) + epoch)
        ys.append(y)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def curves_figure(runs: list[dict], title: str):
    """Loss, NMI and ACC per epoch for the runs of one method on one dataset, one line per seed."""
    from matplotlib.ticker import MaxNLocator

    histories = [r.get("history") or [] for r in runs]
    order, offsets, starts = stage_layout(histories)
    panels = [("loss", "Training loss", "loss", 1.0), ("nmi", "NMI", "NMI (%)", 100.0),
              ("acc", "ACC", "ACC (%)", 100.0)]
    with style():
        fig = new_figure(13.5, 4.0)
        axes = fig.subplots(1, 3)
        handles = {}
        x_lo, x_hi = math.inf, -math.inf
        for hist in histories:
            xs, _ys = history_series(hist, offsets, "epoch")
            if len(xs):
                x_lo, x_hi = min(x_lo, float(xs.min())), max(x_hi, float(xs.max()))
        for ax, (key, name, ylabel, scale) in zip(axes, panels, strict=True):
            any_points = False
            positive = True
            for i, (run, hist) in enumerate(zip(runs, histories, strict=True)):
                xs, ys = history_series(hist, offsets, key, scale)
                if not len(xs):
                    continue
                color = PALETTE[i % len(PALETTE)]
                status = run.get("status")
                label = f"seed {run.get('seed')}" + ("" if status == "completed" else f" ({status})")
                sparse = key != "loss" and len(xs) <= 40
                ls = "-" if status == "completed" else "--"
                (line,) = ax.plot(xs, ys, ls, color=color, lw=1.6, marker="o" if sparse else None, ms=3.5,
                                  label=label, alpha=0.95)
                handles.setdefault(label, line)
                finite = np.isfinite(ys)
                any_points |= bool(finite.any())
                positive &= bool((ys[finite] > 0).all())
                if key == "loss" and status in ("diverged", "failed") and finite.any():
                    j = np.flatnonzero(finite)[-1]
                    ax.plot(xs[j], ys[j], "X", color=color, ms=9, mec="black", mew=0.6, zorder=5)
                    ax.annotate(status, (xs[j], ys[j]), xytext=(6, 6), textcoords="offset points", fontsize=8,
                                color=color, fontweight="bold")
            if key == "loss" and any_points and positive:
                lo, hi = _finite_range(ax)
                if lo > 0 and hi / lo > 50:
                    ax.set_yscale("log")
            if not any_points:
                ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes,
                        color="0.4")
                ax.set_yticks([])
            ax.set_title(name)
            if math.isfinite(x_lo):
                pad = max(0.5, 0.02 * (x_hi - x_lo))
                ax.set_xlim(x_lo - pad, x_hi + pad)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch" if len(order) <= 1 else "epoch (stages in sequence)")
            ax.set_ylabel(ylabel)
            _mark_stages(ax, order, starts)
        if handles:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                       ncol=min(len(handles), 6))
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig


def _finite_range(ax) -> tuple[float, float]:
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys)]
    return (float(ys.min()), float(ys.max())) if len(ys) else (0.0, 0.0)


def _mark_stages(ax, order: list[str], starts: dict[str, float]) -> None:
    if len(order) <= 1:
        return
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, stage in enumerate(order):
        x = starts[stage]
        if i:
            ax.axvline(x - 0.5, color="0.35", lw=0.9, ls="--")
        ax.text(x, 0.98, f" {stage}", transform=trans, ha="left", va="top", fontsize=8, color="0.25",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8", "alpha": 0.85})


# ---------------------------------------------------------------------------------------------------------------
# one run: confusion matrix and cluster sizes


def matched_confusion(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Counts[class, cluster] reordered so that the pairs of the Hungarian assignment lie on the diagonal.

    Returns (counts, class ids in row order, cluster ids in column order, number of matched pairs):
    the first n rows and columns are the matched pairs, in class order; unmatched classes and clusters
    (when their numbers differ) follow, largest first.
    """
    from scipy.optimize import linear_sum_assignment

    y = np.asarray(labels_true).astype(np.int64)
    p = np.asarray(labels_pred).astype(np.int64)
    keep = y >= 0
    y, p = y[keep], p[keep]
    classes, yi = np.unique(y, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    m = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(m, (yi, pi), 1)
    rows, cols = linear_sum_assignment(m, maximize=True)
    n = len(rows)
    rest_rows = [i for i in np.argsort(-m.sum(axis=1), kind="stable") if i not in set(rows)]
    rest_cols = [j for j in np.argsort(-m.sum(axis=0), kind="stable") if j not in set(cols)]
    ri = np.asarray(list(rows) + rest_rows, dtype=np.int64)
    ci = np.asarray(list(cols) + rest_cols, dtype=np.int64)
    return m[np.ix_(ri, ci)], classes[ri], clusters[ci], n


def run_figure(record: dict, labels_true=None, labels_pred=None, class_names: list[str] | None = None,
               title: str | None = None):
    """Confusion-matrix heat map (clusters matched to classes) beside the cluster sizes of one run."""
    has_pred = labels_true is not None and labels_pred is not None and len(labels_pred)
    with style():
        if has_pred:
            m, classes, clusters, n_matched = matched_confusion(labels_true, labels_pred)
            k = max(len(classes), len(clusters))
            side = min(max(4.2, 0.3 * k + 2.2), 8.0)
            fig = new_figure(side * 2.15, side)
            ax_cm, ax_bar = fig.subplots(1, 2, width_ratios=[1.0, 1.05])
            _confusion(ax_cm, m, classes, clusters, class_names)
            sizes = m.sum(axis=0)
            class_sizes = m.sum(axis=1)
            correct = np.array([m[j, j] if j < n_matched else 0 for j in range(m.shape[1])])
            _sizes(ax_bar, sizes, clusters, correct=correct, class_sizes=class_sizes[:n_matched])
        else:
            sizes = np.asarray(record.get("cluster_sizes") or [], dtype=np.int64)
            fig = new_figure(6.5, 4.2)
            ax_bar = fig.subplots(1, 1)
            _sizes(ax_bar, sizes, np.arange(len(sizes)))
        fig.suptitle(title or run_title(record), fontsize=12, fontweight="bold")
    return fig


def run_title(record: dict) -> str:
    m = record.get("metrics") or {}
    scores = "   ".join(f"{METRIC_NAMES[k]} {100 * float(m[k]):.1f}" for k in ("nmi", "acc", "ari")
                        if isinstance(m.get(k), (int, float)))
    from bench.table import dataset_label, method_label

    variant = "".join(f", {v}" for v in (record.get("tag"), _ablation(record)) if v)
    head = (f"{method_label(str(record.get('method')))} on {dataset_label(str(record.get('dataset')))}"
            f"{variant}, seed {record.get('seed')}")
    return f"{head}  ({scores})" if scores else f"{head}  ({record.get('status')})"


def _ablation(record: dict) -> str:
    from bench.table import ablation_of

    variant = ablation_of(record)
    return f"ablation {variant}" if variant and variant != "full" else ""


def _class_label(c: int, class_names: list[str] | None) -> str:
    if class_names and 0 <= c < len(class_names):
        return str(class_names[c])
    return str(c)


def _confusion(ax, m: np.ndarray, classes, clusters, class_names) -> None:
    frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of the class")
    cbar.outline.set_visible(False)
    n_rows, n_cols = m.shape
    if n_rows <= 30:
        ax.set_yticks(range(n_rows), [_class_label(int(c), class_names) for c in classes])
    if n_cols <= 30:
        ax.set_xticks(range(n_cols), [str(int(c)) for c in clusters],
                      rotation=0 if n_cols <= 15 else 90)
    if n_rows <= 20 and n_cols <= 20:
        size = 8 if max(n_rows, n_cols) <= 12 else 6.5
        for i in range(n_rows):
            for j in range(n_cols):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=size,
                            color="white" if frac[i, j] > 0.55 else "0.15")
    ax.set_xlabel("cluster (ordered by its matched class)")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (row-normalised, counts shown)")


def _sizes(ax, sizes, clusters, *, correct=None, class_sizes=None) -> None:
    x = np.arange(len(sizes))
    if not len(sizes):
        ax.text(0.5, 0.5, "no cluster sizes recorded", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
        ax.set_title("Cluster sizes")
        return
    if correct is not None:
        ax.bar(x, correct, color="#4c72b0", width=0.8, label="matched class")
        ax.bar(x, sizes - correct, bottom=correct, color="#dd8452", width=0.8, label="other classes")
    else:
        ax.bar(x, sizes, color="#4c72b0", width=0.8, label="images")
    has_classes = class_sizes is not None and len(class_sizes) > 0
    if has_classes:
        n = min(len(class_sizes), len(sizes))
        ax.step(np.arange(n + 1) - 0.5, np.r_[class_sizes[:n], class_sizes[n - 1]], where="post",
                color="black", lw=1.3, label="size of the matched class")
    ax.axhline(float(np.sum(sizes)) / len(sizes), color="0.45", ls=":", lw=1.2, label="balanced size")
    if len(sizes) <= 30:
        ax.set_xticks(x, [str(int(c)) for c in clusters], rotation=0 if len(sizes) <= 15 else 90)
    ax.set_xlim(-0.6, len(sizes) - 0.4)
    ax.set_xlabel("cluster" + (" (ordered by its matched class)" if correct is not None else ""))
    ax.set_ylabel("images")
    ax.set_title("Cluster sizes")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper right", ncol=2)
    top = max(float(np.max(sizes)), float(np.max(class_sizes)) if has_classes else 0.0)
    ax.set_ylim(0, max(top, 1.0) * 1.25)


# ---------------------------------------------------------------------------------------------------------------
# overview of the table


def overview_figure(rows: list[dict[str, Any]], datasets: list[str], dataset_labels: dict[str, str]):
    """Grouped bars: one panel per dataset, NMI / ACC / ARI per method (mean ± std over completed runs),
    with the published value as a black tick where there is one.

    rows: dicts with label, and per (dataset, metric) keys "mean", "std", "reported" in cells[(d, m)].
    """
    metrics = ("nmi", "acc", "ari")
    colors = {"nmi": "#4c72b0", "acc": "#55a868", "ari": "#c44e52"}
    n = len(datasets)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    with style():
        width = min(max(4.5, 0.8 * max(len(rows), 1) + 1.5), 7.0)
        fig = new_figure(max(width * ncols, 5.5), 3.6 * nrows + 0.6)
        grid = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
        axes = grid.ravel()
        for ax in axes[n:]:
            ax.set_visible(False)
        handles = {}
        for ax, d in zip(axes[:n], datasets, strict=True):
            x = np.arange(len(rows))
            w = 0.26
            for j, m in enumerate(metrics):
                xs = x + (j - 1) * w
                means = np.array([r["cells"][(d, m)]["mean"] for r in rows], dtype=float)
                stds = np.array([r["cells"][(d, m)]["std"] for r in rows], dtype=float)
                bars = ax.bar(xs, np.nan_to_num(means), w, color=colors[m], label=METRIC_NAMES[m])
                handles.setdefault(METRIC_NAMES[m], bars)
                ok = np.isfinite(means) & np.isfinite(stds) & (stds > 0)
                if ok.any():
                    ax.errorbar(xs[ok], means[ok], yerr=stds[ok], fmt="none", ecolor="0.15", elinewidth=0.9,
                                capsize=2.5)
                rep = np.array([r["cells"][(d, m)].get("reported", math.nan) for r in rows], dtype=float)
                ok = np.isfinite(rep)
                if ok.any():
                    h = ax.scatter(xs[ok], rep[ok], marker="_", s=180, color="black", lw=2, zorder=5,
                                   label="reported")
                    handles.setdefault("reported", h)
            for xi, r in zip(x, rows, strict=True):
                if all(math.isnan(r["cells"][(d, m)]["mean"]) for m in metrics):
                    ax.text(xi, 3, "no result", ha="center", va="bottom", fontsize=8, color="0.35",
                            style="italic")
            ax.set_xticks(x, [r["label"] for r in rows], rotation=20 if len(rows) > 3 else 0)
            ax.set_title(dataset_labels.get(d, d))
            ax.set_ylim(0, 100)
            ax.grid(axis="x", visible=False)
        for row in grid:
            row[0].set_ylabel("score (%)")
        names = [k for k in ("NMI", "ACC", "ARI", "reported") if k in handles]
        fig.legend([handles[k] for k in names], names, loc="outside lower center", ncol=len(names))
        title = "Results per dataset (mean ± std over completed runs)" if ncols > 1 else "Mean ± std over completed runs"
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig
