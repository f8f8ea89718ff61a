"""Launchers and sweeps without a cluster: suites, planning and skipping, manifests, status, cancel, env cleaning."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from bench import launch, store
from bench.errors import BenchError, ConfigError

# ----------------------------------------------------------------------------- suites


def test_paper_suite_is_the_published_grid():
    s = launch.load_suite("paper")
    assert s["methods"] == ["byol", "conr", "scan", "nnm"]
    assert s["datasets"] == ["cifar10", "cifar20", "stl10", "imagenet10", "imagenet_dogs"]
    assert s["seeds"] == [0, 1, 2]
    assert s["preset"] == "paper"
    assert s["launcher"]["gpus_per_node"] >= 1


def test_digits_suite_is_every_method_on_digits():
    from methods import METHODS

    s = launch.load_suite("digits")
    assert s["methods"] == METHODS.names()
    assert s["datasets"] == ["digits"] and s["seeds"] == [0, 1, 2] and s["preset"] == "cpu"
    assert s["launcher"]["gpus_per_node"] == 0
    assert set(launch.list_suites()) >= {"paper", "digits"}


def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown suite 'papr'.*paper.*Did you mean 'paper'"):
        launch.load_suite("papr")


@pytest.mark.parametrize("body, message", [
    ("methods: [kmeans]\ndatasets: [digits]\nseeds: [0]\nepochs: 3\n", r"unknown key\(s\) epochs"),
    ("methods: [kmeans]\ndatasets: [digits]\n", r"missing 'seeds'"),
    ("methods: [nosuch]\ndatasets: [digits]\nseeds: [0]\n", r"unknown method 'nosuch'"),
    ("methods: [kmeans]\ndatasets: [nosuch]\nseeds: [0]\n", r"unknown dataset 'nosuch'"),
    ("methods: [kmeans]\ndatasets: [digits]\nseeds: [0, -1]\n", r"-1 is not an integer >= 0"),
    ("methods: [kmeans]\ndatasets: [digits]\nseeds: [0, 0]\n", r"listed twice"),
    ("methods: [kmeans]\ndatasets: [digits]\nseeds: [0]\noverrides: [seedless]\n", r"not of the form key=value"),
    ("methods: [kmeans]\ndatasets: [digits]\nseeds: [0]\nlauncher: slurm\n", r"launcher must be a mapping"),
    ("methods: [kmeans\n", r"not valid YAML"),
])
def test_bad_suite_files_name_the_file_and_the_problem(tmp_path, body, message):
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        launch.load_suite(str(path))
    assert "mine.yaml" in str(info.value)


# ----------------------------------------------------------------------------- small helpers


def test_split_list_and_options():
    assert launch.split_list("[a, b,c]") == ["a", "b", "c"]
    assert launch.split_list("a") == ["a"]
    opts, rest = launch.pop_options(["methods=[a,b]", "byol.epochs=3", "wait=true"], ("methods", "wait"))
    assert opts == {"methods": "[a,b]", "wait": "true"} and rest == ["byol.epochs=3"]
    assert launch.parse_bool("yes", "x") is True and launch.parse_bool(None, "x", True) is True
    with pytest.raises(ConfigError, match="wait='maybe'"):
        launch.parse_bool("maybe", "wait")


def test_overrides_under_another_methods_node_reach_only_that_method():
    over = ["byol.epochs=3", "eval.kmeans_restarts=2", "kmeans.spherical=true"]
    assert launch.scoped_overrides(over, "kmeans", ["kmeans", "byol"]) == ["eval.kmeans_restarts=2",
                                                                             "kmeans.spherical=true"]
    assert launch.scoped_overrides(over, "byol", ["kmeans", "byol"]) == ["byol.epochs=3", "eval.kmeans_restarts=2"]
    # a misspelt key is not dropped, so composing reports it
    assert launch.scoped_overrides(["byl.epochs=3"], "kmeans", ["kmeans", "byol"]) == ["byl.epochs=3"]


def test_signal_delay_leaves_short_jobs_time_to_work():
    assert launch.signal_delay_s(1) == 6
    assert launch.signal_delay_s(10) == 60
    assert launch.signal_delay_s(1440) == 120


def test_array_ids_expand():
    assert launch._expand_array_id("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert launch._expand_array_id("12_3") == ["12_3"]
    assert launch._expand_array_id("12") == ["12"]


@pytest.mark.parametrize("job_state, record, cancelled, expected", [
    ("COMPLETED", "completed", False, "completed"),
    ("RUNNING", "failed", False, "running"),  # interrupted for a requeue, running again
    ("PENDING", None, False, "pending"),
    ("REQUEUED", "failed", False, "requeued"),
    ("CANCELLED", "running", False, "cancelled"),
    ("", "running", True, "cancelled"),
    ("FAILED", "failed", False, "failed"),
    ("COMPLETED", "failed", False, "failed"),
    ("TIMEOUT", "running", False, "timeout"),
    ("FAILED", None, False, "failed"),
    ("COMPLETED", None, False, "missing"),
    ("", None, False, "missing"),
    ("", "diverged", False, "diverged"),
    ("ENDED", "running", False, "failed"),
])
def test_combined_state(job_state, record, cancelled, expected):
    assert launch.combined_state(job_state, record, cancelled) == expected


def test_a_job_whose_own_record_says_failed_is_failed_while_it_ends():
    assert launch.combined_state("RUNNING", "failed", error_type="DatasetError", written_by_this_job=True) == "failed"
    # an older attempt's failure while the job runs again, or a stop for a requeue: the job's state
    assert launch.combined_state("RUNNING", "failed", error_type="DatasetError") == "running"
    assert launch.combined_state("RUNNING", "failed", error_type="Preempted", written_by_this_job=True) == "running"
    rec = {"slurm": {"job_id": "17", "array_job_id": "12", "array_task_id": "3"}}
    assert launch._record_job_ids(rec) == {"17", "12_3"}
    assert launch._record_job_ids({"slurm": None}) == set()


def test_a_run_stopped_by_cancel_reads_cancelled():
    assert launch.combined_state("ENDED", "failed", False, error_type="Cancelled") == "cancelled"
    assert launch.combined_state("", "failed", False, error_type="RuntimeError") == "failed"


# ----------------------------------------------------------------------------- environment of nested submissions


def test_job_env_keys_inside_a_job():
    env = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "2", "SLURM_CONF": "/x/slurm.conf",
           "SBATCH_PARTITION": "gpu", "SRUN_CPUS_PER_TASK": "2", "SUBMITIT_EXECUTOR": "slurm", "PATH": "/bin",
           "SUBMITIT_PREEMPT_SIGNAL": "USR2"}
    dropped = set(launch.job_env_keys(env))
    assert dropped == {"SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK", "SBATCH_PARTITION",
                       "SRUN_CPUS_PER_TASK", "SUBMITIT_EXECUTOR"}


def test_job_env_keys_outside_a_job_keeps_the_users_sbatch_settings():
    env = {"SBATCH_ACCOUNT": "proj", "SLURM_CONF": "/x", "PATH": "/bin"}
    assert launch.job_env_keys(env) == []


def test_outside_job_env_hides_and_restores(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "98")
    monkeypatch.setenv("SLURM_CONF", "/etc/x.conf")
    with launch.outside_job_env() as saved:
        assert "SLURM_JOB_ID" not in os.environ and "SLURM_ARRAY_JOB_ID" not in os.environ
        assert os.environ["SLURM_CONF"] == "/etc/x.conf"
        assert saved["SLURM_JOB_ID"] == "99"
    assert os.environ["SLURM_JOB_ID"] == "99" and os.environ["SLURM_ARRAY_JOB_ID"] == "98"


# ----------------------------------------------------------------------------- the sbatch script


@pytest.mark.skipif(shutil.which("srun") is None,
                    reason="submitit's SLURM executor needs srun on PATH (scripts/slurm_cluster.sh up installs it)")
def test_slurm_executor_settings_reach_the_sbatch_script(tmp_path):
    from omegaconf import open_dict

    from bench.config import compose

    cfg = compose(["method=kmeans", "launcher.name=slurm", "launcher.partition=gpu", "launcher.account=proj",
                   "launcher.qos=high", "launcher.gpus_per_node=0", "launcher.cpus_per_task=2", "launcher.mem_gb=3",
                   "launcher.timeout_min=30", "launcher.constraint=a100"])
    with open_dict(cfg.launcher.additional):
        cfg.launcher.additional["exclusive"] = True
        cfg.launcher.additional["mail-type"] = "END"
    ex = launch.make_executor(cfg, tmp_path)
    text = ex._executor._make_submission_file_text("python -c pass", "uid")
    for flag in ("--partition=gpu", "--account=proj", "--qos=high", "--cpus-per-task=2", "--mem=3GB",
                 "--time=30", "--constraint=a100", "--signal=USR2@120", "--exclusive", "--mail-type=END"):
        assert flag in text, f"{flag} missing from the sbatch script:\n{text}"
    assert "gpus-per-node" not in text
    assert ex._executor.max_num_timeout == int(cfg.launcher.max_num_timeout)


# ----------------------------------------------------------------------------- sweeps (debug and local launchers)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`python -m bench ARGS` in this process (no interpreter start-up per call)."""
    from bench.cli import main

    def call(*args: str) -> Result:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)

    return call


def _sweep(cli, results: Path, *extra: str) -> Result:
    return cli("sweep", "methods=[kmeans]", "datasets=[digits]", "seeds=[0,1]", "launcher=debug",
               f"results_dir={results}", "eval.kmeans_restarts=1", *extra)


def test_debug_sweep_writes_a_manifest_and_a_relaunch_submits_nothing(cli, results):
    p = _sweep(cli, results)
    assert p.returncode == 0, p.stderr
    manifests = sorted((results / "sweeps").glob("*.json"))
    assert len(manifests) == 1
    assert not list((results / "sweeps").glob(".*"))  # no temporary file left behind
    m = json.loads(manifests[0].read_text())
    assert m["launcher"] == "debug" and m["skipped"] == []
    assert [(r["method"], r["dataset"], r["seed"]) for r in m["runs"]] == [("kmeans", "digits", 0),
                                                                          ("kmeans", "digits", 1)]
    for r in m["runs"]:
        assert r["job_id"] and Path(r["run_dir"]).is_dir()
        assert store.read_record(r["run_dir"])["status"] == "completed"

    again = _sweep(cli, results)
    assert again.returncode == 0, again.stderr
    assert "2 already completed" in again.stdout and "nothing to submit" in again.stdout
    assert len(list((results / "sweeps").glob("*.json"))) == 1

    st = cli("status", f"results_dir={results}")
    assert st.returncode == 0, st.stderr
    assert "2 run(s): 2 completed" in st.stdout


def test_relaunch_reruns_failed_and_missing_runs_only(cli, results):
    from bench.config import compose

    assert _sweep(cli, results).returncode == 0
    plan = launch.plan_sweep(["kmeans"], ["digits"], [0, 1, 2], [f"results_dir={results}", "eval.kmeans_restarts=1"])
    assert [r.skip_reason for r in plan] == ["completed", "completed", None]
    # seed 1 failed last time: it runs again
    rec = store.read_record(plan[1].run_dir)
    rec.update(status="failed", error={"type": "RuntimeError", "message": "boom"})
    store.write_record(plan[1].run_dir, rec)
    plan = launch.plan_sweep(["kmeans"], ["digits"], [0, 1, 2], [f"results_dir={results}", "eval.kmeans_restarts=1"])
    assert [r.skip_reason for r in plan] == ["completed", None, None]
    assert plan[1].previous_status == "failed"
    # another config is another run
    other = launch.plan_sweep(["kmeans"], ["digits"], [0], [f"results_dir={results}", "eval.kmeans_restarts=2"])
    assert other[0].skip_reason is None
    # force reruns completed ones
    forced = launch.plan_sweep(["kmeans"], ["digits"], [0], [f"results_dir={results}", "eval.kmeans_restarts=1"],
                               force=True)
    assert forced[0].skip_reason is None
    assert compose(["method=kmeans", f"results_dir={results}"]).results_dir == str(results)


def test_a_run_still_queued_by_an_earlier_sweep_is_not_submitted_again(results):
    plan = launch.plan_sweep(["kmeans"], ["digits"], [0, 1], [f"results_dir={results}"])
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        launch.write_manifest(results, {"sweep_id": "earlier", "created": "2020-01-01T00:00:00+00:00",
                                        "launcher": "local", "cancelled": None,
                                        "runs": [{**plan[0].entry(), "job_id": str(stand_in.pid)}]})
        launch._mark_active_elsewhere(plan, results)
        assert plan[0].skip_reason == f"already queued as job {stand_in.pid} of sweep earlier"
        assert plan[1].skip_reason is None
    finally:
        stand_in.kill()
        stand_in.wait()
    plan = launch.plan_sweep(["kmeans"], ["digits"], [0], [f"results_dir={results}"])
    launch._mark_active_elsewhere(plan, results)
    assert plan[0].skip_reason is None
    assert not launch._pid_alive(str(os.getpid()))  # alive, but not a submitit job


def test_sweep_checks_every_config_before_running_anything(cli, results):
    p = cli("sweep", "methods=[kmeans]", "seeds=[0]", "launcher=debug", f"results_dir={results}", "eval.nosuch=1")
    assert p.returncode == 2
    assert "nosuch" in p.stderr and "Traceback" not in p.stderr
    assert not (results / "sweeps").exists() and not (results / "runs").exists()
    p = cli("sweep", "method=kmeans", f"results_dir={results}")
    assert p.returncode == 2 and "methods=[...]" in p.stderr
    p = cli("sweep", f"results_dir={results}")
    assert p.returncode == 2 and "no methods" in p.stderr


def test_dry_run_lists_the_plan(cli, results):
    p = cli("sweep", "suite=digits", "methods=[kmeans,byol]", "dry_run=true", f"results_dir={results}")
    assert p.returncode == 0, p.stderr
    assert "2 method(s) x 1 dataset(s) x 3 seed(s) = 6 run(s)" in p.stdout
    assert p.stdout.count("  run  ") == 6
    assert not (results / "sweeps").exists()


def test_failed_run_in_a_debug_sweep_keeps_its_error(cli, results):
    p = cli("sweep", "methods=[kmeans]", "seeds=[0]", "launcher=debug", f"results_dir={results}",
                "dataset.num_classes=5000")
    assert p.returncode == 1
    st = json.loads(cli("status", f"results_dir={results}", "json=true").stdout)
    (row,) = st["runs"]
    assert row["state"] == "failed" and "num_classes=5000" in row["error"]


def test_local_sweep_runs_in_subprocesses_without_the_outer_jobs_environment(cli, results, monkeypatch):
    """Submitted while this process pretends to be SLURM job 4242: the run records no SLURM job."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    p = cli("sweep", "methods=[kmeans]", "seeds=[3]", "launcher=local", f"results_dir={results}",
            "eval.kmeans_restarts=1")
    assert p.returncode == 0, p.stderr
    assert os.environ["SLURM_JOB_ID"] == "4242"
    st = json.loads(cli("status", f"results_dir={results}", "json=true").stdout)
    (row,) = st["runs"]
    assert row["state"] == "completed" and int(row["job_id"]) != os.getpid()
    assert Path(row["stdout"]).exists()
    rec = store.read_record(row["run_dir"])
    assert rec["slurm"] is None and rec["requeues"] == 0


def test_cancel_stops_a_local_sweep(cli, results):
    cmd = [sys.executable, "-m", "bench", "sweep", "methods=[byol]", "seeds=[0]", "launcher=local",
           f"results_dir={results}", "byol.epochs=500", "train.progress=false", "train.num_threads=1"]
    outer = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        row = None
        while time.time() < deadline:
            manifests = list((results / "sweeps").glob("*.json"))
            if manifests:
                rows = launch.run_states(json.loads(manifests[0].read_text()))
                if rows and rows[0]["record_status"] == "running":
                    row = rows[0]
                    break
            time.sleep(0.5)
        assert row is not None, "the local run never started"
        p = cli("cancel", f"results_dir={results}")
        assert p.returncode == 0, p.stderr
        assert "cancelled 1 job(s)" in p.stdout
        assert not launch._pid_alive(row["job_id"])
    finally:
        outer.terminate()
        outer.wait(timeout=30)
    rec = store.read_record(row["run_dir"])
    assert rec["status"] == "failed" and rec["error"]["type"] == "Cancelled"
    st = json.loads(cli("status", f"results_dir={results}", "json=true").stdout)
    assert st["cancelled"] and st["runs"][0]["state"] == "cancelled"


def test_status_and_cancel_without_sweeps_say_so(cli, results):
    for cmd in ("status", "cancel"):
        p = cli(cmd, f"results_dir={results}")
        assert p.returncode == 2 and "no sweeps under" in p.stderr


def test_unknown_sweep_id_lists_recent_ones(cli, results):
    assert _sweep(cli, results).returncode == 0
    with pytest.raises(BenchError, match="matches no sweep.*recent sweeps"):
        launch.find_manifest(results, "nosuch")
    sid = launch.find_manifest(results, None)["sweep_id"]
    assert launch.find_manifest(results, sid[-8:])["sweep_id"] == sid


def test_damaged_manifest_is_skipped_with_a_warning(cli, results, caplog):
    assert _sweep(cli, results).returncode == 0
    (results / "sweeps" / "zzz-broken.json").write_text("{not json")
    assert len(launch.load_manifests(results)) == 1
    assert "zzz-broken.json" in caplog.text


# ----------------------------------------------------------------------------- SLURM states from fake commands


def _fake_command(folder: Path, name: str, output: str, rc: int = 0) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_states_from_sacct_and_squeue(tmp_path, monkeypatch):
    _fake_command(tmp_path, "sacct", "12_0|COMPLETED\n12_1|CANCELLED by 0\n12_[2-3%2]|PENDING\n13|FAILED")
    _fake_command(tmp_path, "squeue", "12_2|RUNNING\n12_3|PENDING")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    states = launch.slurm_states(["12_0", "12_1", "12_2", "12_3", "13", "14_0"])
    assert states == {"12_0": "COMPLETED", "12_1": "CANCELLED", "12_2": "RUNNING", "12_3": "PENDING",
                      "13": "FAILED"}


def test_slurm_sweep_without_sbatch_is_a_clear_error(results, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(BenchError, match="no `sbatch` on PATH"):
        launch.sweep_command(["methods=[kmeans]", "seeds=[0]", "launcher=slurm", f"results_dir={results}"])
    assert not (results / "sweeps").exists()


def test_cluster_script_usage():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_cluster.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and "up [--no-install]" in p.stderr
    p = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_cluster.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
