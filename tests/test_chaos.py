"""Fault injection: kill -9 at many points, stop signals, damaged files, a full disk, concurrent writers.

Runs are forked from a helper process that has already imported torch and the
harness (a "zygote"), so a killed attempt costs its training time, not an
interpreter start.  Each test counts the faults it injected, the runs they hit,
how many of those runs ended with the expected record, and how many records were
lost or wrong; with CHAOS_REPORT=<file> the counts are appended to that file as
JSON lines (`make chaos` prints their sum with scripts/chaos_report.py).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from bench import store
from bench.errors import BenchError, CheckpointError
from bench.io import WriteError, atomic_write_json
from methods.engine import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.chaos

TINY = ["method=byol", "dataset=digits", "byol.epochs=6", "byol.warmup_epochs=1", "byol.width=4", "byol.input_size=8",
        "byol.proj_hidden=32", "byol.pred_hidden=32", "byol.proj_dim=16", "byol.batch_size=256",
        "train.eval_every=2", "train.num_threads=1", "train.progress=false", "launcher=debug"]
STEPS_PER_EPOCH = 1797 // 256
DEADLINE_S = 240  # one attempt; generous, since the machine may be shared
CHAOS_SEED = 20241204


# --------------------------------------------------------------------------------------------------------------
# the zygote: a process with everything imported that forks one child per attempt

ZYGOTE = r"""
import contextlib, errno, json, os, signal, sys, traceback
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch
torch.set_num_threads(1)
import faiss, numpy, pandas, sklearn.metrics, submitit, tabulate, torchvision, yaml
import bench.augment, bench.cli, bench.cluster, bench.config, bench.data, bench.data.digits, bench.env, bench.io
import bench.launch, bench.metrics, bench.runner, bench.store, bench.table
import methods.byol, methods.engine, methods.kmeans, methods.nets
bench.env.git_commit()  # once, so every attempt's record names the same commit


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def install(f):
    if f.get("prev_handler"):
        marker = f["prev_handler"]

        def requeue(signum, frame):  # what submitit does on its signal: requeue the job, then exit
            stage = [p for p in os.listdir(f["stage_root"])] if os.path.isdir(f["stage_root"]) else []
            partial = any(os.path.exists(os.path.join(f["stage_root"], s, "partial.pt")) for s in stage)
            with open(marker, "w") as fh:
                json.dump({"signal": signum, "partial_saved_before": partial}, fh)
            sys.exit(-1)

        signal.signal(signal.SIGUSR2, requeue)
    kind = f.get("kind")
    if kind in ("step", "arm"):
        orig = methods.engine.Trainer.set_lr
        count = [0]

        def set_lr(self):
            count[0] += 1
            if count[0] == f["n"]:
                if kind == "arm":
                    with open(f["marker"], "w") as fh:
                        fh.write("armed")
                else:
                    os.kill(os.getpid(), getattr(signal, f.get("signal", "SIGKILL")))
            return orig(self)

        methods.engine.Trainer.set_lr = set_lr
    elif kind in ("write", "enospc"):
        orig_path = bench.io.atomic_path
        count = [0]

        def status_of(tmp):
            try:
                return json.loads(open(tmp).read()).get("status")
            except Exception:
                return None

        @contextlib.contextmanager
        def atomic_path(path):
            hit = False
            with orig_path(path) as tmp:
                yield tmp
                if os.path.basename(str(path)) == f["name"] and ("status" not in f or status_of(tmp) == f["status"]):
                    count[0] += 1
                    hit = count[0] == f["n"]
                if hit and kind == "enospc":
                    with open(tmp, "r+b") as fh:
                        fh.truncate(os.path.getsize(tmp) // 2)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if hit and f["phase"] == "mid":
                    with open(tmp, "r+b") as fh:
                        fh.truncate(os.path.getsize(tmp) // 2)
                    kill_self()
                if hit and f["phase"] == "before_rename":
                    kill_self()
            if hit and f["phase"] == "after_rename":
                kill_self()

        bench.io.atomic_path = atomic_path


def child(req):
    rc = 3
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        install(req.get("fault") or {})
        rc = bench.cli.main(req["args"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 3
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc & 0xFF)


out = sys.stdout
out.write("ready\n")
out.flush()
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(req)
        out.write(json.dumps({"pid": pid}) + "\n")
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
    out.flush()
"""


class Zygote:
    def __init__(self, workdir: Path):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
        self.err = open(workdir / "zygote.err", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        assert self._read(DEADLINE_S) == "ready", (workdir / "zygote.err").read_text()[-3000:]

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the zygote within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return line.strip()

    def spawn(self, args: list[str], log: Path, fault: dict | None = None) -> int:
        self.proc.stdin.write(json.dumps({"op": "spawn", "args": args, "log": str(log), "fault": fault}) + "\n")
        return int(json.loads(self._read(60))["pid"])

    def wait(self, pid: int, timeout: float = DEADLINE_S) -> int:
        self.proc.stdin.write(json.dumps({"op": "wait", "pid": pid}) + "\n")
        try:
            return int(json.loads(self._read(timeout))["rc"])
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise

    def run(self, args: list[str], log: Path, fault: dict | None = None) -> int:
        return self.wait(self.spawn(args, log, fault))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


# --------------------------------------------------------------------------------------------------------------
# the counts


@pytest.fixture
def tally(request):
    counts = {"test": request.node.name, "faults": 0, "runs": 0, "survived": 0, "lost_or_wrong": 0}
    yield counts
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(counts) + "\n")


# --------------------------------------------------------------------------------------------------------------
# what a run leaves on disk


def run_args(results: Path, *extra: str) -> list[str]:
    return ["run", *TINY, f"results_dir={results}", *extra]


def run_folder(results: Path) -> Path | None:
    found = list(results.glob("runs/byol/digits/*"))
    return found[0] if found else None


def stage_folder(results: Path) -> Path | None:
    found = list(results.glob("cache/byol/digits/*"))
    return found[0] if found else None


def normal(rec: dict, results: Path) -> dict:
    """The record without what differs between two runs of one config: timing, attempts, paths, speed."""
    r = copy.deepcopy(rec)
    for key in ("timing", "attempts", "_path"):
        r.pop(key, None)
    r["env"].pop("git_commit", None)
    r["config"].pop("results_dir", None)
    r["artifacts"] = {k: str(v).replace(str(results), "<results>") for k, v in (r.get("artifacts") or {}).items()}
    for row in r.get("history") or []:
        row.pop("images_per_s", None)
        row.pop("epoch_s", None)
    return r


def snapshot(results: Path) -> dict:
    folder = run_folder(results)
    rec = json.loads((folder / "record.json").read_text())
    with np.load(folder / "predictions.npz") as z:
        arrays = {k: z[k] for k in z.files}
    ckpt = load_checkpoint(stage_folder(results) / "last.pt")
    return {"record": normal(rec, results), "raw": rec, "arrays": arrays, "weights": ckpt["models"]["net"]}


def differences(got: dict, ref: dict) -> list[str]:
    out = []
    if got["record"] != ref["record"]:
        keys = sorted(set(got["record"]) | set(ref["record"]))
        out += [f"record field {k!r} differs" for k in keys if got["record"].get(k) != ref["record"].get(k)]
    if set(got["arrays"]) != set(ref["arrays"]) or any(
            not np.array_equal(got["arrays"][k], ref["arrays"][k]) for k in ref["arrays"]):
        out.append("predictions differ")
    if set(got["weights"]) != set(ref["weights"]) or any(
            not torch.equal(got["weights"][k], ref["weights"][k]) for k in ref["weights"]):
        out.append("final weights differ")
    return out


def damaged_files(results: Path) -> list[str]:
    """Every published file of the run and its stage must read whole; names the ones that do not."""
    bad = []
    for folder in (run_folder(results), stage_folder(results)):
        if folder is None:
            continue
        for p in sorted(folder.iterdir()):
            if p.name.endswith(".tmp") or p.name == ".lock":
                continue  # unpublished temporary files of a killed writer are never read
            try:
                if p.name == "record.json":
                    rec = json.loads(p.read_text())
                    assert isinstance(rec, dict) and rec["status"] in store.STATUSES and rec["run_id"]
                elif p.suffix == ".yaml":
                    assert isinstance(yaml.safe_load(p.read_text()), dict)
                elif p.suffix == ".npz":
                    with np.load(p) as z:
                        assert "labels_pred" in z.files and len(z["labels_pred"]) == 1797
                elif p.suffix == ".pt":
                    load_checkpoint(p, expect={"stage": "byol"})
                elif p.name == "log.txt":
                    assert p.read_text().endswith("\n")
                else:
                    raise AssertionError("unexpected file")
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{p}: {type(exc).__name__} {exc}")
    return bad


def leftovers(results: Path) -> list[Path]:
    return [p for f in (run_folder(results), stage_folder(results)) if f for p in f.glob("*.tmp")]


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    results = tmp_path_factory.mktemp("reference")
    rc = zygote.run(run_args(results), results / "attempt.log")
    assert rc == 0, (results / "attempt.log").read_text()[-3000:]
    snap = snapshot(results)
    assert snap["raw"]["status"] == "completed" and snap["raw"]["attempts"] == 1
    return snap


def wait_for(predicate, what: str, timeout: float = DEADLINE_S, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if pid is not None and not _alive(pid):
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------------------
# kill -9 at many points of one run, then the same command once more


def kill_plan(rng: random.Random) -> list[dict]:
    """Faults in the order they hit one run; counts are per attempt (each attempt resumes the previous)."""
    return [
        {"kind": "step", "n": rng.randint(2, STEPS_PER_EPOCH - 1)},  # in epoch 1, nothing saved yet
        {"kind": "arm", "n": rng.randint(1, 4), "delay": rng.uniform(0.0, 0.15)},  # from outside, soon after
        {"kind": "write", "name": "config.yaml", "n": 1, "phase": "mid"},
        {"kind": "write", "name": "last.pt", "n": 1, "phase": "mid"},
        {"kind": "write", "name": "last.pt", "n": 1, "phase": "after_rename"},
        {"kind": "step", "n": rng.randint(1, STEPS_PER_EPOCH)},
        {"kind": "write", "name": "record.json", "n": 2, "phase": "mid"},  # the record with one more epoch
        {"kind": "arm", "n": rng.randint(1, 4), "delay": rng.uniform(0.0, 0.15)},
        {"kind": "write", "name": "last.pt", "n": 1, "phase": "before_rename"},
        {"kind": "write", "name": "record.json", "n": 2, "phase": "before_rename"},
        {"kind": "step", "n": rng.randint(1, STEPS_PER_EPOCH - 1)},
        {"kind": "write", "name": "predictions.npz", "n": 1, "phase": "mid"},
        {"kind": "write", "name": "record.json", "status": "completed", "n": 1, "phase": "mid"},
        {"kind": "write", "name": "record.json", "status": "completed", "n": 1, "phase": "after_rename"},
    ]


def test_kill_minus_9_anywhere_then_rerun_gives_the_uninterrupted_record(zygote, reference, tmp_path, tally):
    results = tmp_path / "results"
    args = run_args(results)
    plan = kill_plan(random.Random(CHAOS_SEED))
    problems: list[str] = []
    attempts_seen = 0
    tally["runs"] = 1
    for i, fault in enumerate(plan):
        log = tmp_path / f"attempt{i}.log"
        if fault["kind"] == "arm":
            marker = tmp_path / f"armed{i}"
            pid = zygote.spawn(args, log, {**fault, "marker": str(marker)})
            wait_for(marker.exists, f"step {fault['n']} of attempt {i}", pid=pid)
            time.sleep(fault["delay"])
            os.kill(pid, signal.SIGKILL)
            rc = zygote.wait(pid)
        else:
            rc = zygote.run(args, log, fault)
        assert rc == -signal.SIGKILL, f"fault {fault} did not fire (exit {rc}):\n{log.read_text()[-3000:]}"
        tally["faults"] += 1
        bad = damaged_files(results)
        problems += [f"after fault {i} {fault}: {b}" for b in bad]
        folder = run_folder(results)
        if folder is not None and (folder / "record.json").exists():
            rec = json.loads((folder / "record.json").read_text())
            if rec["attempts"] < attempts_seen:
                problems.append(f"after fault {i}: the record went back from attempt {attempts_seen} to {rec['attempts']}")
            attempts_seen = rec["attempts"]
    rc = zygote.run(args, tmp_path / "final.log")
    assert rc == 0, (tmp_path / "final.log").read_text()[-3000:]
    final = snapshot(results)
    diff = differences(final, reference)
    problems += diff
    problems += [f"left behind: {p}" for p in leftovers(results)]
    if final["raw"]["attempts"] != attempts_seen:
        problems.append(f"attempts {final['raw']['attempts']}, expected {attempts_seen}")
    tally["survived"] = int(not diff and final["raw"]["status"] == "completed")
    tally["lost_or_wrong"] = int(bool(problems))
    assert not problems, "\n".join(problems)
    logs = "".join((tmp_path / f"attempt{i}.log").read_text() for i in range(len(plan)))
    assert "resumed from" in logs


# --------------------------------------------------------------------------------------------------------------
# SIGUSR1 / SIGTERM / submitit's signal: checkpoint, stop, resume


def _stopped_cleanly(results: Path, signame: str, problems: list[str]) -> dict:
    rec = json.loads((run_folder(results) / "record.json").read_text())
    err = rec.get("error") or {}
    if rec["status"] != "failed" or err.get("type") != "Preempted" or err.get("signal") != signame:
        problems.append(f"record after {signame}: status {rec['status']}, error {err}")
    problems += damaged_files(results)
    return rec


def test_sigusr1_mid_epoch_saves_a_partial_checkpoint_and_the_rerun_continues_from_it(
        zygote, reference, tmp_path, tally):
    results = tmp_path / "results"
    n = random.Random(CHAOS_SEED + 1).randint(2 * STEPS_PER_EPOCH + 2, 3 * STEPS_PER_EPOCH - 1)
    rc = zygote.run(run_args(results), tmp_path / "a.log", {"kind": "step", "n": n, "signal": "SIGUSR1"})
    tally["faults"], tally["runs"] = 1, 1
    assert rc == 128 + signal.SIGUSR1, (tmp_path / "a.log").read_text()[-3000:]
    problems: list[str] = []
    rec = _stopped_cleanly(results, "SIGUSR1", problems)
    part = load_checkpoint(stage_folder(results) / "partial.pt", expect={"stage": "byol"})
    assert part["epoch"] == 2 and part["partial"]["epoch"] == 3 and part["partial"]["batch"] == n - 2 * STEPS_PER_EPOCH
    assert "partial.pt" in rec["error"]["message"] and len(rec["history"]) == 2
    shutil.copytree(results, tmp_path / "damaged")  # for the next test: the same state, partial.pt spoilt
    rc = zygote.run(run_args(results), tmp_path / "b.log")
    assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert f"after {n - 2 * STEPS_PER_EPOCH} batches" in (tmp_path / "b.log").read_text()
    final = snapshot(results)
    problems += differences(final, reference)
    problems += [f"left behind: {p}" for p in leftovers(results)]
    assert not (stage_folder(results) / "partial.pt").exists()
    tally["survived"] = int(not problems)
    tally["lost_or_wrong"] = int(bool(problems))
    assert not problems, "\n".join(problems)

    # the same stop, but partial.pt is damaged on disk: it is skipped and last.pt (epoch 2) is used
    damaged = tmp_path / "damaged"
    p = stage_folder(damaged) / "partial.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    rc = zygote.run(run_args(damaged), tmp_path / "c.log")
    tally["faults"] += 1
    tally["runs"] += 1
    text = (tmp_path / "c.log").read_text()
    assert rc == 0, text[-3000:]
    assert "ignoring" in text and "partial.pt" in text and "last.pt (epoch 2/6)" in text
    diff = differences(snapshot(damaged), reference)
    tally["survived"] += int(not diff)
    tally["lost_or_wrong"] += int(bool(diff))
    assert not diff, diff


def test_sigterm_from_outside_stops_with_a_checkpoint_and_the_rerun_finishes_the_same(
        zygote, reference, tmp_path, tally):
    results = tmp_path / "results"
    log = tmp_path / "a.log"
    pid = zygote.spawn(run_args(results), log)
    wait_for(lambda: '"epoch": 2,' in (log.read_text() if log.exists() else ""), "epoch 2", pid=pid)
    os.kill(pid, signal.SIGTERM)
    rc = zygote.wait(pid)
    tally["faults"], tally["runs"] = 1, 1
    assert rc == 128 + signal.SIGTERM, log.read_text()[-3000:]
    problems: list[str] = []
    _stopped_cleanly(results, "SIGTERM", problems)
    assert (stage_folder(results) / "last.pt").exists()
    rc = zygote.run(run_args(results), tmp_path / "b.log")
    assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "b.log").read_text()
    final = snapshot(results)
    problems += differences(final, reference)
    if final["raw"]["attempts"] != 2:
        problems.append(f"attempts {final['raw']['attempts']}, expected 2")
    tally["survived"] = int(not problems)
    tally["lost_or_wrong"] = int(bool(problems))
    assert not problems, "\n".join(problems)


def test_submitits_signal_handler_runs_after_the_checkpoint_and_the_requeued_job_resumes(
        zygote, reference, tmp_path, tally):
    """Under submitit the job's own handler (requeue, then exit) runs once the state is on disk."""
    results = tmp_path / "results"
    marker = tmp_path / "requeued.json"
    n = random.Random(CHAOS_SEED + 2).randint(4 * STEPS_PER_EPOCH + 1, 5 * STEPS_PER_EPOCH - 1)
    fault = {"kind": "step", "n": n, "signal": "SIGUSR2", "prev_handler": str(marker),
             "stage_root": str(results / "cache" / "byol" / "digits")}
    rc = zygote.run(run_args(results), tmp_path / "a.log", fault)
    tally["faults"], tally["runs"] = 1, 1
    assert rc == 255, (tmp_path / "a.log").read_text()[-3000:]  # submitit's sys.exit(-1)
    assert json.loads(marker.read_text()) == {"signal": int(signal.SIGUSR2), "partial_saved_before": True}
    problems: list[str] = []
    _stopped_cleanly(results, "SIGUSR2", problems)
    rc = zygote.run(run_args(results), tmp_path / "b.log")
    assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    problems += differences(snapshot(results), reference)
    tally["survived"] = int(not problems)
    tally["lost_or_wrong"] = int(bool(problems))
    assert not problems, "\n".join(problems)


def test_submitit_requeue_resubmits_the_same_config_without_force():
    from bench.launch import RunJob

    job = RunJob({"method": "byol", "seed": 3}, force=True)
    delayed = job.checkpoint()
    assert isinstance(delayed.function, RunJob)
    assert delayed.function.cfg == job.cfg and delayed.function.force is False


def _tiny_trainer(folder: Path, seen: list, stop_at_step: int | None = None):
    """A small model on random data, with hooks like CoNR's and NNM's (state made at the start of each epoch)."""
    from types import SimpleNamespace

    import torch.nn as nn
    from omegaconf import OmegaConf

    from bench.runner import STOP
    from methods.engine import Stage, Trainer

    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    stage = Stage(name="tiny", folder=folder, config_hash="h", modules={"net": net}, optimizer=opt, base_lr=0.1,
                  epochs=4, steps_per_epoch=5, batch_size=4, warmup_epochs=1)
    ctx = SimpleNamespace(cfg=OmegaConf.create({"train": {"eval_every": 0}}), progress=False, seed=0, device="cpu",
                          log=lambda msg: None, log_json=lambda row: None, add_history=lambda row: None)
    gen = torch.Generator().manual_seed(0)
    trainer = Trainer(ctx, stage, gen)
    data = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    state = {}

    def begin(e):
        state["anchor"] = net.weight.detach().clone()  # made from the weights at the start of the epoch
        seen.append((e, float(net.weight.detach().sum())))

    def step(idx, k):
        if stop_at_step is not None and k == stop_at_step:
            STOP.signum = signal.SIGUSR1  # what the handler does when the signal comes during a step
        x = data[idx] + 0.1 * torch.randn(len(idx), 4, generator=gen)
        loss = (net(x) ** 2).mean() + ((net.weight - state["anchor"]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "k": float(k)}

    def end(e):
        stage.extra_state["epochs_seen"] = torch.tensor(e)
        return {}

    return trainer, step, begin, end, net


def test_a_stop_in_the_middle_of_an_epoch_resumes_exactly_even_with_epoch_hooks(tmp_path, tally):
    from bench.runner import STOP, Preempted

    seen_a: list = []
    tr, step, begin, end, net_a = _tiny_trainer(tmp_path / "a", seen_a)
    hist_a = tr.fit(20, step, epoch_begin=begin, epoch_end=end)

    seen_b: list = []
    tr, step, begin, end, _ = _tiny_trainer(tmp_path / "b", seen_b, stop_at_step=7)
    try:
        with pytest.raises(Preempted) as info:
            tr.fit(20, step, epoch_begin=begin, epoch_end=end)
    finally:
        STOP.signum, STOP.note = None, ""
    assert info.value.code == 128 + signal.SIGUSR1 and "partial.pt at epoch 2 after 3 of 5 batches" in str(info.value)
    assert (tmp_path / "b" / "last.pt").exists() and (tmp_path / "b" / "partial.pt").exists()
    tr, step, begin, end, net_b = _tiny_trainer(tmp_path / "b", seen_b)
    assert tr.resume()
    hist_b = tr.fit(20, step, epoch_begin=begin, epoch_end=end)
    tally["faults"] = tally["runs"] = 1
    same = (seen_b == [seen_a[0], seen_a[1], seen_a[1], seen_a[2], seen_a[3]]
            and [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
            and [h["k"] for h in hist_a] == [h["k"] for h in hist_b]
            and torch.equal(net_a.weight, net_b.weight) and torch.equal(net_a.bias, net_b.bias))
    tally["survived"], tally["lost_or_wrong"] = int(same), int(not same)
    assert same, (seen_a, seen_b)
    assert not (tmp_path / "b" / "partial.pt").exists()


# --------------------------------------------------------------------------------------------------------------
# damaged files on disk


def test_damaged_record_is_reported_and_rewritten_from_the_checkpoint(zygote, reference, tmp_path, tally):
    results = tmp_path / "results"
    shutil.copytree(Path(reference["raw"]["artifacts"]["byol_stage"]).parents[3], results)
    rec_path = run_folder(results) / "record.json"
    rec_path.write_bytes(rec_path.read_bytes()[:200] + b"\x00\xff garbage")
    tally["faults"], tally["runs"] = 1, 1
    problems: list[str] = []
    assert store.load_records(results, problems=problems) == [] and len(problems) == 1
    assert str(rec_path) in problems[0] and "not valid JSON" in problems[0]
    with pytest.raises(BenchError, match="record.json"):
        store.read_record(rec_path.parent)
    rc = zygote.run(run_args(results), tmp_path / "b.log")
    text = (tmp_path / "b.log").read_text()
    assert rc == 0, text[-3000:]
    assert "it will be rewritten" in text and "resumed from" in text and "last.pt (epoch 6/6)" in text
    diff = differences(snapshot(results), reference)
    tally["survived"] = int(not diff)
    tally["lost_or_wrong"] = int(bool(diff))
    assert not diff, diff


def test_damaged_checkpoint_is_an_error_naming_the_file_and_is_left_for_inspection(zygote, reference, tmp_path,
                                                                                  tally):
    results = tmp_path / "results"
    shutil.copytree(Path(reference["raw"]["artifacts"]["byol_stage"]).parents[3], results)
    rec_path = run_folder(results) / "record.json"
    rec = json.loads(rec_path.read_text())
    atomic_write_json(rec_path, {**rec, "status": "running"})  # as if it had been killed after the last epoch
    ckpt = stage_folder(results) / "last.pt"
    damaged = ckpt.read_bytes()[:1000]
    ckpt.write_bytes(damaged)
    tally["faults"], tally["runs"] = 1, 1
    log = tmp_path / "b.log"
    rc = zygote.run(run_args(results), log)
    text = log.read_text()
    assert rc == 2, text[-3000:]
    assert f"error: checkpoint {ckpt} cannot be loaded safely" in text and f"Delete {ckpt}" in text
    assert "Traceback" not in text
    assert ckpt.read_bytes() == damaged
    after = json.loads(rec_path.read_text())
    ok = after["status"] == "failed" and str(ckpt) in after["error"]["message"]
    tally["survived"] = int(ok)  # the damage is found and named; nothing else is lost
    tally["lost_or_wrong"] = int(not ok)
    assert ok, after["error"]
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def enospc():
    def raise_enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return raise_enospc


def test_full_disk_while_writing_a_record_keeps_the_previous_one(tmp_path, monkeypatch, enospc, tally):
    folder = tmp_path / "run"
    store.write_record(folder, {"status": "running", "method": "byol", "history": [1, 2]})
    before = (folder / "record.json").read_bytes()
    cases = 0
    for target in ("fsync", "write_bytes", "replace"):
        with monkeypatch.context() as m:
            if target == "fsync":
                m.setattr(os, "fsync", enospc)
            elif target == "replace":
                m.setattr(os, "replace", enospc)
            else:
                def half_then_full(self, data, _orig=Path.write_bytes):
                    _orig(self, data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                m.setattr(Path, "write_bytes", half_then_full)
            with pytest.raises(WriteError) as info:
                store.write_record(folder, {"status": "completed", "method": "byol", "history": [1, 2, 3]})
        cases += 1
        err = info.value
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC
        assert str(folder / "record.json") in str(err) and "disk or quota is full" in str(err)
        assert "previous record.json is kept" in str(err)
        assert (folder / "record.json").read_bytes() == before
        assert [p.name for p in folder.iterdir()] == ["record.json"]
    tally["faults"], tally["runs"], tally["survived"] = cases, 1, 1
    assert json.loads((folder / "record.json").read_text())["history"] == [1, 2]


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, tally):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"ckpt_version": 1, "stage": "byol", "config_hash": "h", "w": torch.arange(4.0)})
    before = path.read_bytes()
    real_save = torch.save

    def full_midway(obj, fh, *a, **k):
        real_save(obj, fh, *a, **k)
        fh.truncate(fh.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_midway)
    with pytest.raises(WriteError, match=r"cannot write .*last\.pt: No space left on device"):
        save_checkpoint(path, {"ckpt_version": 1, "stage": "byol", "config_hash": "h", "w": torch.zeros(4)})
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    tally["faults"], tally["runs"], tally["survived"] = 1, 1, 1


def test_full_disk_during_a_run_fails_clearly_and_the_rerun_resumes(zygote, reference, tmp_path, tally):
    results = tmp_path / "results"
    log = tmp_path / "a.log"
    rc = zygote.run(run_args(results), log, {"kind": "enospc", "name": "last.pt", "n": 3})
    text = log.read_text()
    tally["faults"], tally["runs"] = 1, 1
    assert rc == 2, text[-3000:]
    assert "error: cannot write" in text and "last.pt: No space left on device" in text and "Traceback" not in text
    problems = damaged_files(results)
    rec = json.loads((run_folder(results) / "record.json").read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] == "WriteError"
    assert load_checkpoint(stage_folder(results) / "last.pt")["epoch"] == 2
    rc = zygote.run(run_args(results), tmp_path / "b.log")
    assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    problems += differences(snapshot(results), reference)
    tally["survived"] = int(not problems)
    tally["lost_or_wrong"] = int(bool(problems))
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------------------
# eight writers in one results folder at once

WRITER = r"""
import sys, time
from bench import store
from bench.io import atomic_write_json
root, seed, rounds, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
folder = store.run_dir(root, "kmeans", "digits", store.run_id(seed, "c0ffee"))
rec = {"method": "kmeans", "dataset": "digits", "seed": seed, "status": "running", "history": [],
       "metrics": None, "config_hash": "c0ffee", "pad": "x" * 20000}
while time.time() < go:
    time.sleep(0.001)
for i in range(rounds):
    rec["history"].append({"epoch": i + 1, "loss": 1.0 / (i + 1)})
    store.write_record(folder, rec)
    atomic_write_json(f"{root}/shared.json", {"writer": seed, "round": i, "pad": "y" * 20000})
rec.update(status="completed", metrics={"nmi": 0.5, "acc": 0.5, "ari": 0.5})
store.write_record(folder, rec)
"""


def test_eight_writers_in_one_results_folder_lose_nothing(tmp_path, tally):
    root = tmp_path / "results"
    root.mkdir()
    rounds, writers = 40, 8
    go = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(s), str(rounds), str(go)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for s in range(writers)]
    problems: list[str] = []
    reads = 0
    while any(p.poll() is None for p in procs):
        seen: list[str] = []
        for rec in store.load_records(root, problems=seen):
            if rec["status"] not in ("running", "completed"):
                seen.append(f"{rec['_path']}: status {rec['status']}")
        if (root / "shared.json").exists():
            try:
                json.loads((root / "shared.json").read_text())
            except ValueError as exc:
                seen.append(f"shared.json: {exc}")
        problems += seen
        reads += 1
        time.sleep(0.01)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    recs = store.load_records(root, problems=problems)
    by_seed = {r["seed"]: r for r in recs}
    lost = [s for s in range(writers) if s not in by_seed]
    wrong = [s for s, r in by_seed.items()
             if r["status"] != "completed" or [h["epoch"] for h in r["history"]] != list(range(1, rounds + 1))]
    shared = json.loads((root / "shared.json").read_text())
    tally["faults"], tally["runs"] = writers, writers
    tally["survived"] = writers - len(lost) - len(wrong)
    tally["lost_or_wrong"] = len(lost) + len(wrong) + len(problems)
    assert not problems, problems[:5]
    assert not lost and not wrong, (lost, wrong)
    assert shared["round"] == rounds - 1 and 0 <= shared["writer"] < writers
    assert not list(root.rglob("*.tmp"))
    assert reads > 0


def test_eight_kmeans_runs_at_once_into_one_results_folder(zygote, tmp_path, tally):
    results = tmp_path / "results"
    pids = [zygote.spawn(["run", "method=kmeans", "dataset=digits", f"seed={s}", "eval.kmeans_restarts=1",
                          "train.num_threads=1", "launcher=debug", f"results_dir={results}"],
                         tmp_path / f"s{s}.log") for s in range(8)]
    rcs = [zygote.wait(p) for p in pids]
    assert rcs == [0] * 8, [(tmp_path / f"s{s}.log").read_text()[-2000:] for s in range(8) if rcs[s]]
    problems: list[str] = []
    recs = store.load_records(results, problems=problems)
    good = [r for r in recs if r["status"] == "completed" and 0 <= r["metrics"]["acc"] <= 1
            and (Path(r["_path"]).parent / "predictions.npz").exists()]
    tally["faults"], tally["runs"] = 8, 8
    tally["survived"] = len({r["seed"] for r in good})
    tally["lost_or_wrong"] = 8 - tally["survived"] + len(problems)
    assert not problems and sorted(r["seed"] for r in good) == list(range(8))
    assert not list(results.rglob("*.tmp"))
