"""Tables from run records: golden outputs, aggregation, filters, the published numbers.

The golden files under tests/golden/ are compared byte for byte.  After an intended change to the
output, regenerate them with

    BENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_table.py

and read the diff (git diff tests/golden) before keeping it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import table as tbl
from bench.errors import BenchError, ConfigError

GOLDEN = Path(__file__).parent / "golden"
FIXTURE = GOLDEN / "results"
REGEN = os.environ.get("BENCH_REGEN_GOLDEN", "") not in ("", "0")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with BENCH_REGEN_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from the golden file (BENCH_REGEN_GOLDEN=1 rewrites it)"


def render(fmt: str, **opts: str) -> str:
    loaded = tbl.tables_from_options({"results_dir": str(FIXTURE), **opts})
    return tbl.render(loaded.table, fmt, loaded.diff)


def write_record(root: Path, **fields) -> dict:
    rec = {
        "method": "byol", "dataset": "digits", "seed": 0, "tag": "", "status": "completed",
        "protocol": {"name": "transductive", "train": ["train", "test"], "eval": ["train", "test"]},
        "metrics": {"nmi": 0.5, "acc": 0.6, "ari": 0.4}, "config_hash": "h", "config": {}, "history": [],
        "error": None,
    }
    rec.update(fields)
    folder = root / "runs" / rec["method"] / rec["dataset"] / f"s{rec['seed']}-{rec['config_hash']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(rec))
    return rec


# ---------------------------------------------------------------------------------------------------------------
# golden outputs


def test_golden_markdown_with_diff():
    check_golden("table.md", render("markdown", diff="true"))


def test_golden_latex():
    check_golden("table.tex", render("latex"))


def test_golden_csv_with_diff():
    check_golden("table.csv", render("csv", diff="true"))


def test_golden_ablation_markdown():
    check_golden("ablation.md", render("markdown", rows="ablation"))


def test_latex_compiles(tmp_path):
    engine = shutil.which("pdflatex") or shutil.which("lualatex") or shutil.which("xelatex")
    if engine is None:
        pytest.skip("no LaTeX engine (pdflatex, lualatex, xelatex) on this machine; "
                    "install texlive-latex-base and texlive-latex-recommended to run this check")
    body = render("latex", diff="true")
    doc = ("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage[utf8]{inputenc}\n"
           "\\usepackage{booktabs}\n\\usepackage[margin=1cm,landscape]{geometry}\n"
           f"\\begin{{document}}\n{body}\\end{{document}}\n")
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "t.pdf").exists()


# ---------------------------------------------------------------------------------------------------------------
# what the table says


def test_failed_and_diverged_are_counted_not_averaged():
    records = [json.loads(p.read_text()) for p in FIXTURE.glob("runs/byol/digits/*/record.json")]
    assert sorted(r["status"] for r in records) == ["completed", "completed", "diverged"]
    table = tbl.build_table(records)
    row = next(r for r in table.rows if r.key == "byol")
    cell = row.cells[("digits", "nmi")]
    ok = [100 * r["metrics"]["nmi"] for r in records if r["status"] == "completed"]
    assert cell.n == 2
    assert cell.mean == pytest.approx(np.mean(ok))
    assert cell.std == pytest.approx(np.std(ok, ddof=1))
    assert row.runs == "2 completed, 1 diverged"
    assert any("1 diverged" in n for n in table.notes)


def test_a_failed_run_with_metrics_is_still_not_averaged():
    recs = [
        {"method": "m", "dataset": "d", "status": "completed", "metrics": {"nmi": 0.5, "acc": 0.5, "ari": 0.5}},
        {"method": "m", "dataset": "d", "status": "failed", "metrics": {"nmi": 0.0, "acc": 0.0, "ari": 0.0}},
        {"method": "m", "dataset": "d", "status": "completed", "metrics": {"nmi": float("nan"), "acc": 0.7,
                                                                           "ari": None}},
    ]
    cells = tbl.build_table(recs).rows[0].cells
    assert (cells[("d", "nmi")].mean, cells[("d", "nmi")].n) == (50.0, 1)
    assert (cells[("d", "acc")].mean, cells[("d", "acc")].n) == (pytest.approx(60.0), 2)
    assert cells[("d", "ari")].n == 1


def test_only_failed_runs_show_their_status_and_no_number():
    recs = [{"method": "m", "dataset": "d", "status": "failed"}, {"method": "m", "dataset": "d", "status": "diverged"},
            {"method": "m", "dataset": "d", "status": "failed"}]
    table = tbl.build_table(recs)
    cell = table.rows[0].cells[("d", "acc")]
    assert not cell.has_value
    assert cell.text == "failed (2), diverged (1)"
    assert cell.state == "failed+diverged"
    assert "failed (2), diverged (1)" in tbl.to_markdown(table)


def test_missing_pairs_show_as_missing_and_are_listed():
    recs = [{"method": "a", "dataset": "x", "status": "completed", "metrics": {"nmi": 0.1, "acc": 0.2, "ari": 0.3}},
            {"method": "b", "dataset": "y", "status": "completed", "metrics": {"nmi": 0.1, "acc": 0.2, "ari": 0.3}}]
    table = tbl.build_table(recs)
    assert table.rows[0].cells[("y", "nmi")].text == "missing"
    assert any(n.startswith("Missing (no run): a on y; b on x") for n in table.notes)


def test_best_bold_second_underlined_and_ties_share_the_rank():
    def rec(method, acc):
        return {"method": method, "dataset": "d", "status": "completed", "metrics": {"nmi": acc, "acc": acc, "ari": acc}}

    table = tbl.build_table([rec("a", 0.90), rec("b", 0.9001), rec("c", 0.85), rec("d", 0.80)])
    ranks = {r.key: r.cells[("d", "acc")].rank for r in table.rows}
    assert ranks == {"a": 1, "b": 1, "c": 2, "d": 0}
    md = tbl.to_markdown(table)
    assert "**90.0** (1)" in md and "<u>85.0</u> (1)" in md
    tex = tbl.to_latex(table)
    assert r"\textbf{90.0} (1)" in tex and r"\underline{85.0} (1)" in tex
    html = tbl.to_html(table)
    assert "<strong>90.0</strong> (1)" in html and "<u>85.0</u> (1)" in html


def test_filters_method_dataset_suite_protocol():
    md = render("markdown", suite="paper", reported="false")
    assert "CIFAR-10" in md and "Digits" not in md and "k-means" not in md
    md = render("markdown", method="kmeans", dataset="digits")
    assert "k-means" in md and "BYOL" not in md and "CIFAR-10" not in md
    md = render("markdown", method="byol")
    assert "| BYOL          | reported" not in md
    assert "| BYOL     | reported" in md and "| ProPos" not in md
    md = render("markdown", protocol="transductive", method="kmeans")
    assert "74.2 ± 0.4 (3)" in md
    loaded = tbl.tables_from_options({"results_dir": str(FIXTURE), "protocol": "inductive"})
    assert not loaded.table.rows


def test_dataset_filter_sets_the_columns_even_without_runs():
    loaded = tbl.tables_from_options({"results_dir": str(FIXTURE), "dataset": "stl10,digits", "method": "kmeans"})
    assert loaded.table.datasets == ["stl10", "digits"]
    km = next(r for r in loaded.table.rows if r.key == "kmeans")
    assert km.cells[("stl10", "nmi")].text == "missing"


def test_ablation_runs_are_kept_out_of_the_main_table():
    loaded = tbl.tables_from_options({"results_dir": str(FIXTURE), "reported": "false"})
    conr = next(r for r in loaded.table.rows if r.key == "conr")
    assert conr.cells[("digits", "nmi")].n == 1
    abl = tbl.tables_from_options({"results_dir": str(FIXTURE), "rows": "ablation"}).table
    assert [r.label for r in abl.rows] == ["full", "knn", "noloss"]


def test_diff_marks_a_protocol_mismatch(tmp_path):
    write_record(tmp_path, dataset="imagenet10", metrics={"nmi": 0.866, "acc": 0.94, "ari": 0.87})
    loaded = tbl.tables_from_options({"results_dir": str(tmp_path), "diff": "true"})
    cell = loaded.diff.rows[0].cells[("imagenet10", "acc")]
    assert cell.mean == pytest.approx(94.0 - 93.9)
    assert cell.mark == "*"
    md = tbl.render(loaded.table, "markdown", loaded.diff)
    assert r"+0.1\*" in md and "different protocol" in md


def test_diff_absent_without_overlap(tmp_path, capsys):
    write_record(tmp_path, method="kmeans")
    assert tbl.table_command([f"results_dir={tmp_path}", "diff=true"]) == 0
    captured = capsys.readouterr()
    assert "no cell has both" in captured.err
    assert "Reproduced minus reported" not in captured.out


def test_mixed_configs_are_flagged():
    recs = [{"method": "m", "dataset": "d", "status": "completed", "config_hash": h,
             "metrics": {"nmi": 0.5, "acc": 0.5, "ari": 0.5}} for h in ("a", "b")]
    assert any("different configs" in n for n in tbl.build_table(recs).notes)


def test_tags_are_separate_rows():
    recs = [{"method": "byol", "dataset": "d", "status": "completed", "tag": t,
             "metrics": {"nmi": 0.5, "acc": 0.5, "ari": 0.5}} for t in ("", "lr0.1")]
    assert [r.label for r in tbl.build_table(recs).rows] == ["BYOL", "BYOL (lr0.1)"]


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_table_command_prints_and_writes(tmp_path, capsys):
    assert tbl.table_command([f"results_dir={FIXTURE}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Clustering results")
    target = tmp_path / "t.tex"
    assert tbl.table_command([f"results_dir={FIXTURE}", f"out={target}"]) == 0
    assert target.read_text().startswith("\\begin{table}")
    target = tmp_path / "t.txt"
    assert tbl.table_command([f"results_dir={FIXTURE}", f"out={target}", "format=csv"]) == 0
    assert target.read_text().startswith("source,method,dataset,metric,mean")


def test_cli_table(capsys):
    from bench.cli import main

    assert main(["table", f"results_dir={FIXTURE}", "format=html"]) == 0
    out = capsys.readouterr().out
    assert "<table" in out and "<strong>" in out
    assert main(["table", f"results_dir={FIXTURE}", "format=pdf"]) == 2
    assert "format='pdf'" in capsys.readouterr().err


def test_empty_results_dir_shows_the_published_numbers(tmp_path, capsys):
    assert tbl.table_command([f"results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no run records under {tmp_path}/runs\n")
    assert "### Published numbers" in out and "| ProPos" in out and "reproduced" not in out
    assert tbl.table_command([f"results_dir={tmp_path}", "reported=false"]) == 0
    assert capsys.readouterr().out == f"no run records under {tmp_path}/runs\n"


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown option 'metod'"):
        tbl.table_command(["metod=byol"])
    with pytest.raises(ConfigError, match="expected key=value"):
        tbl.table_command(["byol"])
    with pytest.raises(ConfigError, match="diff='maybe'"):
        tbl.table_command([f"results_dir={FIXTURE}", "diff=maybe"])
    with pytest.raises(ConfigError, match="rows='seed'"):
        tbl.table_command([f"results_dir={FIXTURE}", "rows=seed"])


def test_print_summary_and_markdown_table(capsys):
    records = [json.loads(p.read_text()) for p in sorted(FIXTURE.glob("runs/kmeans/digits/*/record.json"))]
    tbl.print_summary(records)
    out = capsys.readouterr().out
    assert "kmeans   digits       seed 0: NMI 0.7423" in out
    assert "| k-means  | 74.2 ± 0.4 (3) |" in out
    assert "Best per column" not in out


def test_unreadable_record_is_a_warning(tmp_path, capsys):
    write_record(tmp_path)
    bad = tmp_path / "runs" / "byol" / "digits" / "s9-x"
    bad.mkdir(parents=True)
    (bad / "record.json").write_text("{not json")
    assert tbl.table_command([f"results_dir={tmp_path}", "reported=false"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "s9-x" in captured.err
    assert "50.0 (1)" in captured.out


# ---------------------------------------------------------------------------------------------------------------
# the published numbers


def test_reported_file_is_consistent():
    df = tbl.load_reported(tbl.default_reported_file())
    assert set(df["registry_method"]) == {"byol", "conr", "scan", "nnm", ""}
    assert set(df.loc[df["registry_method"] == "", "method"]) == {"ProPos", "CoNR (re-run)"}
    for m in tbl.METRICS:
        assert df[m].between(0, 100).all()
    assert not df.duplicated(["method", "dataset"]).any()
    assert (df["source"] != "").all()
    byol = df[(df["method"] == "BYOL") & (df["dataset"] == "cifar10")].iloc[0]
    assert (byol["nmi"], byol["acc"], byol["ari"]) == (81.7, 89.4, 79.0)


def test_bad_reported_file_names_file_and_row(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("method,registry_method,dataset,nmi,acc,ari,protocol,source,note\n"
                    "X,x,cifar10,1.0,abc,2.0,train,somewhere,\n")
    with pytest.raises(BenchError, match=r"r\.csv, row 2, column acc: 'abc'"):
        tbl.load_reported(path)
    path.write_text("method,dataset,nmi\n")
    with pytest.raises(BenchError, match="missing column"):
        tbl.load_reported(path)
    with pytest.raises(BenchError, match="no such file"):
        tbl.load_reported(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------------------------
# the aggregation, property-based

STATUSES = ("completed", "failed", "diverged", "running")
metric_value = st.one_of(st.floats(min_value=-0.5, max_value=1.0, allow_nan=False), st.none(),
                         st.just(float("nan")))
record_strategy = st.fixed_dictionaries({
    "method": st.sampled_from(["a", "b", "c"]),
    "dataset": st.sampled_from(["x", "y"]),
    "status": st.sampled_from(STATUSES),
    "metrics": st.one_of(st.none(), st.fixed_dictionaries({m: metric_value for m in tbl.METRICS})),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record_strategy, max_size=25))
def test_aggregate_matches_numpy(records):
    agg = tbl.aggregate(tbl.run_frame(records))
    groups = {(r["method"], r["dataset"]) for r in records}
    assert set(agg.index) == groups
    for key in groups:
        mine = [r for r in records if (r["method"], r["dataset"]) == key]
        a = agg.loc[key]
        assert int(a["runs"]) == len(mine)
        for s in ("completed", "failed", "diverged", "running"):
            assert int(a[s]) == sum(r["status"] == s for r in mine)
        for m in tbl.METRICS:
            vals = np.array([100 * r["metrics"][m] for r in mine if r["status"] == "completed" and r["metrics"]
                             and r["metrics"][m] is not None and math.isfinite(r["metrics"][m])], dtype=float)
            assert int(a[f"{m}_n"]) == len(vals)
            if len(vals):
                assert a[f"{m}_mean"] == pytest.approx(vals.mean(), abs=1e-9)
            else:
                assert math.isnan(a[f"{m}_mean"])
            if len(vals) > 1:
                assert a[f"{m}_std"] == pytest.approx(vals.std(ddof=1), abs=1e-9)
            else:
                assert math.isnan(a[f"{m}_std"])
