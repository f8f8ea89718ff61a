"""Sweeps on a real one-node SLURM cluster (scripts/slurm_cluster.sh): job arrays, requeue on timeout,
failures, cancel, relaunch.

The cluster is the one SLURM_CONF points at, else the script's (started here, without installing
packages, when it is not running; taken down again afterwards if no other test session uses it).
Without one every test is skipped, saying why.  Jobs ask for 1 CPU, 1 GB and no GPU so they fit the node.

The slow job (a BYOL run given a one-minute limit, so it is warned, requeues itself and resumes) is
submitted first and checked last, so it overlaps the other tests.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from bench import launch, store

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
SMALL = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.gpus_per_node=0",
         "train.progress=false", "train.num_threads=1"]
BYOL_SHORT = ["byol.warmup_epochs=1", "train.eval_every=0"]


def _ping(conf: str) -> bool:
    try:
        p = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and "UP" in p.stdout


def _script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _export_line(text: str) -> str | None:
    m = re.search(r"^export SLURM_CONF=(\S+)$", text, re.M)
    return m.group(1) if m else None


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running cluster, exported for this session; skips when there is none."""
    if os.environ.get("BENCH_SLURM", "").lower() in ("0", "off", "no", "false"):
        pytest.skip("SLURM tests disabled by BENCH_SLURM=off")
    started = False
    conf = os.environ.get("SLURM_CONF")
    if not (conf and _ping(conf)):
        conf = None
        try:
            env = _script("env", timeout=60)
            conf = _export_line(env.stdout) if env.returncode == 0 else None
            if conf is None:
                up = _script("up", "--no-install")
                conf = _export_line(up.stdout) if up.returncode == 0 else None
                if conf is None:
                    why = (up.stderr.strip().splitlines() or ["no output"])[-1]
                    pytest.skip(f"no SLURM cluster is up and scripts/slurm_cluster.sh could not start one: {why}")
                started = True
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"no SLURM cluster: running scripts/slurm_cluster.sh failed ({exc})")
        if not _ping(conf):
            pytest.skip(f"SLURM cluster of {conf} does not answer `scontrol ping`")
    # a shared lock says "in use": the session that started the cluster stops it only when nobody else holds one
    lock = open(Path(conf).parent / ".bench-test-users", "a")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_SH)
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", conf)
    for k in launch.job_env_keys():
        mp.delenv(k, raising=False)
    try:
        yield conf
    finally:
        mp.undo()
        if started:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _script("down")
            except OSError:
                pass
        lock.close()


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def bench(capsys):
    """`python -m bench ARGS` in this process (the interpreter start-up and imports are paid once)."""
    from bench.cli import main

    def call(*args: str) -> Result:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)

    return call


def _wait_rows(results: Path, sweep_id: str, done, deadline_s: float, what: str) -> list[dict]:
    m = launch.find_manifest(results, sweep_id)
    t_end = time.time() + deadline_s
    rows: list[dict] = []
    while time.time() < t_end:
        rows = launch.run_states(m)
        if done(rows):
            return rows
        time.sleep(1.0)
    pytest.fail(f"{what} not reached within {deadline_s:.0f} s; last states: "
                + ", ".join(f"{r['job_id']}={r['state']}/{r['job_state']}" for r in rows))


def _sweep_id(stdout: str) -> str:
    m = re.search(r"^sweep (\S+): submitted", stdout, re.M)
    assert m, f"no sweep id in the output:\n{stdout}"
    return m.group(1)


def _no_live_jobs(rows: list[dict]) -> bool:
    return all((r["job_state"] or "") not in launch.ACTIVE_STATES for r in rows)


# ----------------------------------------------------------------------------- the slow job, started first


class RequeueJob:
    """A BYOL run with a one-minute limit and ~50 s of work at this machine's speed, plus an uninterrupted
    reference run of the same config in a subprocess (launcher=debug)."""

    def __init__(self, root: Path):
        self.root = root
        self.tries = 0

    def calibrate(self) -> float:
        from bench.config import compose
        from bench.runner import execute

        cfg = compose(["method=byol", "byol.epochs=1", "byol.warmup_epochs=0", "train.eval_every=0",
                       "train.progress=false", "train.num_threads=1", "eval.kmeans_restarts=1",
                       f"results_dir={self.root / 'calibrate'}"])
        t0 = time.time()
        rec = execute(cfg)
        rows = [h for h in rec.get("history") or [] if h.get("epoch_s")]
        return float(rows[-1]["epoch_s"]) if rows else time.time() - t0

    def submit(self, epochs: int) -> None:
        self.tries += 1
        self.epochs = epochs
        self.results = self.root / f"requeue{self.tries}"
        self.reference = self.root / f"reference{self.tries}"
        common = ["method=byol", f"byol.epochs={epochs}", *BYOL_SHORT, "train.progress=false", "train.num_threads=1"]
        p = run_cli("sweep", "methods=[byol]", "seeds=[0]", *SMALL, "launcher.timeout_min=1",
                    "launcher.max_num_timeout=10", f"byol.epochs={epochs}", *BYOL_SHORT,
                    f"results_dir={self.results}")
        assert p.returncode == 0, p.stdout + p.stderr
        self.sweep_id = _sweep_id(p.stdout)
        self.submitted = time.time()
        self.ref_proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "run", *common, "launcher=debug", f"results_dir={self.reference}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        if getattr(self, "ref_proc", None) is not None and self.ref_proc.poll() is None:
            self.ref_proc.kill()
            self.ref_proc.wait()


@pytest.fixture(scope="module")
def requeue_job(slurm_cluster, tmp_path_factory):
    job = RequeueJob(tmp_path_factory.mktemp("requeue"))
    epoch_s = job.calibrate()
    job.submit(max(8, math.ceil(50.0 / max(epoch_s, 0.05))))
    yield job
    job.close()
    m = launch.load_manifests(job.results)
    if m and launch.run_states(m[-1])[0]["state"] not in ("completed", "failed"):
        launch.cancel_sweep(m[-1], job.results, settle_s=5)


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


SWEEP = ["sweep", "methods=[kmeans,byol]", "datasets=[digits]", "seeds=[0,1,2]", *SMALL, "launcher.timeout_min=10",
         "byol.epochs=1", "byol.warmup_epochs=0", "train.eval_every=0", "eval.kmeans_restarts=2"]


# ----------------------------------------------------------------------------- tests


def test_sweep_runs_as_one_array_and_the_table_counts_three_seeds(slurm_cluster, requeue_job, sweep_results, bench):
    p = run_cli(*SWEEP, f"results_dir={sweep_results}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "6 to run" in p.stdout
    sid = _sweep_id(p.stdout)
    m = launch.find_manifest(sweep_results, sid)
    assert len(m["array_job_ids"]) == 1
    array = m["array_job_ids"][0]
    assert sorted(r["job_id"] for r in m["runs"]) == [f"{array}_{i}" for i in range(6)]
    assert {(r["method"], r["seed"]) for r in m["runs"]} == {(a, s) for a in ("kmeans", "byol") for s in (0, 1, 2)}

    rows = _wait_rows(sweep_results, sid, lambda rs: _no_live_jobs(rs) and all(r["state"] in ("completed", "failed")
                                                                               for r in rs), 240,
                      "all six runs finished")
    assert [r["state"] for r in rows] == ["completed"] * 6, rows
    assert [r["job_state"] for r in rows] == ["COMPLETED"] * 6, rows

    t = bench("table", f"results_dir={sweep_results}", "dataset=digits")
    assert t.returncode == 0, t.stderr
    body = [line for line in t.stdout.splitlines() if line.startswith("|") and "(3)" in line]
    assert len(body) == 2, f"expected two method rows with n=3:\n{t.stdout}"
    assert all(line.count("(3)") == 3 for line in body), t.stdout

    st = bench("status", f"results_dir={sweep_results}", f"sweep={sid}")
    assert st.returncode == 0 and "6 run(s): 6 completed" in st.stdout, st.stdout + st.stderr


def test_relaunching_a_completed_sweep_submits_nothing(slurm_cluster, sweep_results, bench):
    before = sorted((sweep_results / "sweeps").glob("*.json"))
    assert before, "needs the sweep of the previous test"
    p = bench(*SWEEP, f"results_dir={sweep_results}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "6 already completed" in p.stdout and "nothing to submit" in p.stdout
    assert sorted((sweep_results / "sweeps").glob("*.json")) == before


def test_a_job_that_raises_is_failed_with_its_error(slurm_cluster, tmp_path, bench):
    p = bench("sweep", "methods=[kmeans]", "seeds=[0]", *SMALL, "launcher.timeout_min=5",
              "dataset.num_classes=5000", f"results_dir={tmp_path}")
    assert p.returncode == 0, p.stdout + p.stderr
    sid = _sweep_id(p.stdout)
    (row,) = _wait_rows(tmp_path, sid, lambda rs: rs[0]["state"] != "pending" and rs[0]["state"] != "running"
                        and rs[0]["job_state"] not in launch.ACTIVE_STATES, 120, "the job ending")
    assert row["state"] == "failed" and row["job_state"] == "FAILED", row
    assert "num_classes=5000" in row["error"]
    rec = store.read_record(row["run_dir"])
    assert rec["status"] == "failed"
    assert rec["error"]["type"] == "DatasetError" and "num_classes=5000" in rec["error"]["message"]
    assert row["job_id"] in launch._record_job_ids(rec)
    st = bench("status", f"results_dir={tmp_path}")
    assert "1 run(s): 1 failed" in st.stdout and "num_classes=5000" in st.stdout, st.stdout


def test_cancel_stops_a_running_sweep(slurm_cluster, tmp_path, bench):
    p = bench("sweep", "methods=[byol]", "seeds=[0,1]", *SMALL, "launcher.timeout_min=30", "byol.epochs=500",
                *BYOL_SHORT, f"results_dir={tmp_path}")
    assert p.returncode == 0, p.stdout + p.stderr
    sid = _sweep_id(p.stdout)
    rows = _wait_rows(tmp_path, sid, lambda rs: any(r["record_status"] == "running" and r["job_state"] == "RUNNING"
                                                    for r in rs), 120, "a run of the sweep running")
    started = [r for r in rows if r["record_status"] == "running"]

    c = bench("cancel", f"results_dir={tmp_path}", f"sweep={sid}")
    assert c.returncode == 0, c.stdout + c.stderr
    assert re.search(r"cancelled [12] job\(s\)", c.stdout), c.stdout

    m = launch.find_manifest(tmp_path, sid)
    assert m["cancelled"]
    rows = launch.run_states(m)
    assert _no_live_jobs(rows), rows
    assert all(r["state"] == "cancelled" for r in rows), rows
    q = subprocess.run(["squeue", "-h", "-j", m["array_job_ids"][0]], capture_output=True, text=True)
    assert q.stdout.strip() == "", q.stdout
    for r in started:
        rec = store.read_record(r["run_dir"])
        assert rec["status"] == "failed" and rec["error"]["type"] == "Cancelled"


def test_a_job_past_its_time_limit_requeues_resumes_and_matches_an_uninterrupted_run(requeue_job):
    job = requeue_job
    while True:
        rows = _wait_rows(job.results, job.sweep_id,
                          lambda rs: _no_live_jobs(rs) and rs[0]["state"] in ("completed", "failed"), 420,
                          f"the time-limited run ({job.epochs} epochs) finishing")
        row = rows[0]
        assert row["state"] == "completed", f"the requeued run ended {row['state']}: {row['error']}"
        if row["requeues"] or job.tries >= 2:
            break
        # it finished inside its first minute (a faster machine than calibrated): twice the work
        job.close()
        job.submit(job.epochs * 2)
    rec = store.read_record(row["run_dir"])
    assert rec["requeues"] >= 1, f"{job.epochs} epochs finished within the one-minute limit: nothing was requeued"
    assert rec["attempts"] >= 2
    log_text = (Path(row["run_dir"]) / "log.txt").read_text()
    assert "resumed from" in log_text, "the requeued job started again from scratch"
    assert row["job_state"] == "COMPLETED"

    assert job.ref_proc.wait(timeout=300) == 0, job.ref_proc.stderr.read()[-2000:]
    (ref_path,) = list((job.reference / "runs" / "byol" / "digits").glob("*/record.json"))
    ref = json.loads(ref_path.read_text())
    assert ref["config_hash"] == rec["config_hash"] and ref["requeues"] == 0
    assert rec["metrics"] == ref["metrics"]
    assert len(rec["history"]) == len(ref["history"]) == job.epochs
