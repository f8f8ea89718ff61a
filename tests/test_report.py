"""The report: Markdown/HTML with the tables, training curves and per-run figures (PNG and PDF)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import plots
from bench.errors import ConfigError
from bench.report import report_command

FIXTURE = Path(__file__).parent / "golden" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def copy_with_predictions(dest: Path) -> Path:
    """The golden fixture records plus a predictions.npz (400 images, 10 classes) beside each completed run."""
    shutil.copytree(FIXTURE, dest)
    for path in sorted(dest.glob("runs/*/*/*/record.json")):
        rec = json.loads(path.read_text())
        if rec["status"] != "completed":
            continue
        rng = np.random.default_rng(rec["seed"])
        y = np.repeat(np.arange(10), 40)
        perm = rng.permutation(10)
        pred = perm[y]
        wrong = rng.random(len(y)) > rec["metrics"]["acc"]
        pred[wrong] = perm[(y[wrong] + 1) % 10]
        np.savez(path.parent / "predictions.npz", labels_true=y, labels_pred=pred)
    return dest


@pytest.fixture(scope="module")
def markdown_report(tmp_path_factory):
    root = copy_with_predictions(tmp_path_factory.mktemp("rep") / "results")
    assert report_command([f"results_dir={root}"]) == 0
    return root / "report"


def linked_files(text: str) -> list[str]:
    return re.findall(r"\]\((figures/[^)]+)\)", text)


def test_report_sections_and_tables(markdown_report):
    text = (markdown_report / "report.md").read_text()
    for heading in ("# Clustering benchmark report", "## Results", "### Reproduced minus reported",
                    "## CoNR ablation", "## Training curves", "## Runs: confusion matrices and cluster sizes",
                    "## All runs"):
        assert f"\n{heading}\n" in f"\n{text}", heading
    assert "13 run record(s) (10 completed, 1 diverged, 1 failed, 1 running)" in text
    assert "| full      |  **86.6** (1)   |" in text
    assert "| BYOL     | Digits    | 2      |           | diverged  | -     |" in text
    assert "RuntimeError: CUDA out of memory" in text
    assert (markdown_report / "table.tex").read_text().startswith("\\begin{table}")
    assert (markdown_report / "table.csv").read_text().startswith("source,method,dataset")


def test_report_figures_exist_as_png_and_pdf(markdown_report):
    text = (markdown_report / "report.md").read_text()
    links = linked_files(text)
    pngs = [x for x in links if x.endswith(".png")]
    assert len(pngs) == len([x for x in links if x.endswith(".pdf")])
    stems = {Path(x).stem for x in pngs}
    assert {"overview", "curves-byol-digits", "curves-conr-digits-full", "curves-scan-digits",
            "run-kmeans-digits-s0-a1b2c3d4e5f60718", "run-conr-digits-s0-c1c1c1c1c1c1c1c1"} <= stems
    assert len([s for s in stems if s.startswith("run-")]) == 10
    for rel in links:
        data = (markdown_report / rel).read_bytes()
        assert data.startswith(PNG_MAGIC if rel.endswith(".png") else b"%PDF"), rel
        assert len(data) > 5000, rel
    on_disk = {p.name for p in (markdown_report / "figures").iterdir()}
    assert on_disk == {Path(x).name for x in links}


def test_report_says_what_has_no_history(markdown_report):
    text = (markdown_report / "report.md").read_text()
    assert "No per-epoch history (nothing to plot): BYOL on CIFAR-10; CoNR on Digits (ablation noloss); " \
           "k-means on Digits." in text


def test_html_report_filtered(tmp_path):
    root = copy_with_predictions(tmp_path / "results")
    out = tmp_path / "html"
    assert report_command([f"results_dir={root}", "format=html", f"out={out}", "method=kmeans,byol",
                           "per_run=false"]) == 0
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<strong>" in text and "conr" not in text.lower().replace("conr paper", "")
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs and all((out / s).exists() for s in srcs)
    assert not any("run-" in s for s in srcs)


def test_report_without_records_or_figures(tmp_path):
    (tmp_path / "runs").mkdir()
    assert report_command([f"results_dir={tmp_path}", "figures=false"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "No run records match." in text
    assert not (tmp_path / "report" / "figures").exists()


def test_report_option_errors(tmp_path):
    with pytest.raises(ConfigError, match="format='pdf'"):
        report_command([f"results_dir={tmp_path}", "format=pdf"])
    with pytest.raises(ConfigError, match="unknown option 'seed'"):
        report_command(["seed=1"])


def test_report_reruns_drop_stale_figures(tmp_path):
    root = copy_with_predictions(tmp_path / "results")
    figs = root / "report" / "figures"
    figs.mkdir(parents=True)
    (figs / "run-gone-x-s0.png").write_bytes(PNG_MAGIC)
    assert report_command([f"results_dir={root}", "method=kmeans"]) == 0
    assert not (figs / "run-gone-x-s0.png").exists()
    assert (figs / "run-kmeans-digits-s0-a1b2c3d4e5f60718.pdf").exists()


def test_report_of_a_run_without_predictions_uses_cluster_sizes(tmp_path):
    folder = tmp_path / "runs" / "kmeans" / "digits" / "s0-h"
    folder.mkdir(parents=True)
    rec = {"method": "kmeans", "dataset": "digits", "seed": 0, "run_id": "s0-h", "status": "completed",
           "metrics": {"nmi": 0.5, "acc": 0.5, "ari": 0.4}, "cluster_sizes": [5, 7, 3], "artifacts": {}}
    (folder / "record.json").write_text(json.dumps(rec))
    assert report_command([f"results_dir={tmp_path}", "reported=false"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "no predictions saved; cluster sizes only" in text
    assert (tmp_path / "report" / "figures" / "run-kmeans-digits-s0-h.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# the pieces of the figures


@pytest.mark.parametrize("n_clusters", [10, 13, 6])
def test_matched_confusion_puts_the_assignment_on_the_diagonal(n_clusters):
    from bench.metrics import cluster_acc

    rng = np.random.default_rng(n_clusters)
    y = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.7, (y * 7 + 3) % n_clusters, rng.integers(0, n_clusters, 500))
    m, classes, clusters, n = plots.matched_confusion(y, pred)
    assert n == min(10, len(np.unique(pred)))
    assert m.sum() == 500 and sorted(classes) == list(range(10)) and sorted(clusters) == sorted(np.unique(pred))
    assert np.trace(m[:n, :n]) / 500 == pytest.approx(cluster_acc(y, pred))
    for i in range(n):
        assert m[i].sum() == np.sum(y == classes[i]) and m[:, i].sum() == np.sum(pred == clusters[i])


def test_stage_layout_puts_stages_one_after_another():
    zero_based = [[{"stage": "a", "epoch": e} for e in range(5)] + [{"stage": "b", "epoch": e} for e in range(3)]]
    order, offsets, starts = plots.stage_layout(zero_based)
    assert order == ["a", "b"] and offsets == {"a": 0.0, "b": 5.0} and starts == {"a": 0.0, "b": 5.0}
    one_based = [[{"stage": "a", "epoch": e} for e in range(1, 6)] + [{"stage": "b", "epoch": e} for e in range(1, 4)]]
    order, offsets, starts = plots.stage_layout(one_based)
    assert offsets == {"a": 0.0, "b": 5.0} and starts == {"a": 1.0, "b": 6.0}
    xs, ys = plots.history_series(one_based[0], offsets, "epoch")
    assert list(xs) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_curves_figure_handles_nan_and_missing_metrics(tmp_path):
    runs = [{"seed": 0, "status": "diverged",
             "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": float("nan")}]},
            {"seed": 1, "status": "completed", "history": [{"epoch": 1, "loss": 2.0, "nmi": 0.5, "acc": 0.6}]}]
    fig = plots.curves_figure(runs, "t")
    png, pdf = plots.save(fig, tmp_path, "c")
    assert png.read_bytes().startswith(PNG_MAGIC) and pdf.read_bytes().startswith(b"%PDF")
