"""Paper-style tables from run records: mean ± std (n) per method, dataset and metric, in %.

    python -m bench table [results_dir=results] [method=a,b] [dataset=x,y] [protocol=P] [suite=S]
                          [format=markdown|latex|csv|html] [out=FILE] [reported=true|false] [diff=true]
                          [rows=method|ablation] [reported_file=CSV]

Rows are methods, columns are datasets x NMI / ACC / ARI.  Only completed runs are averaged;
failed, diverged and running runs are counted and shown as such, and a method/dataset pair
without any run shows as "missing".  The best value per column is in bold, the second underlined.
The published numbers (results/reported/reported.csv) appear as reference rows, and `diff=true`
adds the "reproduced minus reported" view.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("nmi", "acc", "ari")
METRIC_LABELS = {"nmi": "NMI", "acc": "ACC", "ari": "ARI"}
NOT_AVERAGED_KEYS = ("failed", "diverged", "running", "other")
DATASET_LABELS = {
    "cifar10": "CIFAR-10",
    "cifar20": "CIFAR-20",
    "cifar100": "CIFAR-100",
    "stl10": "STL-10",
    "imagenet10": "ImageNet-10",
    "imagenet_dogs": "ImageNet-Dogs",
    "tinyimagenet": "Tiny-ImageNet",
    "digits": "Digits",
}
DATASET_ORDER = ("cifar10", "cifar20", "cifar100", "stl10", "imagenet10", "imagenet_dogs", "tinyimagenet")
METHOD_LABELS = {"byol": "BYOL", "conr": "CoNR", "scan": "SCAN", "nnm": "NNM", "kmeans": "k-means"}
FORMATS = ("markdown", "latex", "csv", "html")
SUFFIX_FORMATS = {".md": "markdown", ".tex": "latex", ".csv": "csv", ".html": "html", ".htm": "html"}
REPORTED_COLUMNS = ("method", "registry_method", "dataset", "nmi", "acc", "ari", "protocol", "source", "note")
RUN_COLUMNS = ("method", "dataset", "seed", "tag", "status", "protocol", "protocol_name", "suite", "ablation",
               "config_hash", "error", *METRICS)
FULL_VARIANTS = ("", "full")
TABLE_OPTIONS = ("results_dir", "method", "dataset", "protocol", "suite", "format", "out", "reported", "diff",
                 "rows", "reported_file")


# --------------------------------------------------------------------------------------------------------------
# records -> one row per run -> mean, std, n per group


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return 100.0 * value if math.isfinite(value) else math.nan


def protocol_of(record: dict) -> tuple[str, str]:
    """(train splits joined by '+', protocol name) of a record; empty strings when unknown."""
    p = record.get("protocol")
    if isinstance(p, dict):
        train = p.get("train")
        splits = "+".join(str(s) for s in train) if isinstance(train, (list, tuple)) else ""
        return splits, str(p.get("name") or "")
    if isinstance(p, str):
        return p, p
    return "", ""


def ablation_of(record: dict) -> str:
    """The CoNR ablation variant of a record (config.conr.ablation), '' when it has none."""
    cfg = record.get("config")
    conr = cfg.get("conr") if isinstance(cfg, dict) else None
    value = conr.get("ablation") if isinstance(conr, dict) else None
    return str(value) if value not in (None, "") else ""


def run_frame(records: Iterable[dict]):
    """One row per run: identity, status and the metrics in % (NaN unless the run completed)."""
    import pandas as pd

    rows = []
    for r in records:
        status = str(r.get("status") or "unknown")
        metrics = r.get("metrics") if status == "completed" else None
        metrics = metrics if isinstance(metrics, dict) else {}
        splits, pname = protocol_of(r)
        err = r.get("error") if isinstance(r.get("error"), dict) else {}
        suite = r.get("suite")
        rows.append({
            "method": str(r.get("method") or "?"),
            "dataset": str(r.get("dataset") or "?"),
            "seed": r.get("seed"),
            "tag": str(r.get("tag") or ""),
            "status": status,
            "protocol": splits,
            "protocol_name": pname,
            "suite": suite if isinstance(suite, str) else "",
            "ablation": ablation_of(r),
            "config_hash": str(r.get("config_hash") or ""),
            "error": str(err.get("type") or ""),
            **{m: _percent(metrics.get(m)) for m in METRICS},
        })
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def aggregate(frame, by: str = "method"):
    """Per (by, dataset): <metric>_mean, <metric>_std (sample std), <metric>_n over completed runs only,
    plus runs, completed, failed, diverged, running, other, configs, protocols, errors."""
    import pandas as pd

    keys = [by, "dataset"]
    stat_cols = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]
    extra = ["runs", "completed", "failed", "diverged", "running", "other", "configs", "protocols", "errors"]
    if frame.empty:
        return pd.DataFrame(columns=stat_cols + extra,
                            index=pd.MultiIndex.from_tuples([], names=keys))
    done = frame[frame["status"] == "completed"]
    g = frame.groupby(keys, sort=True)
    out = pd.DataFrame(index=g.size().index)
    dg = done.groupby(keys, sort=True)
    for m in METRICS:
        out[f"{m}_mean"] = dg[m].mean()
        out[f"{m}_std"] = dg[m].std(ddof=1)
        out[f"{m}_n"] = dg[m].count()
        out[f"{m}_n"] = out[f"{m}_n"].fillna(0).astype(int)
    out["runs"] = g.size()
    counts = frame.groupby([*keys, "status"]).size().unstack(fill_value=0).reindex(out.index, fill_value=0)
    for s in ("completed", "failed", "diverged"):
        out[s] = counts[s] if s in counts else 0
    out["running"] = sum(counts[s] for s in ("running", "pending") if s in counts)
    out["other"] = out["runs"] - out[["completed", "failed", "diverged", "running"]].sum(axis=1)
    out["configs"] = g["config_hash"].nunique()
    out["protocols"] = g["protocol"].agg(lambda s: ",".join(sorted(set(s) - {""})))
    out["errors"] = frame[frame["error"] != ""].groupby(keys)["error"].agg(
        lambda s: ",".join(sorted(set(s)))).reindex(out.index).fillna("")
    return out[stat_cols + extra]


# --------------------------------------------------------------------------------------------------------------
# the published numbers


def default_reported_file(results_dir: str | Path = "results") -> Path:
    """<results_dir>/reported/reported.csv when present, else the copy kept with this repository."""
    local = Path(results_dir) / "reported" / "reported.csv"
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "results" / "reported" / "reported.csv"


def load_reported(path: str | Path):
    """The published numbers as a frame (values in %); a malformed file is an error naming the file and row."""
    import pandas as pd

    from bench.errors import BenchError

    path = Path(path)
    if not path.exists():
        raise BenchError(f"{path}: no such file (the published numbers; pass reported=false to leave them out)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REPORTED_COLUMNS if c not in df.columns]
    if missing:
        raise BenchError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REPORTED_COLUMNS)}")
    for m in METRICS:
        values = pd.to_numeric(df[m].replace("", "nan"), errors="coerce")
        bad = df[m][values.isna() & (df[m] != "")]
        if len(bad):
            i = bad.index[0]
            raise BenchError(f"{path}, row {i + 2}, column {m}: {bad.iloc[0]!r} is not a number (expected a value in %)")
        df[m] = values
    return df[list(REPORTED_COLUMNS)]


# --------------------------------------------------------------------------------------------------------------
# the table model, independent of the output format


@dataclass
class Cell:
    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    text: str = ""  # shown instead of a number: "missing", "failed (2)", "-"
    rank: int = 0  # 1: best in its column, 2: second
    mark: str = ""  # appended after the number (the diff view's protocol mismatch)
    state: str = "ok"  # ok, missing, failed, diverged, running, failed+diverged ..., no value, reported, not reported

    @property
    def has_value(self) -> bool:
        return not math.isnan(self.mean)


@dataclass
class Row:
    label: str
    source: str  # "reported" or "reproduced"
    key: str
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    runs: str = ""


@dataclass
class Table:
    title: str
    datasets: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    legend: str = ""
    kind: str = "results"  # "results" (mean ± std (n)), "diff" (signed differences)
    row_header: str = "Method"
    show_source: bool = False
    show_runs: bool = False
    long: list[dict] = field(default_factory=list)  # one dict per (row, dataset, metric), for CSV


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def order_datasets(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [d for d in DATASET_ORDER if d in names]
    return known + sorted(names - set(known))


def _status_text(counts: dict[str, int]) -> str:
    parts = [f"{s} ({counts[s]})" for s in ("failed", "diverged", "running", "other") if counts.get(s)]
    return ", ".join(parts)


def _runs_text(counts: dict[str, int]) -> str:
    parts = [f"{counts[s]} {s}" for s in ("completed", "failed", "diverged", "running", "other") if counts.get(s)]
    return ", ".join(parts) if parts else "none"


def _rank(rows: list[Row], datasets: list[str]) -> None:
    for d in datasets:
        for m in METRICS:
            cells = [r.cells[(d, m)] for r in rows if r.cells[(d, m)].has_value]
            if len(cells) < 2:
                continue
            distinct = sorted({round(c.mean, 1) for c in cells}, reverse=True)
            for c in cells:
                v = round(c.mean, 1)
                c.rank = 1 if v == distinct[0] else 2 if len(distinct) > 1 and v == distinct[1] else 0


def _row_key(frame, by: str):
    if by == "method":
        return frame["method"] + frame["tag"].map(lambda t: f" ({t})" if t else "")
    return frame["ablation"].map(lambda a: a or "full")


def build_table(records: list[dict], *, reported=None, datasets: list[str] | None = None,
                by: str = "method", protocol: str | None = None, title: str | None = None) -> Table:
    """The results table: reproduced rows (aggregated records) under the reported rows, if any."""
    frame = run_frame(records)
    notes: list[str] = []
    if by == "method":
        variants = frame["ablation"].map(lambda a: a not in FULL_VARIANTS)
        if variants.any():
            names = ", ".join(sorted(set(frame.loc[variants, "ablation"])))
            notes.append(f"{int(variants.sum())} ablation run(s) ({names}) are left out here; "
                         "see the ablation table (rows=ablation).")
            frame = frame[~variants]
    else:
        frame = frame[frame["method"] == "conr"]
        reported = None
    frame = frame.assign(row=_row_key(frame, by))
    agg = aggregate(frame, by="row")
    if datasets is None:
        datasets = order_datasets(frame["dataset"])
        if not datasets and reported is not None:
            datasets = order_datasets(reported["dataset"])
    rows: list[Row] = []
    sources: dict[str, list[str]] = {}
    if reported is not None:
        rep = reported[reported["dataset"].isin(datasets)]
        if protocol:
            kept = set(frame["protocol"]) | {protocol}
            rep = rep[rep["protocol"].isin(kept)]
        for name in dict.fromkeys(rep["method"]):
            part = rep[rep["method"] == name]
            row = Row(label=name, source="reported", key=str(part["registry_method"].iloc[0]))
            for d in datasets:
                hit = part[part["dataset"] == d]
                for m in METRICS:
                    value = float(hit[m].iloc[0]) if len(hit) and not math.isnan(hit[m].iloc[0]) else math.nan
                    row.cells[(d, m)] = Cell(mean=value, text="" if not math.isnan(value) else "-",
                                             state="reported" if not math.isnan(value) else "not reported")
            rows.append(row)
            for src in dict.fromkeys(part["source"]):
                sources.setdefault(src, []).append(name)
    not_averaged: list[str] = []
    missing: list[str] = []
    mixed: list[str] = []
    labels = sorted(set(frame["row"]), key=lambda k: (k != "full", method_label(k).lower(), k)) if len(frame) else []
    for key in labels:
        label = key if by != "method" else _method_row_label(key)
        row = Row(label=label, source="reproduced", key=key)
        totals = {"completed": 0, "failed": 0, "diverged": 0, "running": 0, "other": 0}
        for d in datasets:
            if (key, d) not in agg.index:
                for m in METRICS:
                    row.cells[(d, m)] = Cell(text="missing", state="missing")
                missing.append(f"{label} on {dataset_label(d)}")
                continue
            a = agg.loc[(key, d)]
            counts = {s: int(a[s]) for s in totals}
            for s in totals:
                totals[s] += counts[s]
            bad = _status_text(counts)
            if bad:
                errs = f" ({a['errors'].replace(',', ', ')})" if a["errors"] else ""
                not_averaged.append(f"{label} on {dataset_label(d)}, "
                                    f"{_runs_text({s: counts[s] for s in NOT_AVERAGED_KEYS})}{errs}")
            if int(a["configs"]) > 1:
                mixed.append(f"{label} on {dataset_label(d)} ({int(a['configs'])} configs)")
            for m in METRICS:
                n = int(a[f"{m}_n"])
                if n:
                    row.cells[(d, m)] = Cell(mean=float(a[f"{m}_mean"]), std=float(a[f"{m}_std"]), n=n)
                elif counts["completed"]:
                    row.cells[(d, m)] = Cell(text=f"no value ({counts['completed']})", state="no value")
                else:
                    state = "+".join(k for k in NOT_AVERAGED_KEYS if counts[k])
                    row.cells[(d, m)] = Cell(text=bad, state=state)
        row.runs = _runs_text(totals)
        rows.append(row)
    _rank(rows, datasets)
    ranked = any(c.rank for r in rows for c in r.cells.values())
    n_runs = len(frame)
    if not_averaged:
        notes.append("Not averaged (counted under Runs): " + "; ".join(not_averaged) + ".")
    if missing:
        notes.append("Missing (no run): " + "; ".join(missing) + ".")
    if mixed:
        notes.append("Averaged over runs of different configs: " + "; ".join(mixed) + ".")
    if sources:
        notes.append("Reported: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in sources.items()) + ".")
    show_runs = bool(len(frame)) and not (frame["status"] == "completed").all()
    what = "CoNR ablation" if by != "method" else "Clustering results"
    table = Table(
        title=title or f"{what}: {n_runs} run(s)",
        datasets=datasets,
        rows=rows,
        notes=notes,
        legend="NMI, ACC and ARI in %: mean ± std (number of completed runs)."
               + (" Best per column in bold, second underlined." if ranked else ""),
        row_header="Method" if by == "method" else "Variant",
        show_source=any(r.source == "reported" for r in rows),
        show_runs=show_runs,
    )
    table.long = _long_rows(table, agg)
    return table


def _method_row_label(key: str) -> str:
    name, sep, rest = key.partition(" (")
    return method_label(name) + (sep + rest if sep else "")


def _long_rows(table: Table, agg) -> list[dict]:
    out = []
    for row in table.rows:
        for d in table.datasets:
            a = agg.loc[(row.key, d)] if row.source == "reproduced" and (row.key, d) in agg.index else None
            for m in METRICS:
                c = row.cells[(d, m)]
                zero = 0 if row.source == "reproduced" else ""
                out.append({
                    "source": row.source,
                    "method": row.key if row.source == "reproduced" else row.label,
                    "dataset": d,
                    "metric": m,
                    "mean": c.mean,
                    "std": c.std,
                    "n": c.n if row.source == "reproduced" else "",
                    "runs": int(a["runs"]) if a is not None else zero,
                    **{s: int(a[s]) if a is not None else zero
                       for s in ("completed", "failed", "diverged", "running")},
                    "state": c.state,
                    "rank": c.rank or "",
                    "protocol": (a["protocols"] if a is not None else ""),
                })
    return out


def build_diff(table: Table, reported) -> Table | None:
    """Reproduced minus reported (percentage points) for each cell where both exist; None if there is none."""
    rep_rows = [r for r in table.rows if r.source == "reported" and r.key]
    rows: list[Row] = []
    mismatched = False
    for row in (r for r in table.rows if r.source == "reproduced"):
        method = row.key.partition(" (")[0]
        for ref in (r for r in rep_rows if r.key == method):
            out = Row(label=row.label, source="reproduced", key=row.key)
            for d in table.datasets:
                rep_proto = reported[(reported["method"] == ref.label) & (reported["dataset"] == d)]["protocol"]
                ours = {x["protocol"] for x in table.long
                        if x["source"] == "reproduced" and x["method"] == row.key and x["dataset"] == d}
                differs = bool(len(rep_proto)) and rep_proto.iloc[0] not in ("", "see source") and bool(
                    ours - {""}) and ours != {rep_proto.iloc[0]}
                for m in METRICS:
                    a, b = row.cells[(d, m)], ref.cells[(d, m)]
                    if a.has_value and b.has_value:
                        out.cells[(d, m)] = Cell(mean=a.mean - b.mean, n=a.n, mark="*" if differs else "")
                        mismatched |= differs
                    else:
                        out.cells[(d, m)] = Cell(text="-")
            if any(c.has_value for c in out.cells.values()):
                out.label = f"{row.label} - {ref.label}" if ref.label != row.label else row.label
                rows.append(out)
    if not rows:
        return None
    notes = ["Marked *: the reproduced runs used a different protocol from the published one."] if mismatched else []
    diff = Table(title="Reproduced minus reported", datasets=table.datasets, rows=rows, notes=notes,
                 legend="Mean of the reproduced runs minus the published value, in percentage points "
                        "(positive: the reproduction is higher).",
                 kind="diff")
    for row in rows:
        for d in diff.datasets:
            for m in METRICS:
                c = row.cells[(d, m)]
                diff.long.append({"source": "reproduced minus reported", "method": row.key, "dataset": d,
                                  "metric": m, "diff": c.mean, "n": c.n if c.has_value else "",
                                  "protocol_differs": bool(c.mark)})
    return diff


# --------------------------------------------------------------------------------------------------------------
# rendering


def _number(c: Cell, kind: str, pm: str) -> tuple[str, str]:
    """(the number part that gets bold or underlined, the suffix outside it)."""
    if kind == "diff":
        return f"{c.mean:+.1f}{c.mark}", ""
    if c.n == 0:
        return f"{c.mean:.1f}", ""
    if c.n == 1 or math.isnan(c.std):
        return f"{c.mean:.1f}", f" ({c.n})"
    return f"{c.mean:.1f}{pm}{c.std:.1f}", f" ({c.n})"


def _latex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(repl.get(ch, ch) for ch in text)


def cell_markup(c: Cell, kind: str, fmt: str) -> str:
    if not c.has_value:
        if fmt == "latex":
            return "--" if c.text == "-" else _latex_escape(c.text)
        return html.escape(c.text) if fmt == "html" else c.text
    pm = {"latex": r" $\pm$ ", "markdown": " ± ", "html": " ± "}.get(fmt, " ± ")
    num, rest = _number(c, kind, pm)
    if fmt == "latex":
        num = f"${num[0]}${num[1:]}".replace("*", r"$^{*}$") if kind == "diff" else num
        wrap = {1: r"\textbf{%s}", 2: r"\underline{%s}"}.get(c.rank, "%s")
    elif fmt == "html":
        wrap = {1: "<strong>%s</strong>", 2: "<u>%s</u>"}.get(c.rank, "%s")
    elif fmt == "markdown":
        num = num.replace("*", r"\*")
        wrap = {1: "**%s**", 2: "<u>%s</u>"}.get(c.rank, "%s")
    else:
        wrap = "%s"
    return (wrap % num) + rest


def _grid(table: Table, fmt: str) -> tuple[list[str], list[list[str]]]:
    esc = {"latex": _latex_escape, "html": html.escape}.get(fmt, str)
    lead = [table.row_header] + (["Source"] if table.show_source else [])
    body = []
    for r in table.rows:
        line = [esc(r.label)] + ([r.source] if table.show_source else [])
        line += [cell_markup(r.cells[(d, m)], table.kind, fmt) for d in table.datasets for m in METRICS]
        if table.show_runs:
            line.append(esc(r.runs))
        body.append(line)
    return lead, body


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|").replace("*", r"\*")


def to_markdown(table: Table) -> str:
    from tabulate import tabulate

    lead, body = _grid(table, "markdown")
    n_lead = len(lead)
    body = [[_md_escape(v) if i < n_lead or (table.show_runs and i == len(line) - 1) else v
             for i, v in enumerate(line)] for line in body]
    headers = lead + [f"{dataset_label(d)} {METRIC_LABELS[m]}" for d in table.datasets for m in METRICS]
    if table.show_runs:
        headers.append("Runs")
    align = ["left"] * n_lead + ["center"] * (3 * len(table.datasets)) + (["left"] if table.show_runs else [])
    text = tabulate(body, headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True)
    legend = _md_escape(table.legend).replace("in bold", "in **bold**").replace(
        "second underlined", "second <u>underlined</u>")
    notes = "".join(f"- {_md_escape(n)}\n" for n in table.notes)
    return f"{text}\n\n{legend}\n" + (f"\n{notes}" if notes else "")


def to_latex(table: Table, label: str = "tab:clustering") -> str:
    import pandas as pd

    lead, body = _grid(table, "latex")
    cols = [("", h) for h in lead] + [(dataset_label(d), METRIC_LABELS[m]) for d in table.datasets for m in METRICS]
    if table.show_runs:
        cols.append(("", "Runs"))
    cols = [(_latex_escape(a), _latex_escape(b)) for a, b in cols]
    df = pd.DataFrame(body, columns=pd.MultiIndex.from_tuples(cols))
    spec = "l" * len(lead) + "c" * (3 * len(table.datasets)) + ("l" if table.show_runs else "")
    caption = _latex_escape(table.title) + ". " + _latex_escape(table.legend).replace("±", r"$\pm$")
    caption = caption.replace("in bold", r"in \textbf{bold}").replace("second underlined",
                                                                    r"second \underline{underlined}")
    text = df.style.hide(axis="index").to_latex(
        hrules=True, multicol_align="c", column_format=spec, environment="table", position_float="centering",
        caption=caption, label=label)
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith(r"\toprule"))
    first = len(lead) + 1
    rules = " ".join(rf"\cmidrule(lr){{{first + 3 * i}-{first + 3 * i + 2}}}" for i in range(len(table.datasets)))
    lines.insert(head + 2, rules)
    n_reported = sum(r.source == "reported" for r in table.rows)
    if n_reported and n_reported < len(table.rows):
        mid = next(i for i, ln in enumerate(lines) if ln.startswith(r"\midrule"))
        lines.insert(mid + 1 + n_reported, r"\midrule")
    lines.insert(lines.index(r"\begin{tabular}{" + spec + "}"), r"\small")
    comments = [f"% {n}" for n in table.notes]
    return "\n".join(lines + comments) + "\n"


def to_html(table: Table) -> str:
    import pandas as pd

    lead, body = _grid(table, "html")
    cols = [("", h) for h in lead] + [(dataset_label(d), METRIC_LABELS[m]) for d in table.datasets for m in METRICS]
    if table.show_runs:
        cols.append(("", "Runs"))
    cols = [(html.escape(a), html.escape(b)) for a, b in cols]
    df = pd.DataFrame(body, columns=pd.MultiIndex.from_tuples(cols))
    out = [f"<h3>{html.escape(table.title)}</h3>",
           df.to_html(index=False, escape=False, border=0, classes="bench-table"),
           f'<p class="legend">{html.escape(table.legend)}</p>']
    out += [f'<p class="note">{html.escape(n)}</p>' for n in table.notes]
    return "\n".join(out) + "\n"


def to_csv(table: Table, diff: Table | None = None) -> str:
    import pandas as pd

    df = pd.DataFrame(table.long)
    if diff is not None:
        d = pd.DataFrame(diff.long)
        if len(d):
            d = d.drop_duplicates(["method", "dataset", "metric"])
            df = df.merge(d[["method", "dataset", "metric", "diff"]].rename(columns={"diff": "minus_reported"}),
                          how="left", on=["method", "dataset", "metric"])
            df.loc[df["source"] != "reproduced", "minus_reported"] = math.nan
    for c in ("mean", "std", "minus_reported"):
        if c in df:
            df[c] = df[c].map(lambda v: "" if not isinstance(v, float) or math.isnan(v) else f"{v:.2f}")
    return df.to_csv(index=False, lineterminator="\n")


def render(table: Table, fmt: str, diff: Table | None = None) -> str:
    """The table (and the diff view, when given) in one of FORMATS."""
    if fmt == "csv":
        return to_csv(table, diff)
    if fmt == "markdown":
        parts = [f"### {t.title}\n\n{to_markdown(t)}" for t in (table, diff) if t is not None]
    elif fmt == "latex":
        parts = [to_latex(table)] + ([to_latex(diff, label="tab:diff")] if diff is not None else [])
    elif fmt == "html":
        parts = [to_html(t) for t in (table, diff) if t is not None]
    else:
        from bench.errors import ConfigError

        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# the command


def parse_options(args: list[str], allowed: Iterable[str], command: str) -> dict[str, str]:
    from bench.errors import ConfigError

    allowed = tuple(allowed)
    opts: dict[str, str] = {}
    for a in args:
        if a in ("-v", "--verbose"):
            continue
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"{command}: expected key=value, got {a!r}; keys: {', '.join(allowed)}")
        if key not in allowed:
            raise ConfigError(f"{command}: unknown option {key!r}; expected one of {', '.join(allowed)}")
        opts[key] = value
    return opts


def split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip() for v in value.split(",") if v.strip()] or None


def parse_bool(value: str | None, key: str, default: bool) -> bool:
    from bench.errors import ConfigError

    if value is None:
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def filter_records(records: list[dict], *, methods=None, datasets=None, protocol=None, suite=None) -> list[dict]:
    out = []
    for r in records:
        if methods and r.get("method") not in methods:
            continue
        if datasets and r.get("dataset") not in datasets:
            continue
        if protocol and protocol not in protocol_of(r):
            continue
        if suite and r.get("suite") != suite:
            continue
        out.append(r)
    return out


def filter_reported(reported, *, methods=None):
    if reported is None or not methods:
        return reported
    wanted = {m.lower() for m in methods}
    keep = reported["registry_method"].str.lower().isin(wanted) | reported["method"].str.lower().isin(wanted)
    return reported[keep]


def markdown_table(records: list[dict], **kwargs: Any) -> str:
    """The Markdown table of these records (no reference rows unless `reported=` gives a frame)."""
    return to_markdown(build_table(records, **kwargs))


def print_summary(records: list[dict]) -> None:
    """One line per run, then the aggregate table of these runs."""
    for r in records:
        m = r.get("metrics") or {}
        if r.get("status") == "completed" and m:
            wall = (r.get("timing") or {}).get("wall_s")
            wall = float(wall) if isinstance(wall, (int, float)) else float("nan")
            print(f"{r['method']:8s} {r['dataset']:12s} seed {r.get('seed')}: NMI {m['nmi']:.4f}  ACC {m['acc']:.4f}  "
                  f"ARI {m['ari']:.4f}  ({wall:.1f} s)")
        else:
            err = (r.get("error") or {}).get("message", "")
            print(f"{r.get('method')} {r.get('dataset')} seed {r.get('seed')}: {r.get('status')} {err[:200]}")
    print()
    print(markdown_table(records), end="")


@dataclass
class Loaded:
    table: Table
    diff: Table | None
    records: list[dict]
    problems: list[str]
    n_all: int


def tables_from_options(opts: dict[str, str]) -> Loaded:
    """Load and filter the records named by parsed options and build the table (and the diff view if asked)."""
    from bench.errors import ConfigError
    from bench.store import load_records

    results_dir = opts.get("results_dir", "results")
    by = opts.get("rows", "method")
    if by not in ("method", "ablation"):
        raise ConfigError(f"rows={by!r}: expected method or ablation")
    methods, datasets = split_list(opts.get("method")), split_list(opts.get("dataset"))
    problems: list[str] = []
    everything = load_records(results_dir, problems=problems)
    records = filter_records(everything, methods=methods, datasets=datasets, protocol=opts.get("protocol"),
                             suite=opts.get("suite"))
    reported = None
    if parse_bool(opts.get("reported"), "reported", True) and by == "method":
        src = opts.get("reported_file") or default_reported_file(results_dir)
        reported = filter_reported(load_reported(src), methods=methods)
    table = build_table(records, reported=reported, datasets=datasets, by=by, protocol=opts.get("protocol"))
    want_diff = parse_bool(opts.get("diff"), "diff", False)
    diff = build_diff(table, reported) if reported is not None and want_diff else None
    return Loaded(table, diff, records, problems, len(everything))


def table_command(args: list[str]) -> int:
    import sys

    from bench.errors import ConfigError
    from bench.io import atomic_write_text

    opts = parse_options(args, TABLE_OPTIONS, "table")
    out = opts.get("out")
    fmt = opts.get("format") or (SUFFIX_FORMATS.get(Path(out).suffix.lower(), "markdown") if out else "markdown")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    loaded = tables_from_options(opts)
    table, diff = loaded.table, loaded.diff
    results_dir = opts.get("results_dir", "results")
    if not loaded.records:
        print(f"no run records under {results_dir}/runs" + (" match the filters" if loaded.n_all else ""))
        if not table.rows:
            return 0
        table.title = "Published numbers"
    if parse_bool(opts.get("diff"), "diff", False) and diff is None:
        print("note: no cell has both a reproduced and a reported value, so there is no diff view", file=sys.stderr)
    text = render(table, fmt, diff)
    if out:
        atomic_write_text(out, text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    for p in loaded.problems:
        print(f"warning: {p}", file=sys.stderr)
    return 0
