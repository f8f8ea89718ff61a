"""What the record says about where a run ran."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import lru_cache

from bench.config import PROJECT_ROOT


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str | None = None) -> dict:
    import numpy
    import sklearn

    env = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "numpy": numpy.__version__,
        "sklearn": sklearn.__version__,
    }
    try:
        import torch
        import torchvision

        env["torch"] = torch.__version__
        env["torchvision"] = torchvision.__version__
        env["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        env["threads"] = torch.get_num_threads()
        if device and device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        pass
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    env["device"] = device
    env["nondeterminism"] = (
        "CUDA kernels (cuDNN convolutions, atomics in scatter/index_add) may differ run to run"
        if device and device.startswith("cuda")
        else "none known: CPU runs with the same seed, threads and versions are reproducible"
    )
    return env


def slurm_info() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "restart_count": "SLURM_RESTART_COUNT", "node": "SLURMD_NODENAME", "partition": "SLURM_JOB_PARTITION"}
    return {k: os.environ.get(v) for k, v in keys.items() if os.environ.get(v) is not None}
