"""Launching runs through submitit: debug (in process), local (subprocesses) or slurm (job arrays)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.errors import BenchError

log = logging.getLogger("bench")

#: environment variables an outer SLURM job sets that must not leak into jobs submitted from inside it
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


class RunJob:
    """The callable submitit pickles: compose nothing, just execute a resolved config.

    It is checkpointable: on timeout or preemption submitit calls `checkpoint`,
    which requeues the same job; on restart `execute` resumes from the run's
    last checkpoint, since the run folder is derived from the config.
    """

    def __init__(self, cfg: dict, force: bool = False):
        self.cfg = cfg
        self.force = force

    def __call__(self) -> dict:
        from bench.runner import execute, setup_logging

        setup_logging()
        cfg = OmegaConf.create(self.cfg)
        OmegaConf.set_struct(cfg, True)
        return execute(cfg, force=self.force)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        # the training engine checkpoints after every epoch; requeue without forcing a fresh start
        return submitit.helpers.DelayedSubmission(RunJob(self.cfg, force=False))


def compose_all(arg_sets: list[list[str]], seeds: list[int] | None) -> list[DictConfig]:
    from bench.config import compose

    cfgs = []
    for args in arg_sets:
        if seeds:
            for s in seeds:
                cfgs.append(compose([*args, f"seed={s}"]))
        else:
            cfgs.append(compose(args))
    return cfgs


def make_executor(cfg: DictConfig, folder: Path):
    import submitit

    name = cfg.launcher.name
    cluster = {"debug": "debug", "local": "local", "slurm": "slurm"}[name]
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    L = cfg.launcher
    params: dict[str, Any] = {"timeout_min": int(L.timeout_min), "name": f"bench-{cfg.method}"}
    if name == "slurm":
        params.update(
            slurm_partition=L.partition or None,
            slurm_account=L.account or None,
            slurm_qos=L.qos or None,
            gpus_per_node=int(L.gpus_per_node) or None,
            cpus_per_task=int(L.cpus_per_task),
            mem_gb=int(L.mem_gb),
            slurm_constraint=L.constraint or None,
            slurm_array_parallelism=int(L.array_parallelism),
            slurm_max_num_timeout=int(L.max_num_timeout),
            slurm_additional_parameters=dict(OmegaConf.to_container(L.additional)) or None,
        )
        params = {k: v for k, v in params.items() if v is not None}
    elif name == "local":
        params.update(cpus_per_task=int(L.cpus_per_task) if L.cpus_per_task else None)
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex


def clean_slurm_env() -> dict[str, str]:
    """Drop the outer job's SLURM_* variables so a submission from inside a job starts clean."""
    removed = {k: v for k, v in os.environ.items() if k.startswith(SLURM_ENV_PREFIXES)}
    for k in removed:
        os.environ.pop(k, None)
    return removed


def launch_runs(arg_sets: list[list[str]], seeds: list[int] | None = None, force: bool = False,
                wait: bool = True) -> list[dict]:
    """Compose and run configs (one per seed); debug runs in this process, local/slurm through submitit."""
    from bench.config import to_container
    from bench.runner import execute

    cfgs = compose_all(arg_sets, seeds)
    if not cfgs:
        return []
    first = cfgs[0]
    if first.launcher.name == "debug":
        # in process: plain calls, so a debugger and tracebacks work as usual
        return [execute(c, force=force) for c in cfgs]
    folder = Path(first.launcher.folder or Path(first.results_dir) / "submitit")
    ex = make_executor(first, folder)
    saved = clean_slurm_env()
    try:
        jobs = []
        if first.launcher.name == "local":
            # submitit's local executor starts every job at once; keep to launcher.local_parallelism
            par = max(1, int(first.launcher.local_parallelism))
            records = []
            for i in range(0, len(cfgs), par):
                batch = [ex.submit(RunJob(to_container(c), force)) for c in cfgs[i : i + par]]
                records.extend(_wait(batch, cfgs[i : i + par]))
            return records
        with ex.batch():
            for c in cfgs:
                jobs.append(ex.submit(RunJob(to_container(c), force)))
        log.info("submitted %d job(s): %s", len(jobs), ", ".join(j.job_id for j in jobs))
        return _wait(jobs, cfgs) if wait else []
    finally:
        os.environ.update(saved)


def _wait(jobs: list, cfgs: list[DictConfig]) -> list[dict]:
    from bench import store
    from bench.config import config_hash

    records = []
    for job, cfg in zip(jobs, cfgs):
        try:
            records.append(job.result())
        except Exception as exc:  # the job's record already says failed; read it back
            folder = store.run_dir(cfg.results_dir, cfg.method, cfg.dataset.name,
                                   store.run_id(int(cfg.seed), config_hash(cfg), cfg.tag))
            rec = None
            try:
                rec = store.read_record(folder)
            except BenchError:
                pass
            if rec is None:
                rec = {"method": cfg.method, "dataset": cfg.dataset.name, "seed": int(cfg.seed), "status": "failed",
                       "error": {"type": type(exc).__name__, "message": str(exc)[-2000:]}}
            log.error("job %s (%s/%s seed %s) failed: %s", job.job_id, cfg.method, cfg.dataset.name, cfg.seed,
                      (rec.get("error") or {}).get("message", str(exc))[:500])
            records.append(rec)
    return records
