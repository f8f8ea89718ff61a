"""The training engine: schedules, checkpoints, exact resume after a kill, divergence."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from bench.errors import CheckpointError
from methods.engine import ema_momentum, load_checkpoint, save_checkpoint, scaled_lr, warmup_cosine

TINY = ["method=byol", "dataset=digits", "byol.epochs=6", "byol.warmup_epochs=1", "byol.width=8",
        "byol.proj_hidden=64", "byol.pred_hidden=64", "byol.proj_dim=32", "byol.batch_size=256",
        "train.eval_every=2", "train.num_threads=1", "train.progress=false", "launcher=debug"]


def test_schedules():
    assert scaled_lr(0.05, 512) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert ema_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_checkpoint_refuses_pickles_and_foreign_configs(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"ckpt_version": 1, "x": object()}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"ckpt_version": 1, "stage": "byol", "config_hash": "aaa", "w": torch.ones(2)})
    assert load_checkpoint(good, expect={"stage": "byol"})["w"].sum() == 2
    with pytest.raises(CheckpointError, match="config_hash is 'aaa', this run expects 'bbb'"):
        load_checkpoint(good, expect={"config_hash": "bbb"})
    with pytest.raises(CheckpointError, match="stage is 'byol'"):
        load_checkpoint(good, expect={"stage": "simclr"})
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(trunc)


def _run(results, wait_for_epoch=None):
    cmd = [sys.executable, "-m", "bench", "run", *TINY, f"results_dir={results}"]
    if wait_for_epoch is None:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        logs = list(results.glob("runs/byol/digits/*/log.txt"))
        if logs and f'"epoch": {wait_for_epoch},' in logs[0].read_text():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def _final(results):
    rec = json.loads(next(results.glob("runs/byol/digits/*/record.json")).read_text())
    ckpt = torch.load(next(results.glob("cache/byol/digits/*/last.pt")), weights_only=True)
    return rec, ckpt


def test_killed_run_resumes_to_the_same_result(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    p = _run(a)
    assert p.returncode == 0, p.stderr
    _run(b, wait_for_epoch=3)
    rec_b_mid = json.loads(next(b.glob("runs/byol/digits/*/record.json")).read_text())
    assert rec_b_mid["status"] == "running"
    p = _run(b)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stderr
    ra, ca = _final(a)
    rb, cb = _final(b)
    assert ra["status"] == rb["status"] == "completed"
    assert ra["metrics"] == rb["metrics"]
    assert rb["attempts"] == 2
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    for k, v in ca["models"]["net"].items():
        assert torch.equal(v, cb["models"]["net"][k]), k
    assert math.isfinite(ra["history"][-1]["loss"])


def test_nan_loss_ends_with_status_diverged(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench", "run", *TINY, "byol.base_lr=1e30", f"results_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    rec = json.loads(next(tmp_path.glob("runs/byol/digits/*/record.json")).read_text())
    assert rec["status"] == "diverged", rec.get("error")
    assert "loss became" in rec["error"]["message"]
    assert p.returncode != 0


def _toy_trainer(tmp_path, sync_every: int, nan_at: int | None = None):
    """A linear model on random data; the step returns its loss as a tensor and records it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from methods.engine import Stage, Trainer

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    stage = Stage(name="toy", folder=tmp_path, config_hash="h", modules={"net": net}, optimizer=opt, base_lr=0.05,
                  epochs=2, steps_per_epoch=5, batch_size=4)
    ctx = SimpleNamespace(cfg=OmegaConf.create({"train": {"eval_every": 0, "sync_every": sync_every}}),
                          progress=False, seed=0, device="cpu", log=lambda msg: None, log_json=lambda row: None,
                          add_history=lambda row: None)
    data = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    seen: list[float] = []

    def step(idx, k):
        loss = (net(data[idx]) ** 2).mean()
        if k == nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
        return {"loss": loss.detach(), "scaled": loss.detach() * 2, "k": k, "note": "ignored"}

    return Trainer(ctx, stage, torch.Generator().manual_seed(0)), step, seen


def test_losses_are_read_on_the_host_once_a_window(tmp_path, monkeypatch):
    import methods.engine as engine

    reads: list[int] = []
    real = engine._host_floats
    monkeypatch.setattr(engine, "_host_floats", lambda values: reads.append(len(values)) or real(values))
    trainer, step, seen = _toy_trainer(tmp_path, sync_every=2)
    trainer.fit(20, step)
    # 5 steps an epoch, windows of 2 steps: reads after steps 2, 4 and the epoch's end; 3 numbers a step
    assert reads == [6, 6, 3] * 2
    for e, row in enumerate(trainer.history):
        losses = seen[5 * e : 5 * e + 5]
        assert row["loss"] == pytest.approx(sum(losses) / 5, rel=1e-12)
        assert row["scaled"] == pytest.approx(2 * sum(losses) / 5, rel=1e-6)
        assert row["k"] == pytest.approx(sum(range(5 * e, 5 * e + 5)) / 5)
        assert "note" not in row


def test_a_nan_inside_a_window_names_its_step(tmp_path):
    from bench.runner import Diverged

    trainer, step, _ = _toy_trainer(tmp_path, sync_every=25, nan_at=7)
    with pytest.raises(Diverged, match=r"loss became nan at epoch 2, step 7"):
        trainer.fit(20, step)
    assert [row["epoch"] for row in trainer.history] == [1]  # epoch 2 was neither recorded nor saved
    assert torch.load(trainer.last_path(), weights_only=True)["epoch"] == 1


def test_train_deterministic_switches_torch_to_deterministic_algorithms(tmp_path, monkeypatch):
    from bench.config import compose
    from bench.runner import execute, set_deterministic

    seen = []
    import methods.kmeans

    real = methods.kmeans.KMeansMethod.run

    def spy(self, data, ctx):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return real(self, data, ctx)

    monkeypatch.setattr(methods.kmeans.KMeansMethod, "run", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        for flag in (True, False):
            execute(compose(["method=kmeans", f"train.deterministic={str(flag).lower()}", "eval.kmeans_restarts=1",
                             f"results_dir={tmp_path / str(flag)}"]))
        assert seen == [(True, True), (False, False)]
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_deterministic(False)
