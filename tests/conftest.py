import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run `python -m bench ARGS` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (per-image image ops gain nothing from more, and lose on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cifar() -> dict:
    """The cifar10 dataset card."""
    from bench.config import load_card

    return load_card("cifar10")


@pytest.fixture(scope="module")
def digits() -> dict:
    """The digits dataset card."""
    from bench.config import load_card

    return load_card("digits")


@pytest.fixture
def results(tmp_path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    return d


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, saying why, where no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
