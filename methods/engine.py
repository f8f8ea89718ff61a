"""The training engine every trained method uses.

Per epoch: batches from a per-epoch permutation (seeded by seed and epoch),
the method's step function, the lr schedule applied per step, a progress bar
(loss, lr, images/s, ETA), one JSON log line, an evaluation every
`train.eval_every` epochs, and an atomic checkpoint holding every model,
optimizer and random-number state.  Starting the same stage again resumes from
the last checkpoint and continues exactly where it stopped.  A NaN or infinite
loss stops the run with status `diverged`.

SIGTERM, SIGUSR1 or SIGUSR2 during training (what SLURM sends before a time
limit or a preemption) is handled at the next step: the engine saves
`partial.pt` (the state in the middle of the epoch, with the epoch's running
sums) and stops the run; the next start continues from that step and ends with
the same result as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bench.errors import CheckpointError
from bench.io import atomic_save, remove_stale_temps
from bench.runner import STOP, Diverged

CKPT_VERSION = 1


# --------------------------------------------------------------------------- schedules


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr x batch / 256."""
    return base_lr * batch_size / 256.0


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_factor: float = 0.0) -> float:
    """Linear warm-up from ~0 to 1 over warmup_steps, then cosine decay to final_factor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's target momentum: base -> 1 on a cosine over all iterations."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, o_params, alpha=1 - m)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


def param_groups(named: dict[str, tuple[nn.Module, float]], weight_decay: float) -> list[dict]:
    """Optimizer groups with per-group lr factors: {"encoder": (module, 1.0), "predictor": (module, 10.0)}."""
    groups = []
    for name, (module, factor) in named.items():
        groups.append({"params": [p for p in module.parameters() if p.requires_grad], "name": name,
                       "lr_factor": float(factor), "weight_decay": weight_decay})
    return groups


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # through a Python file, so a full disk is an OSError naming the file
            torch.save(payload, fh)

    atomic_save(path, write)


def load_checkpoint(path: Path, expect: dict | None = None) -> dict:
    """torch.load(weights_only=True); `expect` fields (stage, config hash) must match or CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling refused or truncated file
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is damaged or not a checkpoint of this harness (only weights-only checkpoints are accepted)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("ckpt_version") != CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this harness (no ckpt_version {CKPT_VERSION})")
    for key, value in (expect or {}).items():
        if ckpt.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} belongs to another run: its {key} is {ckpt.get(key)!r}, this run expects {value!r}"
            )
    return ckpt


@contextlib.contextmanager
def stage_lock(folder: Path):
    """An exclusive lock on a stage folder, so two runs sharing a stage never train it at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the trainer


@dataclass
class Stage:
    """What the engine needs to know about one training stage."""

    name: str
    folder: Path  # checkpoints live here
    config_hash: str  # a checkpoint from another config is refused
    modules: dict[str, nn.Module]  # everything with weights to save (online, target, predictor ...)
    optimizer: torch.optim.Optimizer
    base_lr: float  # already scaled by batch/256
    epochs: int  # the schedule's length
    steps_per_epoch: int
    warmup_epochs: float = 0
    batch_size: int = 256
    keep_epochs: tuple[int, ...] = ()  # epochs whose checkpoints are kept (epoch_<e>.pt)
    stop_at: int | None = None  # train only up to this epoch (a later run continues)
    lr_offset_epochs: int = 0  # schedule position of epoch 0 (for phases inside a longer schedule)
    schedule_epochs: int | None = None  # total length of the schedule (default: epochs)
    extra_state: dict = field(default_factory=dict)  # method state saved with each checkpoint (tensors, numbers)


class Trainer:
    def __init__(self, ctx, stage: Stage, generator: torch.Generator):
        self.ctx = ctx
        self.s = stage
        self.g = generator
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed
        remove_stale_temps(stage.folder)

    # ----- state
    def state(self) -> dict:
        return {
            "ckpt_version": CKPT_VERSION,
            "stage": self.s.name,
            "config_hash": self.s.config_hash,
            "epoch": self.epoch,
            "step": self.step,
            "models": {k: m.state_dict() for k, m in self.s.modules.items()},
            "optimizer": self.s.optimizer.state_dict(),
            "generator": self.g.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "extra": self.s.extra_state,
        }

    def load(self, ckpt: dict) -> None:
        for k, m in self.s.modules.items():
            if k not in ckpt["models"]:
                raise CheckpointError(f"checkpoint of stage {self.s.name} has no weights for {k!r}")
            m.load_state_dict(ckpt["models"][k])
        self.s.optimizer.load_state_dict(ckpt["optimizer"])
        self.g.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.s.extra_state.update(ckpt.get("extra") or {})

    def last_path(self) -> Path:
        return self.s.folder / "last.pt"

    def epoch_path(self, epoch: int) -> Path:
        return self.s.folder / f"epoch_{epoch}.pt"

    def partial_path(self) -> Path:
        return self.s.folder / "partial.pt"

    def resume(self, from_epoch: int | None = None) -> bool:
        """Load the last checkpoint (or the kept one of `from_epoch`); True if something was loaded."""
        path = self.epoch_path(from_epoch) if from_epoch is not None else self.last_path()
        if not path.exists():
            return False
        try:
            ckpt = load_checkpoint(path, expect={"stage": self.s.name, "config_hash": self.s.config_hash})
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. Delete {path} to train stage {self.s.name} again from the start") from exc
        self.load(ckpt)
        self.ctx.log(f"{self.s.name}: resumed from {path} (epoch {self.epoch}/{self.s.epochs})")
        return True

    def save(self) -> None:
        st = self.state()
        save_checkpoint(self.last_path(), st)
        if self.epoch in self.s.keep_epochs:
            save_checkpoint(self.epoch_path(self.epoch), st)
        self.partial_path().unlink(missing_ok=True)

    def save_partial(self, epoch: int, batch: int, sums: dict) -> Path:
        """Save the state before batch `batch` of `epoch` (stopping in the middle of an epoch)."""
        st = self.state()
        st["partial"] = {"epoch": epoch, "batch": batch, "loss_sum": float(sums["loss"]),
                         "extra_sum": {k: float(v) for k, v in sums["extra"].items()}}
        path = self.partial_path()
        save_checkpoint(path, st)
        return path

    def read_partial(self) -> dict | None:
        """partial.pt when it holds the middle of the next epoch (an unusable one is skipped), else None."""
        path = self.partial_path()
        if not path.exists():
            return None
        try:
            ckpt = load_checkpoint(path, expect={"stage": self.s.name, "config_hash": self.s.config_hash})
        except CheckpointError as exc:
            self.ctx.log(f"{self.s.name}: ignoring {path} ({exc}); continuing from the last full epoch")
            return None
        part = ckpt.get("partial")
        if not isinstance(part, dict) or ckpt.get("epoch") != self.epoch or part.get("epoch") != self.epoch + 1 \
                or ckpt.get("step") != self.step + part.get("batch", -1):
            return None  # the middle of another epoch than the next one: not ours to continue
        return ckpt

    # ----- schedule
    def set_lr(self) -> float:
        s = self.s
        total = (s.schedule_epochs or s.epochs) * s.steps_per_epoch
        pos = s.lr_offset_epochs * s.steps_per_epoch + self.step
        factor = warmup_cosine(pos, total, int(s.warmup_epochs * s.steps_per_epoch))
        lr = s.base_lr * factor
        for grp in s.optimizer.param_groups:
            grp["lr"] = lr * grp.get("lr_factor", 1.0)
        return lr

    @property
    def total_steps(self) -> int:
        return self.s.epochs * self.s.steps_per_epoch

    # ----- the loop
    def fit(
        self,
        n_items: int,
        step_fn: Callable[[torch.Tensor, int], dict[str, Any]],
        *,
        evaluate: Callable[[int], dict] | None = None,
        epoch_begin: Callable[[int], None] | None = None,
        epoch_end: Callable[[int], dict | None] | None = None,
        drop_last: bool = True,
    ) -> list[dict]:
        """Train epochs self.epoch+1 .. min(epochs, stop_at).

        step_fn(batch_indices, step) -> {"loss": tensor or float, other numbers...}; the batch indices are on
        the run's device.  Return the loss (and other numbers) as device tensors, not floats: the trainer
        reads them on the host once every `train.sync_every` steps, so the step never waits for the device.
        """
        s = self.s
        end = min(s.epochs, s.stop_at or s.epochs)
        eval_every = int(self.ctx.cfg.train.eval_every)
        sync_every = int(self.ctx.cfg.train.get("sync_every", 25))
        progress = self.ctx.progress
        partial = self.read_partial() if self.epoch < end else None
        bar = _bar(total=end, initial=self.epoch, desc=s.name, disable=not progress, unit="ep")
        STOP.hold()  # from here a stop signal is acted on between steps, once the state is saved
        try:
            while self.epoch < end:
                e = self.epoch + 1
                if epoch_begin:
                    epoch_begin(e)
                perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(
                    self.ctx.seed * 1_000_003 + e * 7919 + zlib.crc32(s.name.encode()) % 7907))
                perm = perm.to(self.ctx.device)  # one copy an epoch; the steps' batch indices are device slices
                n_batches = n_items // s.batch_size if drop_last else math.ceil(n_items / s.batch_size)
                n_batches = max(1, n_batches)
                t0, seen, loss_sum, extra_sum, first = time.time(), 0, 0.0, {}, 0
                if partial is not None:  # continue in the middle of this epoch; epoch_begin saw its start
                    self.load(partial)
                    part, partial = partial["partial"], None
                    first, loss_sum, extra_sum = int(part["batch"]), float(part["loss_sum"]), dict(part["extra_sum"])
                    self.ctx.log(f"{s.name}: resumed from {self.partial_path()} (epoch {e} after {first} batches)")
                inner = _bar(total=n_batches, initial=first, desc=f"{s.name} epoch {e}", leave=False,
                             disable=not progress or n_batches < 20, unit="it")
                window = _StepWindow(s.name, e, loss_sum, extra_sum, inner)
                for b in range(first, n_batches):
                    if STOP.requested:
                        window.flush()
                        inner.close()
                        path = self.save_partial(e, b, {"loss": window.loss_sum, "extra": window.extra_sum})
                        STOP.stop(f"saved {path} at epoch {e} after {b} of {n_batches} batches")
                    idx = perm[b * s.batch_size : (b + 1) * s.batch_size]
                    lr = self.set_lr()
                    window.add(self.step, step_fn(idx, self.step))
                    if len(window) >= sync_every:
                        window.flush()
                    seen += len(idx)
                    self.step += 1
                    inner.update(1)
                window.flush()
                loss_sum, extra_sum = window.loss_sum, window.extra_sum
                inner.close()
                dt = time.time() - t0
                self.epoch = e
                row: dict[str, Any] = {"stage": s.name, "epoch": e + s.lr_offset_epochs, "loss": loss_sum / n_batches, "lr": lr,
                                       "images_per_s": round(seen / max(dt, 1e-9), 1), "epoch_s": round(dt, 3)}
                row.update({k: v / n_batches for k, v in extra_sum.items()})
                if epoch_end:
                    row.update(epoch_end(e) or {})
                if evaluate and eval_every > 0 and (e % eval_every == 0 or e == end):
                    row.update(evaluate(e))
                self.history.append(row)
                self.save()
                self.ctx.log_json(row)
                self.ctx.add_history(dict(row))
                if STOP.requested:
                    STOP.stop(f"saved {self.last_path()} at the end of epoch {e}")
                bar.update(1)
                post = {"loss": f"{row['loss']:.4f}", "lr": f"{lr:.3g}", "img/s": f"{row['images_per_s']:.0f}"}
                if "nmi" in row:
                    post["nmi"] = f"{row['nmi']:.3f}"
                bar.set_postfix(post, refresh=False)
        finally:
            STOP.release()
            bar.close()
        return self.history


class _StepWindow:
    """The outputs of the last few steps of an epoch, kept as device tensors and read on the host together.

    Reading a loss (`float(loss)`) waits for the device to finish the step; one read per window of
    `train.sync_every` steps lets the device run ahead of the host in between.  `flush` reads the window
    (one device-to-host copy), adds each step's exact values to the epoch's running sums in step order,
    and raises Diverged naming the first step whose loss is not finite.  Extra outputs that are not
    numbers or one-element tensors are dropped, as the epoch row only averages numbers.
    """

    def __init__(self, stage: str, epoch: int, loss_sum: float, extra_sum: dict[str, float], bar) -> None:
        self.stage, self.epoch, self.bar = stage, epoch, bar
        self.loss_sum, self.extra_sum = loss_sum, extra_sum
        self.items: list[tuple[int, dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, step: int, out: dict[str, Any]) -> None:
        self.items.append((step, out))

    def flush(self) -> None:
        items, self.items = self.items, []
        names = [[k for k, v in out.items() if k == "loss" or _is_number(v)] for _, out in items]
        values = iter(_host_floats([out[k] for (_, out), ks in zip(items, names) for k in ks]))
        for (step, _), ks in zip(items, names):
            vals = {k: next(values) for k in ks}
            loss = vals.pop("loss")
            if not math.isfinite(loss):
                raise Diverged(f"{self.stage}: loss became {loss} at epoch {self.epoch}, step {step}")
            self.loss_sum += loss
            for k, v in vals.items():
                self.extra_sum[k] = self.extra_sum.get(k, 0.0) + v
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def _host_floats(values: list) -> list[float]:
    """Python floats of numbers and one-element tensors, with one device-to-host copy per device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for pos in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in pos])
        for i, v in zip(pos, stacked.cpu().tolist()):
            out[i] = v
    return out


def _bar(**kw):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(file=sys.stderr, mininterval=0.5 if tty else 30, dynamic_ncols=True, **kw)


def configure_device(device: str) -> dict:
    """bf16 autocast and channels_last on CUDA; nothing on the CPU."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()  # autotuning varies
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"cuda": cuda}


class SameWeights:
    """Remembers one result computed from a module's current weights and one input object.

    `get(inputs, compute)` returns the remembered result when `inputs` is the very object of the last call
    and every parameter and buffer of the module equals the copy taken then (compared exactly, on the
    device); otherwise it calls `compute()` and remembers that.  For the evaluations that a stage's last
    epoch, the next stage's start and the final prediction would otherwise repeat on unchanged weights.
    The copy costs the module's size in device memory.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: Any = None
        self.weights: list[torch.Tensor] = []
        self.result: Any = None
        self.hits = 0

    def _unchanged(self, weights: list[torch.Tensor]) -> bool:
        return len(weights) == len(self.weights) and all(torch.equal(a, b) for a, b in zip(self.weights, weights))

    def get(self, inputs: Any, compute: Callable[[], Any]) -> Any:
        weights = list(self.module.state_dict().values())
        if self.inputs is inputs and self._unchanged(weights):
            self.hits += 1
            return self.result
        self.result = compute()
        self.inputs, self.weights = inputs, [w.detach().clone() for w in weights]
        return self.result


def autocast(device: str, enabled: bool):
    if device.startswith("cuda") and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def env_threads() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or (os.cpu_count() or 1)


def pretext_stage(ctx, data, node_name: str, net: nn.Module, optimizer: torch.optim.Optimizer):
    """What every cached pretext stage (BYOL, SimCLR) sets up alike.

    Returns (images on the device, the stage's generator, its cache folder, its Stage), with the stage
    keyed by the hash of the dataset and the stage's config node, and the batch checked against the data.
    """
    from bench.config import config_hash
    from bench.errors import ConfigError

    node = ctx.cfg[node_name]
    images = data.train.on(ctx.device)
    n = len(images)
    if node.batch_size > n:
        raise ConfigError(f"{node_name}.batch_size={node.batch_size} is larger than the {n} training images")
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    folder = ctx.cache_dir(node_name, [node_name])
    stage = Stage(
        name=node_name, folder=folder, config_hash=config_hash(ctx.cfg, keys=["dataset", node_name]),
        modules={"net": net}, optimizer=optimizer, base_lr=scaled_lr(node.base_lr, node.batch_size),
        epochs=int(node.epochs), steps_per_epoch=n // node.batch_size, warmup_epochs=node.warmup_epochs,
        batch_size=int(node.batch_size),
    )
    return images, gen, folder, stage
