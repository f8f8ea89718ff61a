"""A report of the run records: the results table, training curves and per-run figures.

    python -m bench report [results_dir=results] [out=DIR] [format=markdown|html]
                           [method=a,b] [dataset=x,y] [protocol=P] [suite=S]
                           [reported=true|false] [figures=true|false] [per_run=true|false]

Writes <out>/report.md (or report.html; out defaults to <results_dir>/report), the tables as
table.tex and table.csv beside it, and the figures as PNG and PDF under <out>/figures/:

    overview.png                            NMI / ACC / ARI per method and dataset, published values marked
    curves-<method>-<dataset>.png           loss, NMI and ACC per epoch, one line per seed
    run-<method>-<dataset>-<run_id>.png     confusion matrix (clusters matched to classes) and cluster sizes
"""

from __future__ import annotations

import html
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from bench import table as tbl

log = logging.getLogger(__name__)

REPORT_OPTIONS = ("results_dir", "out", "format", "method", "dataset", "protocol", "suite", "reported",
                  "figures", "per_run", "reported_file")
REPORT_FORMATS = ("markdown", "html")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: center; }
td:first-child, th:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note, .legend { color: #555; font-size: 0.9em; margin: 0.2em 0; }
code { background: #f4f4f4; padding: 0 0.25em; }
"""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


class Doc:
    """A report body that renders to Markdown or HTML."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.blocks: list[str] = []

    def heading(self, level: int, text: str) -> None:
        if self.fmt == "html":
            self.blocks.append(f"<h{level}>{html.escape(text)}</h{level}>")
        else:
            self.blocks.append(f"{'#' * level} {text}")

    def para(self, text: str, code: tuple[str, ...] = ()) -> None:
        """A paragraph; each `{}` in text is filled with the next item of code, shown as code."""
        pieces = text.split("{}")
        if len(pieces) != len(code) + 1:
            raise ValueError(f"paragraph has {len(pieces) - 1} slot(s) for {len(code)} code item(s)")
        if self.fmt == "html":
            parts = [html.escape(p) for p in pieces]
            items = [f"<code>{html.escape(c)}</code>" for c in code]
            self.blocks.append("<p>" + "".join(a + b for a, b in zip(parts, [*items, ""], strict=True)) + "</p>")
        else:
            items = [f"`{c}`" for c in code]
            self.blocks.append("".join(a + b for a, b in zip(pieces, [*items, ""], strict=True)))

    def bullets(self, items: list[str]) -> None:
        if not items:
            return
        if self.fmt == "html":
            self.blocks.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        else:
            self.blocks.append("\n".join(f"- {i}" for i in items))

    def table(self, t: tbl.Table) -> None:
        if self.fmt == "html":
            self.blocks.append(tbl.to_html(t).replace(f"<h3>{html.escape(t.title)}</h3>\n", ""))
        else:
            self.blocks.append(tbl.to_markdown(t).rstrip("\n"))

    def grid(self, headers: list[str], rows: list[list[str]]) -> None:
        if self.fmt == "html":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            self.blocks.append(f'<table class="bench-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        else:
            from tabulate import tabulate

            rows = [[c.replace("|", r"\|") for c in r] for r in rows]
            self.blocks.append(tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True))

    def figure(self, png: Path, pdf: Path, alt: str, root: Path) -> None:
        rel_png, rel_pdf = png.relative_to(root).as_posix(), pdf.relative_to(root).as_posix()
        if self.fmt == "html":
            self.blocks.append(f'<figure><img src="{html.escape(rel_png)}" alt="{html.escape(alt)}">'
                               f'<figcaption>{html.escape(alt)} (<a href="{html.escape(rel_pdf)}">PDF</a>)'
                               f"</figcaption></figure>")
        else:
            self.blocks.append(f"![{alt}]({rel_png})\n\n[PDF]({rel_pdf})")

    def render(self, title: str) -> str:
        if self.fmt == "html":
            body = "\n".join(self.blocks)
            return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
        return "\n\n".join(self.blocks) + "\n"


def _fmt_pct(value) -> str:
    return f"{100 * float(value):.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _epochs(record: dict) -> str:
    hist = record.get("history") or []
    return str(len(hist)) if hist else "-"


def _run_row(r: dict) -> list[str]:
    m = r.get("metrics") if r.get("status") == "completed" else None
    m = m if isinstance(m, dict) else {}
    wall = (r.get("timing") or {}).get("wall_s")
    err = r.get("error") if isinstance(r.get("error"), dict) else {}
    note = f"{err.get('type', '')}: {err.get('message', '')}".strip(": ") if err else ""
    if len(note) > 90:
        note = note[:87] + "..."
    variant = " ".join(x for x in (r.get("tag") or "", tbl.ablation_of(r)) if x)
    return [tbl.method_label(str(r.get("method"))), tbl.dataset_label(str(r.get("dataset"))), str(r.get("seed")),
            variant, str(r.get("status")), _fmt_pct(m.get("nmi")), _fmt_pct(m.get("acc")), _fmt_pct(m.get("ari")),
            _epochs(r), f"{float(wall):.0f} s" if isinstance(wall, (int, float)) else "-", note]


def _load_predictions(record: dict):
    import numpy as np

    name = (record.get("artifacts") or {}).get("predictions")
    if not name or not record.get("_path"):
        return None, None, "no predictions saved"
    path = Path(record["_path"]).parent / name
    if not path.exists():
        return None, None, f"{path} is missing"
    try:
        with np.load(path) as z:
            return np.asarray(z["labels_true"]), np.asarray(z["labels_pred"]), ""
    except (OSError, KeyError, ValueError) as exc:
        return None, None, f"{path}: unreadable ({exc})"


def _class_names(record: dict) -> list[str] | None:
    ds = (record.get("config") or {}).get("dataset")
    names = record.get("classes") or (ds.get("classes") if isinstance(ds, dict) else None)
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _overview_rows(table: tbl.Table) -> tuple[list[dict], list[str]]:
    reported = {r.key: r for r in table.rows if r.source == "reported" and r.key}
    rows, datasets = [], []
    for r in table.rows:
        if r.source != "reproduced" or not any(c.has_value for c in r.cells.values()):
            continue
        ref = reported.get(r.key.partition(" (")[0])
        cells = {}
        for (d, m), c in r.cells.items():
            rep = ref.cells[(d, m)].mean if ref is not None else math.nan
            cells[(d, m)] = {"mean": c.mean, "std": c.std, "reported": rep}
        rows.append({"label": r.label, "cells": cells})
    for d in table.datasets:
        if any(not math.isnan(row["cells"][(d, m)]["mean"]) for row in rows for m in tbl.METRICS):
            datasets.append(d)
    return rows, datasets


def _group_key(r: dict) -> tuple[str, str, str, str]:
    return (str(r.get("method")), str(r.get("dataset")), str(r.get("tag") or ""), tbl.ablation_of(r))


def _group_title(key: tuple[str, str, str, str]) -> str:
    method, dataset, tag, variant = key
    extra = ", ".join(x for x in (tag, f"ablation {variant}" if variant and variant != "full" else "") if x)
    return f"{tbl.method_label(method)} on {tbl.dataset_label(dataset)}" + (f" ({extra})" if extra else "")


def build_report(opts: dict[str, str]) -> Path:
    from bench import plots
    from bench.errors import ConfigError
    from bench.io import atomic_write_text

    fmt = opts.get("format", "markdown")
    if fmt not in REPORT_FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(REPORT_FORMATS)}")
    results_dir = opts.get("results_dir", "results")
    out = Path(opts.get("out") or Path(results_dir) / "report")
    figs = out / "figures"
    want_figures = tbl.parse_bool(opts.get("figures"), "figures", True)
    per_run = tbl.parse_bool(opts.get("per_run"), "per_run", True)

    loaded = tbl.tables_from_options({**opts, "diff": "true"})
    table, diff, records, problems = loaded.table, loaded.diff, loaded.records, loaded.problems
    has_ablation = any(r.get("method") == "conr" and tbl.ablation_of(r) not in tbl.FULL_VARIANTS for r in records)
    ablation = tbl.build_table(records, by="ablation", title="CoNR ablation") if has_ablation else None

    out.mkdir(parents=True, exist_ok=True)
    if figs.exists():
        for old in list(figs.glob("*.png")) + list(figs.glob("*.pdf")):
            old.unlink()
    doc = Doc(fmt)
    title = "Clustering benchmark report"
    doc.heading(1, title)
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"
    filters = [f"{k}={opts[k]}" for k in ("method", "dataset", "protocol", "suite") if opts.get(k)]
    doc.para(f"Results directory {{}}: {len(records)} run record(s) ({summary})"
             + (f", filtered by {', '.join(filters)}" if filters else "") + ". "
             + f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", code=(str(results_dir),))
    if problems:
        doc.heading(2, "Unreadable records")
        doc.bullets(problems)

    doc.heading(2, "Results")
    if not records:
        doc.para("No run records match.")
    if table.rows:
        doc.table(table)
    if diff is not None:
        doc.heading(3, diff.title)
        doc.table(diff)
    if ablation is not None:
        doc.heading(2, "CoNR ablation")
        doc.table(ablation)
    if table.rows:
        atomic_write_text(out / "table.tex", tbl.render(table, "latex", diff))
        atomic_write_text(out / "table.csv", tbl.render(table, "csv", diff))
        doc.para("The same table as LaTeX (booktabs) and CSV: {} and {}.", code=("table.tex", "table.csv"))

    if want_figures and records:
        rows, datasets = _overview_rows(table)
        if rows and datasets:
            fig = plots.overview_figure(rows, datasets, tbl.DATASET_LABELS)
            png, pdf = plots.save(fig, figs, "overview")
            doc.figure(png, pdf, "NMI, ACC and ARI per method and dataset (bars: mean ± std of the reproduced "
                                 "runs; black ticks: published values)", out)

        groups: dict[tuple[str, str, str, str], list[dict]] = {}
        for r in sorted(records, key=lambda r: (_group_key(r), r.get("seed") if isinstance(r.get("seed"), int)
                                                else 0)):
            groups.setdefault(_group_key(r), []).append(r)
        doc.heading(2, "Training curves")
        drawn = 0
        for key, runs in groups.items():
            with_history = [r for r in runs if r.get("history")]
            if not with_history:
                continue
            fig = plots.curves_figure(with_history, f"{_group_title(key)}: training curves")
            png, pdf = plots.save(fig, figs, "curves-" + "-".join(_safe(k) for k in key if k))
            doc.figure(png, pdf, f"{_group_title(key)}: loss, NMI and ACC per epoch", out)
            drawn += 1
        no_history = [_group_title(k) for k, runs in groups.items() if not any(r.get("history") for r in runs)]
        if no_history:
            doc.para("No per-epoch history (nothing to plot): " + "; ".join(no_history) + ".")
        if not drawn and not no_history:
            doc.para("No runs.")

        if per_run:
            doc.heading(2, "Runs: confusion matrices and cluster sizes")
            doc.para("Each confusion matrix puts the cluster matched to each class (Hungarian assignment) on the "
                     "diagonal; rows are normalised by class size. The bars split each cluster into images of its "
                     "matched class and of other classes.")
            for key, runs in groups.items():
                done = [r for r in runs if r.get("status") == "completed"]
                if not done:
                    continue
                doc.heading(3, _group_title(key))
                for r in done:
                    y_true, y_pred, why = _load_predictions(r)
                    if y_true is None and not r.get("cluster_sizes"):
                        doc.para(f"seed {r.get('seed')}: no figure ({why}).")
                        continue
                    fig = plots.run_figure(r, y_true, y_pred, _class_names(r))
                    stem = f"run-{_safe(r.get('method'))}-{_safe(r.get('dataset'))}-" \
                           f"{_safe(r.get('run_id') or Path(r.get('_path', 'x')).parent.name)}"
                    png, pdf = plots.save(fig, figs, stem)
                    extra = f" ({why}; cluster sizes only)" if y_true is None else ""
                    doc.figure(png, pdf, f"{plots.run_title(r)}{extra}", out)

    doc.heading(2, "All runs")
    if records:
        doc.grid(["Method", "Dataset", "Seed", "Variant", "Status", "NMI", "ACC", "ARI", "Epochs", "Wall", "Error"],
                 [_run_row(r) for r in sorted(records, key=lambda r: (*_group_key(r), str(r.get("seed"))))])
    else:
        doc.para("None.")
    path = out / ("report.html" if fmt == "html" else "report.md")
    atomic_write_text(path, doc.render(title))
    return path


def report_command(args: list[str]) -> int:
    opts = tbl.parse_options(args, REPORT_OPTIONS, "report")
    path = build_report(opts)
    print(f"wrote {path}")
    return 0
