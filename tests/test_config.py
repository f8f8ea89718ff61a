import pytest

from bench.config import compose, config_hash
from bench.errors import ConfigError, RegistryError
from bench.registry import Registry


def test_composition_order_card_preset_cli():
    cfg = compose(["method=byol", "dataset=digits"])
    assert cfg.dataset.image_size == 8  # from the card
    assert cfg.byol.backbone == "small_cnn"  # from the cpu preset
    cfg2 = compose(["method=byol", "byol.epochs=30", "dataset.protocol=inductive"])
    assert cfg2.byol.epochs == 30 and cfg2.dataset.protocol == "inductive"  # command line wins


def test_misspelt_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        compose(["method=byol", "byol.epoch=3"])
    msg = str(e.value)
    assert "byol.epoch" in msg and "epochs" in msg and "batch_size" in msg


def test_misspelt_top_level_key():
    with pytest.raises(ConfigError, match="Valid keys of <top level>"):
        compose(["sed=3"])


def test_wrong_type_and_out_of_range():
    with pytest.raises(ConfigError, match="byol.epochs"):
        compose(["method=byol", "byol.epochs=many"])
    with pytest.raises(ConfigError, match="byol.epochs must be >= 1"):
        compose(["method=byol", "byol.epochs=-5"])


def test_unknown_method_and_dataset():
    with pytest.raises(RegistryError, match="known methods: .*kmeans"):
        compose(["method=kmeanz"])
    with pytest.raises(ConfigError, match="known datasets: .*digits"):
        compose(["dataset=mnist"])


def test_hash_stable_and_ignores_seed_and_paths():
    a = compose(["method=byol", "seed=0", "results_dir=/tmp/a"])
    b = compose(["method=byol", "seed=3", "results_dir=/tmp/b", "launcher.name=slurm"])
    c = compose(["method=byol", "byol.epochs=7"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 16


def test_registry_duplicate_and_unknown():
    r = Registry("widget")
    r.register("a", "json:dumps")
    with pytest.raises(RegistryError, match="duplicate widget"):
        r.register("a", "json:loads")
    with pytest.raises(RegistryError, match="known widgets: a"):
        r.get("b")
    import json

    assert r.get("a") is json.dumps


def test_card_missing_field(tmp_path, monkeypatch):
    import bench.config as bc

    (tmp_path / "broken.yaml").write_text("name: broken\nkind: digits\nnum_classes: 10\n")
    monkeypatch.setattr(bc, "CARDS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="missing required field.*image_size"):
        bc.load_card("broken")
