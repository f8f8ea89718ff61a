"""End to end through the CLI: the spine with kmeans on digits."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_cli


def test_kmeans_run_writes_record_and_table(results):
    p = run_cli("run", "method=kmeans", "dataset=digits", "seeds=[0,1]", "launcher=debug", f"results_dir={results}")
    assert p.returncode == 0, p.stderr
    recs = sorted(results.glob("runs/kmeans/digits/*/record.json"))
    assert len(recs) == 2
    r = json.loads(recs[0].read_text())
    assert r["status"] == "completed" and r["protocol"]["name"] == "transductive"
    assert set(r["metrics"]) == {"nmi", "acc", "ari"} and all(0 <= v <= 1 for v in r["metrics"].values())
    assert 0.72 < r["metrics"]["nmi"] < 0.76 and 0.77 < r["metrics"]["acc"] < 0.81
    assert r["env"]["torch"] and r["env"]["faiss"] and r["env"]["git_commit"]
    assert len(r["config_hash"]) == 16 and r["timing"]["wall_s"] >= 0
    assert (recs[0].parent / "config.yaml").exists() and (recs[0].parent / "predictions.npz").exists()
    t = run_cli("table", f"results_dir={results}")
    assert t.returncode == 0 and "(2)" in t.stdout, t.stdout


def test_same_seed_same_metrics(results):
    from bench.config import compose
    from bench.runner import execute

    a = execute(compose(["method=kmeans", f"results_dir={results}/a", "train.progress=false"]))
    b = execute(compose(["method=kmeans", f"results_dir={results}/b", "train.progress=false"]))
    assert a["metrics"] == b["metrics"]


def test_unknown_names_exit_nonzero_with_choices(results):
    for args, needle in [(["method=nope"], "known methods"), (["dataset=nope"], "known datasets"),
                         (["eval.kmeans_restart=3"], "Valid keys of eval")]:
        p = run_cli("run", *args, "launcher=debug", f"results_dir={results}")
        assert p.returncode != 0
        assert needle in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_list_is_fast_and_lists_everything():
    p = run_cli("list")
    assert p.returncode == 0
    for name in ("kmeans", "byol", "conr", "scan", "nnm", "digits", "cifar10"):
        assert name in p.stdout


WRITER = r"""
import sys, os
from bench.io import atomic_write_json
path = sys.argv[1]
big = {"history": [{"epoch": i, "loss": i * 0.1, "pad": "x" * 200} for i in range(5000)]}
print("ready", flush=True)
i = 0
while True:
    big["n"] = i
    atomic_write_json(path, big)
    i += 1
"""


def test_killed_while_writing_leaves_no_partial_record(tmp_path):
    path = tmp_path / "record.json"
    for delay in (0.05, 0.13, 0.21, 0.37, 0.52):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if path.exists():
            data = json.loads(path.read_text())  # never half-written
            assert len(data["history"]) == 5000
    leftovers = [p for p in tmp_path.iterdir() if p.name != "record.json"]
    # temporary files of killed writers may remain (never under the final name); they are hidden dot-files
    assert all(p.name.startswith(".record.json.") for p in leftovers)
