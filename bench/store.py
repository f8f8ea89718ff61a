"""The result store: results/runs/<method>/<dataset>/<run_id>/{record.json, config.yaml, predictions.npz, log.txt}.

A run's id is `s<seed>-<config hash>` (with the tag in front when set), so the
same command always finds the same folder: that is how a restarted run resumes
and how a relaunched sweep knows what is already done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from bench.errors import BenchError
from bench.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

STATUSES = ("completed", "failed", "diverged", "running", "pending")
RECORD_VERSION = 1


def run_id(seed: int, cfg_hash: str, tag: str = "") -> str:
    return f"{tag + '-' if tag else ''}s{seed}-{cfg_hash}"


def run_dir(results_dir: str | os.PathLike, method: str, dataset: str, rid: str) -> Path:
    return Path(results_dir) / "runs" / method / dataset / rid


def write_record(folder: str | os.PathLike, record: dict) -> Path:
    path = Path(folder) / "record.json"
    atomic_write_json(path, record)
    return path


def read_record(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / "record.json"
    if not path.exists():
        return None
    return read_json(path)


def iter_record_paths(results_dir: str | os.PathLike) -> Iterator[Path]:
    root = Path(results_dir) / "runs"
    if root.exists():
        yield from sorted(root.glob("*/*/*/record.json"))


def load_records(results_dir: str | os.PathLike, *, problems: list[str] | None = None) -> list[dict]:
    """Every readable record under results_dir; unreadable ones are reported in `problems`, never dropped silently."""
    out = []
    for path in iter_record_paths(results_dir):
        try:
            rec = read_json(path)
            if not isinstance(rec, dict) or "status" not in rec or "method" not in rec:
                raise BenchError(f"{path}: not a run record (no status/method field)")
            rec["_path"] = str(path)
            out.append(rec)
        except (BenchError, OSError) as exc:
            msg = str(exc)
            log.warning("skipping unreadable record: %s", msg)
            if problems is not None:
                problems.append(msg)
    return out
