"""Dataset loaders on tiny files written in the exact on-disk formats (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.config import compose, to_container
from bench.data import build_bundle, cifar, common, folder, imagenet, stl10
from bench.errors import DatasetError

PER_BATCH = 4  # images per CIFAR-10 batch in the fixtures


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def card_for(dataset: str, *args: str) -> dict:
    return to_container(compose(["dataset.download=false", *args], dataset=dataset).dataset)


@pytest.fixture(autouse=True)
def _no_verify_override(monkeypatch):
    monkeypatch.delenv(common.VERIFY_ENV, raising=False)
    monkeypatch.delenv("BENCH_DATA", raising=False)


# --------------------------------------------------------------------------- CIFAR fixtures


def cifar_pixels(n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[0, 2 * 1024 + 5 * 32 + 7] = 201  # image 0, blue plane, row 5, column 7
    return data


def write_cifar10(root: Path, n: int = PER_BATCH) -> Path:
    """The python batches as the official pickles hold them (bytes keys, list labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [s.encode() for s in names], b"num_cases_per_batch": n}, fh, protocol=2)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(batches):
        entry = {b"batch_label": name.encode(), b"labels": [(i + b) % 10 for i in range(n)],
                 b"data": cifar_pixels(n, b), b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return folder


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse = [f"super{i}" for i in range(20)]
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": coarse}, fh)
    for s, (name, n) in enumerate([("train", n_train), ("test", n_test)]):
        entry = {"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
                 "fine_labels": [99 - i for i in range(n)], "coarse_labels": [(3 * i + s) % 20 for i in range(n)],
                 "data": cifar_pixels(n, 10 + s)}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return folder


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    write_cifar10(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_splits_labels_pixels(cifar_root):
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    train = cifar.load_split(card, cifar_root, "train", False)
    test = cifar.load_split(card, cifar_root, "test", False)
    assert train.images.shape == (5 * PER_BATCH, 3, 32, 32) and test.images.shape == (PER_BATCH, 3, 32, 32)
    assert str(train.images.dtype) == "torch.uint8"
    expected = np.concatenate([[(i + b) % 10 for i in range(PER_BATCH)] for b in range(5)])
    assert train.labels.tolist() == expected.tolist()
    assert test.labels.tolist() == [(i + 5) % 10 for i in range(PER_BATCH)]
    # pixel round trip: planes are R, G, B, each 32x32 row-major
    assert int(train.images[0, 2, 5, 7]) == 201
    raw = cifar_pixels(PER_BATCH, 1)
    assert np.array_equal(train.images[PER_BATCH:2 * PER_BATCH].numpy().reshape(PER_BATCH, -1), raw)
    assert int(test.images[0, 2, 5, 7]) == 201
    names = cifar.class_names(card, cifar_root)
    assert names[0] == "airplane" and names[-1] == "truck" and len(names) == 10


def test_cifar10_resize_to_card_size(cifar_root):
    card = card_for("cifar10", f"dataset.root={cifar_root}", "dataset.image_size=16")
    assert cifar.load_split(card, cifar_root, "test", False).images.shape == (PER_BATCH, 3, 16, 16)


def test_cifar20_uses_coarse_labels(tmp_path):
    write_cifar100(tmp_path)
    card = card_for("cifar20", f"dataset.root={tmp_path}")
    train = cifar.load_split(card, tmp_path, "train", False)
    test = cifar.load_split(card, tmp_path, "test", False)
    assert train.images.shape == (6, 3, 32, 32) and len(test) == 3
    assert train.labels.tolist() == [(3 * i) % 20 for i in range(6)]
    assert test.labels.tolist() == [(3 * i + 1) % 20 for i in range(3)]
    assert int(train.images[0, 2, 5, 7]) == 201
    assert cifar.class_names(card, tmp_path) == [f"super{i}" for i in range(20)]


@pytest.mark.parametrize("protocol, n_train, n_eval, same", [
    ("transductive", 6 * PER_BATCH, 6 * PER_BATCH, True),
    ("inductive", 5 * PER_BATCH, PER_BATCH, False),
])
def test_cifar10_bundle_protocols(cifar_root, protocol, n_train, n_eval, same):
    card = card_for("cifar10", f"dataset.root={cifar_root}", f"dataset.protocol={protocol}")
    bundle = build_bundle(card)
    assert (len(bundle.train), len(bundle.eval), bundle.eval_is_train) == (n_train, n_eval, same)
    assert bundle.protocol["name"] == protocol
    assert bundle.classes[3] == "cat" and bundle.num_classes == 10
    if protocol == "inductive":
        assert bundle.protocol["train"] == ["train"] and bundle.protocol["eval"] == ["test"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_cifar_damaged_batch_names_file(cifar_root, damage):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x00not a pickle" * 50)
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    with pytest.raises(DatasetError, match="data_batch_3"):
        cifar.load_split(card, cifar_root, "train", False)


def test_cifar_batch_wrong_shape_names_key(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, fh)
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=r"test_batch: 'data' is uint8 of shape \(2, 100\)"):
        cifar.load_split(card, tmp_path, "test", False)


def test_cifar_reads_numpy_1_module_paths(tmp_path):
    """Pickles written by numpy 1 (as the official files are) name numpy.core.multiarray."""
    folder = write_cifar10(tmp_path)
    blob = pickle.dumps({"data": cifar_pixels(2, 7), "labels": [4, 5]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    (folder / "test_batch").write_bytes(blob)
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    split = cifar.load_split(card, tmp_path, "test", False)
    assert split.labels.tolist() == [4, 5] and np.array_equal(split.images.numpy().reshape(2, -1), cifar_pixels(2, 7))


def test_cifar_refuses_foreign_pickle(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": Path("/etc")}, fh)
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match="test_batch.*refusing to load global"):
        cifar.load_split(card, tmp_path, "test", False)


def test_cifar_wrong_checksum_when_always(cifar_root, monkeypatch):
    monkeypatch.setenv(common.VERIFY_ENV, "always")
    path = cifar_root / "cifar-10-batches-py" / "test_batch"
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    with pytest.raises(DatasetError) as err:
        cifar.load_split(card, cifar_root, "test", False)
    msg = str(err.value)
    assert str(path) in msg and md5(path) in msg and "40351d587109b95175f43aff81a1287e" in msg


def _with_test_batch(monkeypatch, md5_value: str, count: int) -> None:
    rel = cifar.RELEASES["cifar10"]
    splits = dict(rel.splits, test=[("test_batch", md5_value, count)])
    monkeypatch.setitem(cifar.RELEASES, "cifar10", dataclasses.replace(rel, splits=splits))


def test_cifar_full_size_file_is_checked(cifar_root, monkeypatch):
    """In auto mode a file holding the official image count is compared with the official MD5."""
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    _with_test_batch(monkeypatch, "0" * 32, PER_BATCH)
    with pytest.raises(DatasetError, match=r"test_batch: MD5 checksum [0-9a-f]{32} does not match the official 0{32}"):
        cifar.load_split(card, cifar_root, "test", False)
    _with_test_batch(monkeypatch, "0" * 32, 10000)  # not full size: loads unchecked
    assert len(cifar.load_split(card, cifar_root, "test", False)) == PER_BATCH


def test_verify_modes(cifar_root, monkeypatch):
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    _with_test_batch(monkeypatch, "0" * 32, PER_BATCH)
    monkeypatch.setenv(common.VERIFY_ENV, "never")
    assert len(cifar.load_split(card, cifar_root, "test", False)) == PER_BATCH
    monkeypatch.setenv(common.VERIFY_ENV, "sometimes")
    with pytest.raises(DatasetError, match="BENCH_DATA_VERIFY='sometimes' is not valid; expected one of auto, always, never"):
        cifar.load_split(card, cifar_root, "test", False)


def test_cifar_verified_file_is_hashed_once(cifar_root, monkeypatch):
    path = cifar_root / "cifar-10-batches-py" / "test_batch"
    card = card_for("cifar10", f"dataset.root={cifar_root}")
    _with_test_batch(monkeypatch, md5(path), PER_BATCH)
    cifar.load_split(card, cifar_root, "test", False)
    assert (path.parent / common.STAMP_NAME).exists()
    monkeypatch.setattr(common, "md5sum", lambda p: pytest.fail("hashed a verified file again"))
    assert len(cifar.load_split(card, cifar_root, "test", False)) == PER_BATCH


def test_cifar_missing_files_without_download(tmp_path):
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=r"missing file\(s\) .*test_batch.*dataset.download=true"):
        cifar.load_split(card, tmp_path, "test", False)


def test_cifar_download_uses_official_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        write_cifar10(Path(extract_root or download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    assert len(cifar.load_split(card, tmp_path, "test", True)) == PER_BATCH
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")]
    cifar.load_split(card, tmp_path, "train", True)  # files present now: no second download
    assert len(calls) == 1


def test_cifar_interrupted_download_keeps_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def dies_midway(url, download_root, extract_root=None, **kw):
        folder = write_cifar10(Path(extract_root))
        (folder / "test_batch").write_bytes(b"half")
        raise OSError("connection reset")

    monkeypatch.setattr(tvu, "download_and_extract_archive", dies_midway)
    card = card_for("cifar10", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match="connection reset"):
        cifar.load_split(card, tmp_path, "test", True)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cifar_download_failure_is_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(url, *a, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    card = card_for("cifar20", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=r"cifar-100-python\.tar\.gz.*network is unreachable"):
        cifar.load_split(card, tmp_path, "train", True)


# --------------------------------------------------------------------------- STL-10


def stl_images(n: int, seed: int) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
    img[0, 1, 10, 70] = 222  # image 0, green plane, row 10, column 70
    return img


def write_stl(root: Path, n_train=3, n_test=2, n_unlabeled=2) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for name, n, seed in [("train", n_train, 0), ("test", n_test, 1), ("unlabeled", n_unlabeled, 2)]:
        # the file stores each plane column-major
        (folder / f"{name}_X.bin").write_bytes(stl_images(n, seed).transpose(0, 1, 3, 2).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes(bytes([(i % 10) + 1 for i in range(n)][::-1]))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


@pytest.fixture
def stl_root(tmp_path) -> Path:
    write_stl(tmp_path)
    return tmp_path


def test_stl10_splits_labels_pixels(stl_root):
    card = card_for("stl10", f"dataset.root={stl_root}")
    train = stl10.load_split(card, stl_root, "train", False)
    test = stl10.load_split(card, stl_root, "test", False)
    unl = stl10.load_split(card, stl_root, "unlabeled", False)
    assert train.images.shape == (3, 3, 96, 96) and len(test) == 2 and len(unl) == 2
    assert train.labels.tolist() == [2, 1, 0] and test.labels.tolist() == [1, 0]
    assert unl.labels.tolist() == [-1, -1]
    assert int(train.images[0, 1, 10, 70]) == 222
    assert np.array_equal(test.images.numpy(), stl_images(2, 1))
    assert stl10.class_names(card, stl_root)[7] == "monkey"


def test_stl10_bundle_with_unlabeled_extra(stl_root):
    card = card_for("stl10", f"dataset.root={stl_root}", "dataset.extra_train_splits=[unlabeled]")
    bundle = build_bundle(card)
    assert (len(bundle.train), len(bundle.eval), bundle.eval_is_train) == (7, 5, False)
    assert (bundle.train.labels == -1).sum() == 2 and (bundle.eval.labels >= 0).all()
    inductive = build_bundle(card_for("stl10", f"dataset.root={stl_root}", "dataset.protocol=inductive"))
    assert (len(inductive.train), len(inductive.eval)) == (3, 2)


def test_stl10_truncated_file_names_it(stl_root):
    path = stl_root / "stl10_binary" / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    card = card_for("stl10", f"dataset.root={stl_root}")
    with pytest.raises(DatasetError, match=r"train_X\.bin: .*truncated"):
        stl10.load_split(card, stl_root, "train", False)


def test_stl10_label_count_mismatch(stl_root):
    (stl_root / "stl10_binary" / "test_y.bin").write_bytes(b"\x01")
    card = card_for("stl10", f"dataset.root={stl_root}")
    with pytest.raises(DatasetError, match=r"test_y\.bin: 1 labels for the 2 images"):
        stl10.load_split(card, stl_root, "test", False)


def test_stl10_full_size_wrong_checksum(stl_root, monkeypatch):
    monkeypatch.setitem(stl10.SPLITS, "test", ("test_X.bin", "f" * 32, "test_y.bin", "e" * 32, 2))
    path = stl_root / "stl10_binary" / "test_X.bin"
    card = card_for("stl10", f"dataset.root={stl_root}")
    with pytest.raises(DatasetError) as err:
        stl10.load_split(card, stl_root, "test", False)
    assert str(path) in str(err.value) and md5(path) in str(err.value) and "f" * 32 in str(err.value)


def test_stl10_download_uses_official_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        calls.append((url, md5))
        write_stl(Path(extract_root or download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    card = card_for("stl10", f"dataset.root={tmp_path}")
    assert len(stl10.load_split(card, tmp_path, "train", True)) == 3
    assert calls == [("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb")]


# --------------------------------------------------------------------------- ImageNet subsets

WNIDS = ["n02085936", "n01000001", "n03000003"]  # label = position, not sorted order
COLOURS = {"n02085936": (200, 30, 30), "n01000001": (30, 200, 30), "n03000003": (30, 30, 200)}


def write_imagenet(base: Path, per_class=(2, 3, 1), wnids=WNIDS) -> Path:
    for wnid, n in zip(wnids, per_class, strict=True):
        d = base / wnid
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40 + 8 * i, 30), COLOURS.get(wnid, (9, 9, 9))).save(d / f"{wnid}_{i}.JPEG", quality=95)
    return base


def imagenet_card(*args: str) -> dict:
    return card_for("imagenet10", f"dataset.wnids=[{','.join(WNIDS)}]", "dataset.num_classes=3",
                    "dataset.image_size=16", *args)


def test_imagenet_subset_from_root_train(tmp_path, monkeypatch):
    write_imagenet(tmp_path / "imagenet" / "train")
    card = imagenet_card(f"dataset.root={tmp_path}")
    split = imagenet.load_split(card, tmp_path, "train", False)
    assert split.images.shape == (6, 3, 16, 16)
    assert split.labels.tolist() == [0, 0, 1, 1, 1, 2]
    for i, label in enumerate(split.labels):
        pixel = split.images[i, :, 8, 8].tolist()
        assert np.allclose(pixel, COLOURS[WNIDS[label]], atol=4), (i, pixel)
    assert imagenet.class_names(card, tmp_path) == WNIDS
    caches = list((tmp_path / "cache" / "imagenet_subset").glob("*.npy"))
    assert len(caches) == 1
    # second load reads the cache, no decoding
    monkeypatch.setattr(folder, "decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    again = imagenet.load_split(card, tmp_path, "train", False)
    assert np.array_equal(again.images.numpy(), split.images.numpy())


def test_imagenet_cache_follows_file_list(tmp_path):
    base = write_imagenet(tmp_path / "imagenet" / "train")
    card = imagenet_card(f"dataset.root={tmp_path}")
    assert len(imagenet.load_split(card, tmp_path, "train", False)) == 6
    Image.new("RGB", (32, 32), (1, 2, 3)).save(base / WNIDS[2] / "extra.JPEG")
    assert len(imagenet.load_split(card, tmp_path, "train", False)) == 7


def test_imagenet_subset_from_path_with_wnid_folders(tmp_path):
    write_imagenet(tmp_path / "somewhere")
    card = imagenet_card(f"dataset.path={tmp_path / 'somewhere'}", f"dataset.root={tmp_path / 'root'}")
    bundle = build_bundle(card)
    assert len(bundle.train) == 6 and bundle.eval_is_train and bundle.classes == WNIDS
    assert imagenet.expected_files(card, tmp_path / "root")[0] == tmp_path / "somewhere" / WNIDS[0]


def test_imagenet_missing_wnid_folders_are_listed(tmp_path):
    write_imagenet(tmp_path / "ilsvrc" / "train", per_class=(1,), wnids=WNIDS[:1])
    card = imagenet_card(f"dataset.path={tmp_path / 'ilsvrc'}")
    with pytest.raises(DatasetError) as err:
        imagenet.load_split(card, tmp_path, "train", False)
    msg = str(err.value)
    assert f"missing: {WNIDS[1]} {WNIDS[2]} (" in msg and f"{WNIDS[0]} " not in msg.split("missing:")[1]
    assert str(tmp_path / "ilsvrc" / "train") in msg
    assert "dataset.path=" in msg and "BENCH_DATA" in msg


def test_imagenet_empty_wnid_folder_names_it(tmp_path):
    base = write_imagenet(tmp_path / "imagenet" / "train", per_class=(1, 0, 1))
    card = imagenet_card(f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=str(base / WNIDS[1])):
        imagenet.load_split(card, tmp_path, "train", False)


def test_imagenet_cards_hold_the_published_classes():
    assert len(card_for("imagenet10")["wnids"]) == 10
    dogs = card_for("imagenet_dogs")
    assert len(dogs["wnids"]) == dogs["num_classes"] == 15 and dogs["wnids"][0] == "n02085936"


# --------------------------------------------------------------------------- folder of class folders


def write_tree(base: Path) -> Path:
    """Three classes, mixed sizes and modes."""
    (base / "cat").mkdir(parents=True)
    (base / "dog" / "nested").mkdir(parents=True)
    (base / "emu").mkdir(parents=True)
    Image.new("L", (20, 30), 77).save(base / "cat" / "a_gray.png")
    Image.new("RGBA", (50, 24), (10, 20, 30, 255)).save(base / "cat" / "b_rgba.png")
    Image.new("RGBA", (24, 24), (0, 0, 0, 0)).save(base / "dog" / "a_clear.png")  # transparent -> white
    pal = Image.new("P", (33, 17), 0)
    pal.putpalette([120, 130, 140] * 256)
    pal.save(base / "dog" / "nested" / "b_palette.gif")
    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(base / "emu" / "a_cmyk.jpg", quality=95)
    Image.new("RGB", (17, 61), (5, 250, 5)).save(base / "emu" / "b_rgb.bmp")
    (base / "emu" / "notes.txt").write_text("not an image")
    return base


def test_folder_mixed_modes_and_sizes(tmp_path):
    base = write_tree(tmp_path / "imgs")
    card = card_for("folder", f"dataset.path={base}", f"dataset.root={tmp_path}", "dataset.image_size=16")
    assert card["num_classes"] == 3  # counted from the folders
    split = folder.load_split(card, tmp_path, "train", False)
    assert split.images.shape == (6, 3, 16, 16)
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    px = [split.images[i, :, 8, 8].tolist() for i in range(6)]
    assert px[0] == [77, 77, 77] and px[1] == [10, 20, 30]
    assert px[2] == [255, 255, 255] and px[3] == [120, 130, 140]
    assert np.allclose(px[4], [255, 255, 255], atol=3) and px[5] == [5, 250, 5]
    assert folder.class_names(card, tmp_path) == ["cat", "dog", "emu"]
    bundle = build_bundle(card)
    assert bundle.eval_is_train and bundle.classes == ["cat", "dog", "emu"] and len(bundle.eval) == 6


def test_folder_grayscale_card(tmp_path):
    base = write_tree(tmp_path / "imgs")
    card = card_for("folder", f"dataset.path={base}", f"dataset.root={tmp_path}", "dataset.image_size=8",
                    "dataset.channels=1", "dataset.mean=[0.5]", "dataset.std=[0.25]")
    split = folder.load_split(card, tmp_path, "train", False)
    assert split.images.shape == (6, 1, 8, 8) and int(split.images[0, 0, 4, 4]) == 77


def test_folder_num_classes_mismatch(tmp_path):
    base = write_tree(tmp_path / "imgs")
    card = card_for("folder", f"dataset.path={base}", "dataset.num_classes=4")
    with pytest.raises(DatasetError, match=r"holds 3 class folders \(cat, dog, emu\), but dataset.num_classes=4"):
        folder.load_split(card, tmp_path, "train", False)


def test_folder_empty_class_folder_names_it(tmp_path):
    base = write_tree(tmp_path / "imgs")
    (base / "fox").mkdir()
    (base / "fox" / "readme.txt").write_text("no images here")
    card = card_for("folder", f"dataset.path={base}", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=f"{base / 'fox'}: class folder holds no images"):
        folder.load_split(card, tmp_path, "train", False)


def test_folder_unreadable_image_names_it(tmp_path):
    base = write_tree(tmp_path / "imgs")
    (base / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    card = card_for("folder", f"dataset.path={base}", f"dataset.root={tmp_path}")
    with pytest.raises(DatasetError, match=str(base / "dog" / "broken.jpg")):
        folder.load_split(card, tmp_path, "train", False)


def test_folder_missing_path(tmp_path):
    from bench.errors import BenchError

    with pytest.raises(BenchError, match=f"dataset.path={tmp_path / 'nope'} does not exist"):
        card_for("folder", f"dataset.path={tmp_path / 'nope'}")
    with pytest.raises(BenchError, match="needs dataset.path=/my/images"):
        card_for("folder")


# --------------------------------------------------------------------------- python -m bench data


def test_cli_data_good_and_missing(cifar_root, tmp_path, capsys):
    from bench.cli import main

    assert main(["data", "dataset=cifar10", f"dataset.root={cifar_root}"]) == 0
    out = capsys.readouterr().out
    assert "found" in out and "MISSING" not in out
    assert f"split train      {5 * PER_BATCH:>8d} images  3x32x32" in out and "airplane" in out

    empty = tmp_path / "empty"
    assert main(["data", "dataset=cifar10", f"dataset.root={empty}"]) == 1
    out = capsys.readouterr().out
    assert f"MISSING {empty / 'cifar-10-batches-py' / 'test_batch'}" in out
    assert "PROBLEM" in out and "dataset.download=true" in out
    assert not (empty / "cifar-10-batches-py").exists()  # `bench data` never downloads
