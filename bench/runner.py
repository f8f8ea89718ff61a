"""One run: build the dataset, run the method, score its predictions, write the record.

This is what every launcher (debug, local, slurm) ends up calling, in whatever
process the launcher chose.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench import store
from bench.config import config_hash, to_container
from bench.errors import BenchError
from bench.io import atomic_save, atomic_write_text, remove_stale_temps

log = logging.getLogger("bench")


class Diverged(Exception):
    """Raised by training loops when the loss becomes NaN or infinite."""


class Preempted(SystemExit):
    """A stop signal ended the run; what it needs to resume is on disk.  Exit status 128 + the signal."""

    def __init__(self, signum: int, note: str = ""):
        super().__init__(128 + signum)
        self.signum, self.note = signum, note

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}" + (f": {self.note}" if self.note else "")

    def __reduce__(self):
        return (Preempted, (self.signum, self.note))


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGUSR2 while a run executes (what SLURM sends before a time limit or a preemption).

    Inside a training loop (between hold() and release()) a signal only sets `requested`: the loop saves
    its state at the next step and calls stop().  Elsewhere the run stops at once.  stop() first calls
    the handler that was there before (submitit's, which requeues the job), then raises Preempted.
    A second signal while a stop is pending stops at once.
    """

    NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self) -> None:
        self.signum: int | None = None
        self.note = ""
        self.previous: dict[int, Any] = {}
        self.holds = 0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        self.signum, self.note = None, ""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.NAMES:
            sig = getattr(signal, name, None)
            if sig is None or sig in self.previous:
                continue
            prev = signal.getsignal(sig)
            if prev in (signal.SIG_IGN, None):
                continue
            self.previous[sig] = prev
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous.clear()

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds = max(0, self.holds - 1)

    def _handle(self, signum: int, frame: Any) -> None:
        pending = self.requested
        self.signum = signum
        if self.holds and not pending:
            return
        self.stop()

    def stop(self, note: str = "") -> None:
        signum = int(self.signum or signal.SIGTERM)
        if note:
            self.note = note
        prev = self.previous.get(signum)
        if callable(prev):
            prev(signum, None)
        raise Preempted(signum, self.note)


STOP = StopSignals()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu or auto")
    return name


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(n: int) -> int:
    import torch

    if n <= 0:
        n = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def set_deterministic(on: bool) -> None:
    """train.deterministic: torch's deterministic algorithms (where an op has none, a warning, not an error),
    deterministic cuDNN without autotuning, and the cuBLAS workspace setting reproducible GEMMs need (it must
    be set before the first CUDA matrix product, hence here, before the run starts)."""
    import torch

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on


@dataclass
class RunContext:
    """What a method sees of the harness while it runs."""

    cfg: DictConfig
    run_dir: Path
    device: str
    seed: int
    record: dict
    log_file: Path | None = None
    _listeners: list[Callable[[dict], None]] = field(default_factory=list)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.train.progress)

    def log(self, msg: str) -> None:
        log.info(msg)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as fh:
                fh.write(f"{now_iso()} {msg}\n")

    def log_json(self, obj: dict) -> None:
        import json

        self.log(json.dumps(obj, default=float))

    def cache_dir(self, stage: str, keys: list[str]) -> Path:
        """Folder for a stage's artifacts, keyed by the hash of the config nodes it depends on and the seed.

        Runs of different methods whose upstream stages agree share this folder (and its checkpoints).
        """
        h = config_hash(self.cfg, keys=["dataset", *keys])
        path = Path(self.cfg.results_dir) / "cache" / stage / self.cfg.dataset.name / f"s{self.seed}-{h}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def update(self, **fields: Any) -> None:
        """Merge fields into the running record and write it (atomically)."""
        self.record.update(fields)
        store.write_record(self.run_dir, self.record)

    def add_history(self, row: dict) -> None:
        self.record.setdefault("history", []).append(row)
        store.write_record(self.run_dir, self.record)

    def evaluate_features(self, features: np.ndarray, labels_true: np.ndarray, k: int | None = None) -> dict:
        """k-means on features (the harness's evaluation) and its NMI/ACC/ARI."""
        from bench.cluster import kmeans
        from bench.metrics import evaluate

        e = self.cfg.eval
        res = kmeans(features, k or int(self.cfg.dataset.num_classes), restarts=e.kmeans_restarts,
                     iters=e.kmeans_iters, spherical=e.spherical, seed=self.seed)
        return {**evaluate(labels_true, res.labels), "_kmeans": res}


def execute(cfg: DictConfig, *, force: bool = False) -> dict:
    """Run `cfg` to completion (or resume it) and return its record."""
    from bench.data import build_bundle
    from bench.env import environment, slurm_info
    from bench.metrics import evaluate
    from methods import METHODS

    h = config_hash(cfg)
    rid = store.run_id(int(cfg.seed), h, cfg.tag)
    folder = store.run_dir(cfg.results_dir, cfg.method, cfg.dataset.name, rid)
    remove_stale_temps(folder)  # what writers killed in an earlier attempt left behind
    previous = _safe_read(folder)
    if previous and previous.get("status") == "completed" and previous.get("config_hash") == h and not force:
        log.info("already completed: %s (pass force=true to run again)", folder)
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    threads = set_threads(int(cfg.train.num_threads))
    set_deterministic(bool(cfg.train.deterministic))
    device = pick_device(str(cfg.train.device))
    slurm = slurm_info()
    attempts = int(previous.get("attempts", 0)) + 1 if previous else 1
    record: dict = {
        "record_version": store.RECORD_VERSION,
        "run_id": rid,
        "method": cfg.method,
        "dataset": cfg.dataset.name,
        "seed": int(cfg.seed),
        "preset": cfg.preset,
        "tag": cfg.tag,
        "status": "running",
        "protocol": None,
        "metrics": None,
        "history": [],
        "config_hash": h,
        "config": to_container(cfg),
        "env": environment(device),
        "timing": {"started": now_iso(), "finished": None, "wall_s": None},
        "slurm": slurm,
        "requeues": int(slurm.get("restart_count", 0)) if slurm else 0,
        "attempts": attempts,
        "artifacts": {},
        "error": None,
    }
    if previous and previous.get("timing", {}).get("first_started"):
        record["timing"]["first_started"] = previous["timing"]["first_started"]
    else:
        record["timing"]["first_started"] = record["timing"]["started"]
    ctx = RunContext(cfg=cfg, run_dir=folder, device=device, seed=int(cfg.seed), record=record,
                     log_file=folder / "log.txt")
    store.write_record(folder, record)
    t0 = time.time()
    ctx.log(f"run {cfg.method} on {cfg.dataset.name} seed {cfg.seed} -> {folder} (device {device}, {threads} threads)")
    STOP.install()
    try:
        seed_everything(int(cfg.seed))
        data = build_bundle(to_container(cfg.dataset))
        record["protocol"] = data.protocol
        record["n_train"], record["n_eval"] = len(data.train), len(data.eval)
        record["num_classes"] = data.num_classes
        method = METHODS.get(cfg.method)()
        pred = method.run(data, ctx)
        labels = np.asarray(pred.labels, dtype=np.int64)
        if labels.shape != (len(data.eval),):
            raise RuntimeError(f"method {cfg.method!r} returned {labels.shape} labels for {len(data.eval)} evaluation images")
        metrics = evaluate(data.eval.labels, labels)
        stage_metrics = {s: evaluate(data.eval.labels, lab) for s, lab in pred.stage_labels.items()}
        arrays = {"labels_pred": labels, "labels_true": data.eval.labels}
        if pred.probs is not None:
            arrays["probs"] = np.asarray(pred.probs, dtype=np.float32)
        for s, lab in pred.stage_labels.items():
            arrays[f"labels_{s}"] = np.asarray(lab, dtype=np.int64)
        atomic_save(folder / "predictions.npz", lambda p: _savez(p, arrays))
        record["artifacts"]["predictions"] = "predictions.npz"
        record.update(
            status="completed",
            metrics=metrics,
            stage_metrics=stage_metrics or None,
            cluster_sizes=np.bincount(labels, minlength=data.num_classes).tolist(),
            extra=_jsonable(pred.extra),
        )
        ctx.log(f"done: NMI {metrics['nmi']:.4f}  ACC {metrics['acc']:.4f}  ARI {metrics['ari']:.4f}")
    except Diverged as exc:
        record.update(status="diverged", error={"type": "Diverged", "message": str(exc)})
        ctx.log(f"diverged: {exc}")
    except BaseException as exc:
        if STOP.requested and isinstance(exc, (SystemExit, KeyboardInterrupt)):
            name = signal.Signals(STOP.signum).name
            where = STOP.note or "outside a training step, so the last checkpoint stands"
            record.update(status="failed", error={
                "type": "Preempted", "signal": name,
                "message": f"stopped by {name}: {where}; starting the same run again resumes it"})
        elif isinstance(exc, KeyboardInterrupt) or type(exc).__name__ in ("SystemExit",):
            record.update(status="failed", error={"type": type(exc).__name__, "message": "interrupted"})
        else:
            record.update(status="failed", error={"type": type(exc).__name__, "message": str(exc),
                                                  "traceback": traceback.format_exc(limit=20)})
        ctx.log(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        wall = time.time() - t0
        record["timing"].update(finished=now_iso(), wall_s=round(wall, 3))
        record["timing"]["total_wall_s"] = round(wall + float(previous.get("timing", {}).get("total_wall_s") or 0)
                                                 if previous and previous.get("status") != "completed" else wall, 3)
        try:
            store.write_record(folder, record)
        finally:
            STOP.uninstall()
    return record


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _safe_read(folder: Path) -> dict | None:
    try:
        return store.read_record(folder)
    except BenchError as exc:
        log.warning("%s; it will be rewritten by this run", exc)
        return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every SIMD variant it tries
