"""Bad input, through `python -m bench run`: a one-line error naming the key, value or file, exit status 2,
and nothing half-done left behind (no checkpoint, cache, predictions or temporary file; at most a whole
record that says the run failed and why)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bench.cli import main
from bench.config import CARDS_DIR, compose, config_hash, to_container
from bench.errors import ConfigError

SMALL = ["method=byol", "dataset=digits", "byol.epochs=2", "byol.warmup_epochs=1", "byol.width=4",
         "byol.input_size=8", "byol.proj_hidden=32", "byol.pred_hidden=32", "byol.proj_dim=16",
         "byol.batch_size=256", "train.eval_every=0", "train.num_threads=1", "train.progress=false"]


def run(capsys, results: Path, *args: str) -> tuple[int, str]:
    rc = main(["run", "launcher=debug", *args, f"results_dir={results}"])
    err = capsys.readouterr().err
    return rc, err


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_failed_cleanly(results: Path, rc: int, err: str, needle: str, error_type: str) -> dict:
    """Exit 2, the message on one line, one whole record saying failed, and nothing else of the run."""
    assert rc == 2, err
    assert needle in err, err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert needle in line
    recs = list(results.glob("runs/*/*/*/record.json"))
    assert len(recs) == 1, files(results)
    rec = json.loads(recs[0].read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] == error_type and needle in rec["error"]["message"]
    assert sorted(p.name for p in recs[0].parent.iterdir()) == ["config.yaml", "log.txt", "record.json"]
    assert not list(results.rglob("*.tmp")) and not list(results.rglob("*.pt")) and not list(results.rglob("*.npz"))
    return rec


# --------------------------------------------------------------------------------------------------------------
# config values


@pytest.mark.parametrize("args, needle", [
    (["byol.epochs=ten"], "bad value for 'byol.epochs': 'ten'"),
    (["byol.epochs=-3"], "byol.epochs must be >= 1, got -3"),
    (["byol.epochs=0"], "byol.epochs must be >= 1, got 0"),
    (["byol.base_lr=fast"], "bad value for 'byol.base_lr': 'fast'"),
    (["byol.base_lr=-0.1"], "byol.base_lr must be > 0"),
    (["byol.batch_size=1"], "byol.batch_size must be >= 2, got 1"),
    (["byol.warmup_epochs=5"], "byol.warmup_epochs must be between 0 and byol.epochs"),
    (["train.eval_every=1.5"], "bad value for 'train.eval_every': '1.5'"),
    (["train.progress=maybe"], "bad value for 'train.progress': 'maybe'"),
    (["seed=-1"], "seed must be >= 0, got -1"),
    (["seed=abc"], "bad value for 'seed': 'abc'"),
    (["eval.kmeans_restarts=0"], "eval.kmeans_restarts and eval.kmeans_iters must be >= 1"),
    (["dataset.image_size=-4"], "dataset.image_size must be >= 1"),
    (["dataset.num_classes=1"], "dataset.num_classes must be at least 2, got 1"),
    (["launcher=nowhere"], "launcher.name must be debug, local or slurm, got 'nowhere'"),
    (["byol.epoch=3"], "unknown config key 'byol.epoch'"),
])
def test_config_values_of_the_wrong_type_or_out_of_range(capsys, tmp_path, args, needle):
    results = tmp_path / "results"
    rc, err = run(capsys, results, *SMALL, *args)
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert not results.exists()  # refused before anything was written


def test_batch_larger_than_the_dataset(capsys, tmp_path):
    results = tmp_path / "results"
    rc, err = run(capsys, results, *SMALL, "byol.batch_size=4096")
    assert_failed_cleanly(results, rc, err, "byol.batch_size=4096 is larger than the 1797 training images",
                          "ConfigError")
    assert not (results / "cache").exists()


def test_more_clusters_than_images(capsys, tmp_path):
    results = tmp_path / "results"
    rc, err = run(capsys, results, "method=kmeans", "dataset=digits", "dataset.num_classes=5000",
                  "train.num_threads=1")
    assert_failed_cleanly(results, rc, err, "the card says num_classes=5000", "DatasetError")

    from bench.cluster import kmeans

    with pytest.raises(ValueError, match="K=5 clusters for 3 points"):
        kmeans(np.zeros((3, 2), dtype=np.float32), 5)

    from types import SimpleNamespace

    from bench.data.base import DataBundle, Split
    from methods.kmeans import KMeansMethod

    cfg = compose(["method=kmeans", "dataset=digits"])
    split = Split(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), np.array([0, 1, 2]))
    card = {"name": "tiny", "num_classes": 5, "image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}
    bundle = DataBundle("tiny", card, [str(i) for i in range(5)], split, split, {"name": "transductive"})
    ctx = SimpleNamespace(cfg=cfg, seed=0, log=lambda msg: None)
    with pytest.raises(ConfigError, match="K=5 clusters but only 3 images to cluster"):
        KMeansMethod().run(bundle, ctx)


# --------------------------------------------------------------------------------------------------------------
# image folders


def folder_args(path: Path, root: Path, *extra: str) -> list[str]:
    return ["method=kmeans", "dataset=folder", f"dataset.path={path}", f"dataset.root={root}", "dataset.image_size=8",
            "eval.kmeans_restarts=1", "train.num_threads=1", *extra]


def mixed_folder(base: Path) -> Path:
    """Two classes of images of every common size and mode."""
    (base / "ants").mkdir(parents=True)
    (base / "bees" / "deeper").mkdir(parents=True)
    Image.new("L", (13, 7), 40).save(base / "ants" / "gray.png")
    Image.new("LA", (9, 9), (200, 0)).save(base / "ants" / "gray_alpha.png")  # fully transparent -> white
    Image.new("RGBA", (30, 11), (10, 20, 30, 255)).save(base / "ants" / "rgba.png")
    Image.new("1", (16, 16), 1).save(base / "ants" / "bilevel.bmp")
    Image.fromarray(np.full((12, 20), 51400, dtype=np.uint16)).save(base / "ants" / "sixteen_bit.png")
    pal = Image.new("P", (21, 33), 3)
    pal.putpalette([0, 0, 0] * 3 + [90, 100, 110] + [0, 0, 0] * 252)
    pal.save(base / "bees" / "palette.gif")
    pal_t = Image.new("P", (8, 8), 1)
    pal_t.putpalette([0, 0, 0, 250, 5, 5] + [0, 0, 0] * 254)
    pal_t.save(base / "bees" / "palette_transparent.png", transparency=1)
    Image.new("CMYK", (40, 24), (0, 0, 0, 0)).save(base / "bees" / "deeper" / "cmyk.jpg", quality=95)
    Image.new("RGB", (5, 50), (5, 250, 5)).save(base / "bees" / "deeper" / "tall.webp", lossless=True)
    return base


def test_a_folder_of_mixed_sizes_and_modes_loads_and_runs(capsys, tmp_path):
    base = mixed_folder(tmp_path / "images")
    results, root = tmp_path / "results", tmp_path / "data"
    rc, err = run(capsys, results, *folder_args(base, root))
    assert rc == 0, err
    rec = json.loads(next(results.glob("runs/kmeans/folder/*/record.json")).read_text())
    assert rec["status"] == "completed" and rec["n_eval"] == 9 and rec["num_classes"] == 2
    from bench.data import build_bundle

    bundle = build_bundle(to_container(compose(folder_args(base, root)).dataset))
    px = {i: bundle.eval.images[i, :, 4, 4].tolist() for i in range(9)}
    assert bundle.eval.images.shape == (9, 3, 8, 8) and bundle.eval.labels.tolist() == [0] * 5 + [1] * 4
    assert px[0] == [255, 255, 255]  # bilevel white
    assert px[1] == [40, 40, 40] and px[2] == [255, 255, 255] and px[3] == [10, 20, 30] and px[4] == [200] * 3
    assert px[7] == [90, 100, 110] and px[8] == [255, 255, 255]  # palette; transparent palette -> white
    assert len(list(root.rglob("*.npy"))) == 1  # decoded once, cached whole


def test_an_empty_class_folder_is_named_and_nothing_is_cached(capsys, tmp_path):
    base = mixed_folder(tmp_path / "images")
    (base / "cicadas").mkdir()
    (base / "cicadas" / "notes.txt").write_text("no pictures yet")
    results, root = tmp_path / "results", tmp_path / "data"
    rc, err = run(capsys, results, *folder_args(base, root))
    assert_failed_cleanly(results, rc, err, f"{base / 'cicadas'}: class folder holds no images", "DatasetError")
    assert files(root) == []


def test_an_unreadable_image_is_named_and_nothing_is_cached(capsys, tmp_path):
    base = mixed_folder(tmp_path / "images")
    (base / "bees" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    results, root = tmp_path / "results", tmp_path / "data"
    rc, err = run(capsys, results, *folder_args(base, root))
    assert_failed_cleanly(results, rc, err, f"{base / 'bees' / 'truncated.png'}: cannot read the image", "DatasetError")
    assert files(root) == []


# --------------------------------------------------------------------------------------------------------------
# dataset cards


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.pop("mean"), "is missing required field(s) mean"),
    (lambda c: c.pop("splits") and c.pop("num_classes"), "is missing required field(s) num_classes, splits"),
    (lambda c: c.update(num_classes="ten"), "Value 'ten' of type 'str' could not be converted to Integer"),
    (lambda c: c.update(colour="blue"), "unknown config key 'dataset.colour'"),
])
def test_a_dataset_card_with_a_missing_or_bad_field(capsys, tmp_path, monkeypatch, edit, needle):
    import bench.config as bc

    card = yaml.safe_load((CARDS_DIR / "digits.yaml").read_text())
    edit(card)
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "broken.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setattr(bc, "CARDS_DIR", cards)
    results = tmp_path / "results"
    rc, err = run(capsys, results, "method=kmeans", "dataset=broken")
    assert rc == 2 and needle in err and "broken.yaml" in err, err
    assert "Traceback" not in err and not results.exists()


# --------------------------------------------------------------------------------------------------------------
# checkpoints that are not this run's


def stage_folder(results: Path) -> Path:
    cfg = compose([*SMALL, f"results_dir={results}"])
    return results / "cache" / "byol" / "digits" / f"s0-{config_hash(cfg, keys=['dataset', 'byol'])}"


class Payload:
    pass


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind, needle", [
    ("another_config", "belongs to another run: its config_hash is '0123456789abcdef'"),
    ("another_method", "belongs to another run: its stage is 'simclr', this run expects 'byol'"),
    ("not_ours", "is not a checkpoint of this harness"),
    ("pickle", "cannot be loaded safely"),
    ("object_inside", "cannot be loaded safely"),
])
def test_a_checkpoint_of_another_run_or_an_arbitrary_pickle_is_refused(capsys, tmp_path, kind, needle):
    from methods.engine import save_checkpoint

    results = tmp_path / "results"
    path = stage_folder(results) / "last.pt"
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    good = {"ckpt_version": 1, "stage": "byol", "config_hash": config_hash(compose(SMALL), keys=["dataset", "byol"]),
            "epoch": 1, "step": 7, "models": {}}
    if kind == "another_config":
        save_checkpoint(path, {**good, "config_hash": "0123456789abcdef"})
    elif kind == "another_method":
        save_checkpoint(path, {**good, "stage": "simclr"})
    elif kind == "not_ours":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({**good, "models": Evil(marker)}, protocol=2))
    else:
        torch.save({**good, "extra": Payload()}, path)
    before = path.read_bytes()
    rc, err = run(capsys, results, *SMALL)
    assert rc == 2 and f"checkpoint {path} " in err and needle in err and f"Delete {path}" in err, err
    assert "Traceback" not in err
    assert not marker.exists()  # the pickle was never run
    assert path.read_bytes() == before  # left as it was, for inspection
    rec = json.loads(next(results.glob("runs/byol/digits/*/record.json")).read_text())
    assert rec["status"] == "failed" and rec["error"]["type"] == "CheckpointError" and str(path) in rec["error"]["message"]
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "last.pt"]
    assert not list(results.rglob("*.tmp")) and not list(results.rglob("*.npz"))
