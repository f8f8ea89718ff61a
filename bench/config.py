"""Configuration: OmegaConf structured configs in struct mode.

Composition order (later wins):

    harness defaults (RunConfig below)
      <- method defaults (the dataclasses each method declares, one node per stage: byol, conr, ...)
      <- dataset card (datasets/<name>.yaml -> the `dataset` node)
      <- method x dataset preset (methods/presets/<method>.yaml, section <preset>.<dataset>)
      <- key=value arguments from the command line

`method=`, `dataset=` and `preset=` are *selectors*: they choose what is composed,
so they are read before everything else.  Every other argument must name an
existing key; a misspelt one is an error that names it and lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = PROJECT_ROOT / "datasets"
PRESETS_DIR = PROJECT_ROOT / "methods" / "presets"

SELECTORS = ("method", "dataset", "preset")
#: Keys that do not change what is computed, so they stay out of the config hash.
UNHASHED = ("seed", "seeds", "results_dir", "launcher", "tag", "train.progress", "train.device",
            "train.num_threads", "train.sync_every", "dataset.root", "dataset.download", "dataset.description", "dataset.source",
            "ablation", "sweep", "byol.keep_epochs")


@dataclass
class DatasetConfig:
    """A dataset card (datasets/<name>.yaml). Adding a dataset of a known kind is adding a card."""

    name: str = MISSING
    kind: str = MISSING  # loader kind: digits, cifar10, cifar100_coarse, stl10, imagenet_subset, folder
    description: str = ""
    source: str = ""
    root: str = ""  # data root; empty -> $BENCH_DATA or datasets/data
    path: str = ""  # for `folder` (and optionally imagenet_subset): the folder holding the images
    num_classes: int = MISSING
    image_size: int = MISSING
    channels: int = 3
    mean: list[float] = MISSING
    std: list[float] = MISSING
    splits: list[str] = MISSING  # labelled splits, in order
    protocol: str = "transductive"  # transductive | inductive | custom
    train_splits: list[str] = field(default_factory=list)  # protocol=custom only
    eval_splits: list[str] = field(default_factory=list)  # protocol=custom only
    extra_train_splits: list[str] = field(default_factory=list)  # e.g. [unlabeled] for STL-10
    download: bool = True
    augment: str = "default"  # augmentation family: default (BYOL/SimCLR colour views) | digits
    blur: bool = False  # Gaussian blur in the two-view pipeline (224 px images)
    wnids: list[str] = field(default_factory=list)  # imagenet_subset: the classes, in label order
    default_preset: str = "paper"


REQUIRED_CARD_FIELDS = ("name", "kind", "num_classes", "image_size", "mean", "std", "splits")


@dataclass
class EvalConfig:
    kmeans_restarts: int = 10
    kmeans_iters: int = 100
    spherical: bool = True  # cosine k-means on L2-normalised features (feature methods)
    knn_backend: str = "auto"  # auto | faiss | torch


@dataclass
class TrainConfig:
    """Engine settings shared by every trained method."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 10  # k-means evaluation of the features every N epochs (0: only at the end)
    progress: bool = True
    num_threads: int = 0  # torch CPU threads; 0: SLURM_CPUS_PER_TASK or all cores
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    deterministic: bool = False  # deterministic algorithms, cuDNN and cuBLAS (slower on GPU; see runner.set_deterministic)
    # steps between reads of the loss on the host: each read waits for the device, so the losses of a
    # window are read back together (a NaN is still caught, with the step it appeared at)
    sync_every: int = 25


@dataclass
class LauncherConfig:
    name: str = "local"  # debug (in process) | local (subprocesses) | slurm
    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    timeout_min: int = 1440
    constraint: str = ""
    array_parallelism: int = 64
    max_num_timeout: int = 5  # requeues on timeout/preemption before giving up
    folder: str = ""  # submitit logs; empty -> <results_dir>/submitit
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, passed through
    local_parallelism: int = 1  # local launcher: runs at once


@dataclass
class RunConfig:
    method: str = "kmeans"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    seed: int = 0
    preset: str = "auto"  # auto: the card's default_preset (cpu for digits, paper otherwise)
    results_dir: str = "results"
    tag: str = ""
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# --------------------------------------------------------------------------- parsing


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into selectors and ordinary overrides."""
    selectors: dict[str, str] = {}
    rest: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, _, value = arg.partition("=")
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"argument {arg!r} has an empty key")
        if key in SELECTORS:
            selectors[key] = value.strip()
        else:
            rest.append(f"{key}={value}")
    return selectors, rest


def list_cards() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name: str) -> dict:
    path = CARDS_DIR / f"{name}.yaml"
    if not path.exists():
        import difflib as _d

        known = list_cards()
        close = _d.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(known)}.{hint}")
    try:
        card = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"dataset card {path} is not valid YAML: {exc}") from exc
    if not isinstance(card, dict):
        raise ConfigError(f"dataset card {path} must be a mapping of fields")
    missing = [f for f in REQUIRED_CARD_FIELDS if f not in card]
    if missing:
        raise ConfigError(
            f"dataset card {path} is missing required field(s) {', '.join(missing)}; "
            f"every card needs {', '.join(REQUIRED_CARD_FIELDS)}"
        )
    card.setdefault("name", name)
    return card


def load_preset(method: str, preset: str, dataset: str) -> dict:
    """The method x dataset preset: section `default` then section `<dataset>` of `<preset>`."""
    path = PRESETS_DIR / f"{method}.yaml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if preset not in data:
        raise ConfigError(
            f"method {method!r} has no preset {preset!r}; presets in {path.name}: {', '.join(sorted(data))}"
        )
    section = data[preset] or {}
    out: dict = {}
    for key in ("default", dataset):
        part = section.get(key) or {}
        out = _deep_merge(out, part)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- composition


def compose(args: list[str] | None = None, **selectors: str) -> DictConfig:
    """Compose the run config from command-line style `key=value` arguments."""
    from methods import METHODS

    sel, overrides = parse_overrides(list(args or []))
    sel.update({k: v for k, v in selectors.items() if v is not None})
    method = sel.get("method", "kmeans")
    dataset = sel.get("dataset", "digits")
    METHODS.check(method)
    method_cls = METHODS.get(method)

    base = OmegaConf.structured(RunConfig)
    # method defaults: one node per stage config
    nodes = {name: OmegaConf.structured(cls) for name, cls in method_cls.config_nodes().items()}
    with _open(base):
        for name, node in nodes.items():
            base[name] = node
    OmegaConf.set_struct(base, True)
    OmegaConf.set_struct(base.launcher.additional, False)  # extra sbatch options: any key passes through
    base.method = method

    card = load_card(dataset)
    _merge_checked(base, {"dataset": card}, f"dataset card datasets/{dataset}.yaml")
    preset = sel.get("preset", "auto")
    if preset == "auto":
        preset = str(base.dataset.default_preset)
    base.preset = preset
    _merge_checked(base, load_preset(method, preset, dataset), f"preset {preset!r} of methods/presets/{method}.yaml")
    apply_overrides(base, overrides)
    _derive_num_classes(base)
    validate(base)
    return base


def _derive_num_classes(cfg: DictConfig) -> None:
    """dataset.num_classes=0: the loader kind counts the classes from the files, if it can (`folder`)."""
    ds = cfg.dataset
    if OmegaConf.is_missing(ds, "num_classes") or ds.num_classes != 0:
        return
    from bench.data.base import LOADERS

    derive = getattr(LOADERS.get(ds.kind), "derive_num_classes", None)
    if derive is not None:
        ds.num_classes = int(derive(to_container(ds)))


class _open:
    """Context manager: temporarily lift struct mode to add nodes."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)


def _merge_checked(cfg: DictConfig, data: dict, where: str) -> None:
    if not data:
        return
    for dotted, _value in _flatten(data):
        _check_key(cfg, dotted, where)
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{where}: bad value for {key!r}: {_short(exc)}" if key else f"{where}: {_short(exc)}") from exc
    for key in merged:
        cfg[key] = merged[key]


def _flatten(data: Any, prefix: str = ""):
    if isinstance(data, dict) and data:
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v and not key.endswith("additional"):
                yield from _flatten(v, key)
            else:
                yield key, v
    else:
        yield prefix, data


def _check_key(cfg: DictConfig, dotted: str, where: str) -> None:
    node: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig):
            if part not in list(node.keys()) and not _is_open(node):
                valid = sorted(str(k) for k in node.keys())
                path = ".".join(parts[:i]) or "<top level>"
                close = difflib.get_close_matches(part, valid, n=1)
                hint = f" Did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
                raise ConfigError(
                    f"unknown config key {dotted!r} ({where}): {path} has no key {part!r}.{hint} "
                    f"Valid keys of {path}: {', '.join(valid)}"
                )
            if part not in list(node.keys()):
                return
            child = node._get_node(part)
            node = child
        else:
            return


def _is_open(node: DictConfig) -> bool:
    """dict[str, Any] fields (launcher.additional) accept any key; dataclass nodes do not."""
    return node._metadata.object_type is dict


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    for item in overrides:
        key, _, value = item.partition("=")
        _check_key(cfg, key, "command line")
        try:
            parsed = OmegaConf.from_dotlist([item])
            merged = OmegaConf.merge(cfg, parsed)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value for {key!r}: {value!r} ({_short(exc)})") from exc
        for k in merged:
            cfg[k] = merged[k]


def _short(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express; methods add their own (Method.validate)."""
    from methods import METHODS

    ds = cfg.dataset
    for f in REQUIRED_CARD_FIELDS:
        if OmegaConf.is_missing(ds, f):
            raise ConfigError(f"dataset card {ds.get('name', '?')!r} is missing required field {f!r}")
    if ds.num_classes < 2:
        raise ConfigError(f"dataset.num_classes must be at least 2, got {ds.num_classes}")
    if ds.image_size < 1 or ds.channels not in (1, 3):
        raise ConfigError(f"dataset.image_size must be >= 1 and dataset.channels 1 or 3 (got {ds.image_size}, {ds.channels})")
    if len(ds.mean) != ds.channels or len(ds.std) != ds.channels:
        raise ConfigError(f"dataset.mean and dataset.std need {ds.channels} values (one per channel)")
    if cfg.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.train.sync_every < 1:
        raise ConfigError(f"train.sync_every must be >= 1 (steps between loss reads), got {cfg.train.sync_every}")
    if cfg.eval.kmeans_restarts < 1 or cfg.eval.kmeans_iters < 1:
        raise ConfigError("eval.kmeans_restarts and eval.kmeans_iters must be >= 1")
    if cfg.eval.knn_backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"eval.knn_backend must be auto, faiss or torch, got {cfg.eval.knn_backend!r}")
    if cfg.launcher.name not in ("debug", "local", "slurm"):
        raise ConfigError(f"launcher.name must be debug, local or slurm, got {cfg.launcher.name!r}")
    METHODS.get(cfg.method).validate(cfg)


# --------------------------------------------------------------------------- hashing


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _drop(d: dict, dotted: str) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.get(p, {})
        if not isinstance(d, dict):
            return
    d.pop(parts[-1], None)


def config_hash(cfg: DictConfig | dict, keys: list[str] | None = None) -> str:
    """A stable hash of what the config computes (seed, paths and launcher excluded).

    With `keys`, only those top-level nodes are hashed (used for stage caches).
    """
    data = to_container(cfg) if not isinstance(cfg, dict) else json.loads(json.dumps(cfg))
    for k in UNHASHED:
        _drop(data, k)
    if keys is not None:
        data = {k: data.get(k) for k in keys}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataclass_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
