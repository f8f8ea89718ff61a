"""Launching runs through submitit: debug (in process), local (subprocesses) or slurm (job arrays).

`launch_runs` backs `python -m bench run`; `sweep_command`, `status_command` and
`cancel_command` back `python -m bench sweep | status | cancel`.

A sweep is a grid of methods x datasets x seeds (given on the command line or
by a named suite, bench/suites/<name>.yaml).  Runs already completed with the
same config hash and seed are skipped; the rest are submitted (one SLURM job
array per distinct launcher setting) and listed in a manifest,
<results_dir>/sweeps/<sweep_id>.json, which `status` and `cancel` read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from bench.errors import BenchError, ConfigError

log = logging.getLogger("bench")

SUITES_DIR = Path(__file__).resolve().parent / "suites"
SUITE_KEYS = ("description", "methods", "datasets", "seeds", "preset", "overrides", "launcher")

#: variables an outer SLURM job sets; a submission from inside a job must not pass them on
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
#: ... except these, which say where the cluster is, not which job we are in
SLURM_ENV_KEEP = ("SLURM_CONF",)
#: submitit's own markers of "this process is a job"
SUBMITIT_JOB_VARS = ("SUBMITIT_EXECUTOR", "SUBMITIT_DEBUG_JOB_ID")
SUBMITIT_JOB_PREFIXES = ("SUBMITIT_LOCAL_",)

#: error types of a run stopped from outside (a signal), as opposed to one that failed on its own
STOP_ERRORS = ("Preempted", "KeyboardInterrupt", "SystemExit", "Cancelled")

#: SLURM job states in which a job may still run
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


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


def signal_delay_s(timeout_min: int) -> int:
    """Seconds before the time limit at which SLURM warns the job (USR2) so it can requeue itself.

    A tenth of the limit, between 5 s and 120 s.  SLURM may send the warning up to
    30 s earlier still, so a one-minute job is warned after about half its time,
    a day-long one two and a half minutes before the end.
    """
    return int(min(120, max(5, timeout_min * 6)))


def make_executor(cfg: DictConfig, folder: Path):
    import submitit

    name = cfg.launcher.name
    cluster = {"debug": "debug", "local": "local", "slurm": "slurm"}[name]
    L = cfg.launcher
    kwargs = {"slurm_max_num_timeout": int(L.max_num_timeout)} if name == "slurm" else {}
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **kwargs)
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
            slurm_signal_delay_s=signal_delay_s(int(L.timeout_min)),
            slurm_additional_parameters=dict(OmegaConf.to_container(L.additional)) or None,
        )
        params = {k: v for k, v in params.items() if v is not None}
    elif name == "local":
        params.update(cpus_per_task=int(L.cpus_per_task) if L.cpus_per_task else None)
        params = {k: v for k, v in params.items() if v is not None}
    ex.update_parameters(**params)
    return ex


def _inside_job(env: dict[str, str] | os._Environ) -> bool:
    return "SLURM_JOB_ID" in env or any(k in env for k in SUBMITIT_JOB_VARS)


def job_env_keys(env: dict[str, str] | os._Environ | None = None) -> list[str]:
    """The variables of `env` that belong to the job this process runs in (none outside a job).

    All SLURM_* but SLURM_CONF, and submitit's job markers; inside a SLURM job also
    SBATCH_*, SRUN_* and SALLOC_* (which srun and sbatch read as settings).
    """
    env = os.environ if env is None else env
    inside = _inside_job(env)
    out = []
    for k in env:
        if k in SLURM_ENV_KEEP:
            continue
        if k.startswith("SLURM_") or k in SUBMITIT_JOB_VARS or k.startswith(SUBMITIT_JOB_PREFIXES):
            out.append(k)
        elif inside and k.startswith(SLURM_ENV_PREFIXES):
            out.append(k)
    return out


def clean_slurm_env() -> dict[str, str]:
    """Drop the outer job's variables so a submission from inside a job starts clean; returns what was removed."""
    removed = {k: os.environ[k] for k in job_env_keys()}
    for k in removed:
        os.environ.pop(k, None)
    return removed


@contextlib.contextmanager
def outside_job_env() -> Iterator[dict[str, str]]:
    """Within the block the process looks like it runs in no job; the variables come back afterwards."""
    saved = clean_slurm_env()
    try:
        yield saved
    finally:
        os.environ.update(saved)


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
    with outside_job_env():
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
            if rec is None or rec.get("status") == "running":
                rec = {"method": cfg.method, "dataset": cfg.dataset.name, "seed": int(cfg.seed), "status": "failed",
                       "error": {"type": type(exc).__name__, "message": str(exc)[-2000:]}}
            log.error("job %s (%s/%s seed %s) failed: %s", job.job_id, cfg.method, cfg.dataset.name, cfg.seed,
                      (rec.get("error") or {}).get("message", str(exc))[:500])
            records.append(rec)
    return records


# =========================================================================== suites


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> dict:
    """A named suite: bench/suites/<name>.yaml (or a path to a YAML file of the same form)."""
    from bench.config import list_cards
    from methods import METHODS

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_DIR / f"{name}.yaml"
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(name, list_suites(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown suite {name!r}; known suites: {', '.join(list_suites())} "
                          f"(files in {SUITES_DIR}).{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"suite file {path} must be a mapping with keys {', '.join(SUITE_KEYS)}")
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"suite file {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SUITE_KEYS)}")
    for key in ("methods", "datasets", "seeds"):
        if key not in data:
            raise ConfigError(f"suite file {path} is missing {key!r} (a list)")
    methods = data["methods"]
    if methods == "all":
        methods = METHODS.names()
    suite = {
        "name": path.stem,
        "path": str(path),
        "description": str(data.get("description") or ""),
        "methods": _str_list(methods, "methods", path),
        "datasets": _str_list(data["datasets"], "datasets", path),
        "seeds": _seed_list(data["seeds"], f"suite file {path}: seeds"),
        "preset": str(data["preset"]) if data.get("preset") else None,
        "overrides": _str_list(data.get("overrides") or [], "overrides", path),
        "launcher": data.get("launcher") or {},
    }
    if not isinstance(suite["launcher"], dict):
        raise ConfigError(f"suite file {path}: launcher must be a mapping of launcher settings (name, partition, ...)")
    for m in suite["methods"]:
        try:
            METHODS.check(m)
        except BenchError as exc:
            raise ConfigError(f"suite file {path}: {exc}") from None
    cards = list_cards()
    for d in suite["datasets"]:
        if d not in cards:
            raise ConfigError(f"suite file {path}: unknown dataset {d!r}; known datasets: {', '.join(cards)}")
    for o in suite["overrides"]:
        if "=" not in o:
            raise ConfigError(f"suite file {path}: override {o!r} is not of the form key=value")
    return suite


def _str_list(value: Any, key: str, path: Path) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f"suite file {path}: {key} must be a list of names, got {value!r}")
    return [str(v) for v in value]


def _seed_list(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of integers >= 0, got {value!r}")
    out = []
    for v in value:
        try:
            s = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {v!r} is not an integer") from None
        if s < 0 or str(v).strip() != str(s):
            raise ConfigError(f"{where}: {v!r} is not an integer >= 0")
        out.append(s)
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: a seed is listed twice ({value})")
    return out


# =========================================================================== sweep planning


def split_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def parse_bool(value: str | None, key: str, default: bool = False) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}={value!r}: expected true or false")


def pop_options(args: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Take `key=value` items whose key is in `keys` out of `args`."""
    found: dict[str, str] = {}
    rest: list[str] = []
    for a in args:
        key, sep, value = a.partition("=")
        if sep and key.strip() in keys:
            found[key.strip()] = value.strip()
        else:
            rest.append(a)
    return found, rest


@dataclass
class PlannedRun:
    method: str
    dataset: str
    seed: int
    cfg: DictConfig
    config_hash: str
    run_id: str
    run_dir: Path
    previous_status: str | None = None
    skip_reason: str | None = None
    job_id: str | None = None
    paths: dict = field(default_factory=dict)

    def entry(self) -> dict:
        out = {"job_id": self.job_id, "method": self.method, "dataset": self.dataset, "seed": self.seed,
               "run_id": self.run_id, "run_dir": str(self.run_dir.resolve()), "config_hash": self.config_hash}
        out.update(self.paths)
        if self.skip_reason:
            out["reason"] = self.skip_reason
        if self.previous_status:
            out["previous_status"] = self.previous_status
        return out


def _method_nodes(method: str) -> set[str]:
    from methods import METHODS

    try:
        cls = METHODS.get(method)
    except ImportError as exc:
        raise ConfigError(f"method {method!r} cannot be imported ({exc})") from exc
    return set(cls.config_nodes())


def scoped_overrides(overrides: list[str], method: str, methods: list[str]) -> list[str]:
    """The overrides that apply to `method`: a key under another method's own node (byol.epochs=3 in a
    sweep of kmeans and byol) reaches only the methods that have that node; every other key reaches all."""
    mine = _method_nodes(method)
    others = set().union(*(_method_nodes(m) for m in methods)) - mine
    out = []
    for o in overrides:
        top = o.partition("=")[0].strip().lstrip("+").split(".")[0]
        if top in others:
            continue
        out.append(o)
    return out


def plan_sweep(methods: list[str], datasets: list[str], seeds: list[int], overrides: list[str],
               preset: str | None = None, force: bool = False) -> list[PlannedRun]:
    """Compose every run of the grid (a bad key or value fails here, before anything is submitted)."""
    from bench import store
    from bench.config import compose, config_hash

    if not methods or not datasets or not seeds:
        raise ConfigError("a sweep needs at least one method, one dataset and one seed "
                          f"(got methods={methods}, datasets={datasets}, seeds={seeds})")
    plan: list[PlannedRun] = []
    for method in methods:
        scoped = scoped_overrides(overrides, method, methods)
        for dataset in datasets:
            sel = [f"method={method}", f"dataset={dataset}"] + ([f"preset={preset}"] if preset else [])
            for seed in seeds:
                try:
                    cfg = compose([*sel, *scoped, f"seed={seed}"])
                except ImportError as exc:
                    raise ConfigError(f"method {method!r} cannot be imported ({exc})") from exc
                except BenchError as exc:
                    raise ConfigError(f"{method} on {dataset} seed {seed}: {exc}") from exc
                h = config_hash(cfg)
                rid = store.run_id(seed, h, cfg.tag)
                folder = store.run_dir(cfg.results_dir, method, dataset, rid)
                run = PlannedRun(method, dataset, seed, cfg, h, rid, folder)
                try:
                    rec = store.read_record(folder)
                except BenchError:
                    rec = None
                if rec:
                    run.previous_status = rec.get("status")
                    if rec.get("status") == "completed" and rec.get("config_hash") == h and not force:
                        run.skip_reason = "completed"
                plan.append(run)
    return plan


def _mark_active_elsewhere(plan: list[PlannedRun], results_dir: Path) -> None:
    """Runs still queued or running from an earlier sweep are not submitted twice."""
    wanted = {str(r.run_dir.resolve()): r for r in plan if r.skip_reason is None}
    if not wanted:
        return
    holders: dict[str, tuple[str, str, str]] = {}
    for m in load_manifests(results_dir):
        if m.get("cancelled"):
            continue
        for e in m.get("runs", []):
            if e.get("job_id") and e.get("run_dir") in wanted:
                holders[e["run_dir"]] = (str(e["job_id"]), m["sweep_id"], m.get("launcher", "slurm"))
    if not holders:
        return
    slurm_ids = [j for j, _, launcher in holders.values() if launcher == "slurm"]
    states = slurm_states(slurm_ids) if slurm_ids else {}
    for run_dir, (job_id, sweep_id, launcher) in holders.items():
        if launcher == "slurm":
            active = states.get(job_id, "") in ACTIVE_STATES
        elif launcher == "local":
            active = _pid_alive(job_id)
        else:
            active = False
        if active:
            wanted[run_dir].skip_reason = f"already queued as job {job_id} of sweep {sweep_id}"


# =========================================================================== manifests


def sweeps_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "sweeps"


def new_sweep_id(results_dir: str | os.PathLike, label: str) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "sweep"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    sid, n = base, 1
    while (sweeps_dir(results_dir) / f"{sid}.json").exists():
        n += 1
        sid = f"{base}-{n}"
    return sid


def write_manifest(results_dir: str | os.PathLike, manifest: dict) -> Path:
    from bench.io import atomic_write_json

    path = sweeps_dir(results_dir) / f"{manifest['sweep_id']}.json"
    atomic_write_json(path, manifest)
    return path


def load_manifests(results_dir: str | os.PathLike) -> list[dict]:
    """Every readable sweep manifest, oldest first; a damaged one is reported and left out."""
    from bench.io import read_json

    out = []
    for path in sorted(sweeps_dir(results_dir).glob("*.json")):
        try:
            m = read_json(path)
        except (BenchError, OSError) as exc:
            log.warning("skipping unreadable sweep manifest: %s", exc)
            continue
        if not isinstance(m, dict) or "sweep_id" not in m or not isinstance(m.get("runs"), list):
            log.warning("skipping %s: not a sweep manifest (no sweep_id or runs)", path)
            continue
        m["_path"] = str(path)
        out.append(m)
    out.sort(key=lambda m: (m.get("created", ""), m["sweep_id"]))
    return out


def find_manifest(results_dir: str | os.PathLike, sweep: str | None) -> dict:
    manifests = load_manifests(results_dir)
    if not manifests:
        raise BenchError(f"no sweeps under {sweeps_dir(results_dir)}; start one with `python -m bench sweep ...`"
                         + ("" if str(results_dir) == "results" else f" results_dir={results_dir}"))
    if not sweep or sweep == "latest":
        return manifests[-1]
    exact = [m for m in manifests if m["sweep_id"] == sweep]
    if exact:
        return exact[0]
    partial = [m for m in manifests if sweep in m["sweep_id"]]
    if len(partial) == 1:
        return partial[0]
    known = ", ".join(m["sweep_id"] for m in manifests[-10:])
    what = "matches several sweeps" if partial else "matches no sweep"
    raise BenchError(f"sweep={sweep!r} {what} under {sweeps_dir(results_dir)}; recent sweeps: {known}")


# =========================================================================== job states


def _run_cmd(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def _expand_array_id(jid: str) -> list[str]:
    """'12_[0-3,5%2]' -> ['12_0', '12_1', '12_2', '12_3', '12_5']; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        if a.isdigit() and (not b or b.isdigit()):
            out.extend(f"{base}_{i}" for i in range(int(a), int(b or a) + 1))
    return out


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job id (e.g. '12_3' -> 'RUNNING'), from sacct, else squeue; missing when unknown."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    states: dict[str, str] = {}
    res = _run_cmd(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)])
    if res is not None and res.returncode == 0:
        for line in res.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            for j in _expand_array_id(jid):
                states[j] = state.split()[0] if state else "UNKNOWN"
    # squeue knows the live state of queued jobs (sacct may lag, or be missing without accounting)
    res = _run_cmd(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)])
    if res is not None and res.returncode == 0:
        for line in res.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            for j in _expand_array_id(jid):
                if state:
                    states[j] = state.split()[0]
    return {j: states[j] for j in ids if j in states}


def _pid_alive(job_id: str) -> bool:
    """Is the local job (submitit's controller process, whose pid is the job id) still running?"""
    try:
        pid = int(job_id)
    except (TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # not ours: a pid reused by another user's process
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc to look closer
    try:  # a finished child that nobody waited for is a zombie; a reused pid runs something else
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return b"submitit" in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def run_states(manifest: dict) -> list[dict]:
    """One row per run of the sweep: its job, the launcher's state of that job, and what its record says."""
    from bench import store

    launcher = manifest.get("launcher", "slurm")
    entries = manifest.get("runs", [])
    ids = [str(e["job_id"]) for e in entries if e.get("job_id")]
    sl = slurm_states(ids) if launcher == "slurm" else {}
    rows = []
    for e in entries:
        job_id = str(e["job_id"]) if e.get("job_id") else None
        try:
            rec = store.read_record(e["run_dir"])
        except BenchError as exc:
            rec = {"status": "unreadable", "error": {"message": str(exc)}}
        rec_status = (rec or {}).get("status")
        if launcher == "slurm":
            job_state = sl.get(job_id, "") if job_id else ""
        elif launcher == "local" and job_id:
            job_state = "RUNNING" if _pid_alive(job_id) else "ENDED"
        else:
            job_state = ""
        rows.append({
            **{k: e.get(k) for k in ("job_id", "method", "dataset", "seed", "run_dir", "stdout", "stderr")},
            "job_state": job_state or None,
            "record_status": rec_status,
            "state": combined_state(job_state, rec_status, cancelled=bool(manifest.get("cancelled")),
                                    error_type=((rec or {}).get("error") or {}).get("type"),
                                    written_by_this_job=bool(job_id) and job_id in _record_job_ids(rec)),
            "requeues": (rec or {}).get("requeues"),
            "metrics": (rec or {}).get("metrics"),
            "error": ((rec or {}).get("error") or {}).get("message"),
        })
    return rows


def _record_job_ids(rec: dict | None) -> set[str]:
    """The SLURM ids under which the job that wrote `rec` ran: '<array>_<task>' and its own id."""
    sl = (rec or {}).get("slurm") or {}
    out = {str(sl["job_id"])} if sl.get("job_id") else set()
    if sl.get("array_job_id") and sl.get("array_task_id") is not None:
        out.add(f"{sl['array_job_id']}_{sl['array_task_id']}")
    return out


def combined_state(job_state: str, rec_status: str | None, cancelled: bool = False,
                   error_type: str | None = None, written_by_this_job: bool = False) -> str:
    """completed | failed | diverged | cancelled | timeout | pending | running | requeued | missing | unknown.

    The record says how the run went; the launcher's state says whether its job still lives.  A job
    still listed as running whose own record says it failed (not stopped by a signal) is only ending.
    """
    if rec_status == "completed":
        return "completed"
    js = (job_state or "").upper()
    if js in ("RUNNING", "COMPLETING") and written_by_this_job and rec_status in ("failed", "diverged") \
            and error_type not in STOP_ERRORS:
        return rec_status
    if js in ACTIVE_STATES:
        if js.startswith("REQUEUE"):
            return "requeued"
        return "pending" if js in ("PENDING", "CONFIGURING") else "running"
    if js == "CANCELLED" or error_type == "Cancelled" or (cancelled and rec_status in (None, "running")):
        return "cancelled"
    if rec_status in ("failed", "diverged"):
        return rec_status
    if js in ("TIMEOUT", "DEADLINE"):
        return "timeout"
    if js in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED"):
        return "failed"
    if js in ("COMPLETED", "ENDED"):
        # the job ended but the run did not record completion (killed, or failed before writing)
        return "failed" if rec_status else "missing"
    if rec_status == "running":
        return "running" if not js else "unknown"
    return rec_status or ("unknown" if js else "missing")


# =========================================================================== commands

SWEEP_OPTIONS = ("suite", "methods", "datasets", "seeds", "launcher", "force", "wait", "dry_run", "sweep_id", "name")


def sweep_command(args: list[str]) -> int:
    """python -m bench sweep methods=[..] datasets=[..] seeds=[..] [suite=paper] [launcher=slurm] [key=value ...]

    Options: suite=<name> (bench/suites/<name>.yaml; methods/datasets/seeds given here replace the suite's),
    launcher=debug|local|slurm, force=true (rerun completed runs), wait=true (slurm: wait for the jobs),
    dry_run=true (print the plan only), name=<label> (part of the sweep id). Other key=value arguments
    override the config of every run (a key under one method's own node, byol.epochs=3, reaches only it).
    """
    if any(a in ("-h", "--help", "help") for a in args):
        print(sweep_command.__doc__)
        return 0
    opts, overrides = pop_options(args, SWEEP_OPTIONS)
    for bad in ("method", "dataset", "seed"):
        if any(o.partition("=")[0].strip() == bad for o in overrides):
            raise ConfigError(f"sweep takes {bad}s=[...] (a list), not {bad}=")
    suite = load_suite(opts["suite"]) if opts.get("suite") else None
    methods = split_list(opts["methods"]) if "methods" in opts else (suite["methods"] if suite else [])
    datasets = split_list(opts["datasets"]) if "datasets" in opts else (suite["datasets"] if suite else ["digits"])
    seeds = (_seed_list(split_list(opts["seeds"]), "seeds") if "seeds" in opts
             else (suite["seeds"] if suite else [0, 1, 2]))
    if methods == ["all"]:
        from methods import METHODS

        methods = METHODS.names()
    if not methods:
        raise ConfigError("no methods: give methods=[m1,m2,...] or suite=<name> (suites: "
                          f"{', '.join(list_suites())})")
    full: list[str] = []
    preset = None
    if suite:
        preset = suite["preset"]
        full += [f"launcher.{k}={_dot_value(v)}" for k, v in suite["launcher"].items()]
        full += suite["overrides"]
    if opts.get("launcher"):
        full.append(f"launcher.name={opts['launcher']}")
    preset_args = [o for o in overrides if o.partition("=")[0].strip() == "preset"]
    if preset_args:
        preset = preset_args[-1].partition("=")[2].strip()
        overrides = [o for o in overrides if o not in preset_args]
    full += overrides
    force = parse_bool(opts.get("force"), "force")
    wait = parse_bool(opts.get("wait"), "wait")
    dry_run = parse_bool(opts.get("dry_run"), "dry_run")

    plan = plan_sweep(methods, datasets, seeds, full, preset=preset, force=force)
    first = plan[0].cfg
    results_dir = Path(first.results_dir)
    if len({str(r.cfg.results_dir) for r in plan}) > 1:
        raise ConfigError("every run of a sweep must write to the same results_dir")
    launcher = str(first.launcher.name)
    if not force:
        _mark_active_elsewhere(plan, results_dir)
    todo = [r for r in plan if r.skip_reason is None]
    skipped = [r for r in plan if r.skip_reason is not None]
    n_done = sum(1 for r in skipped if r.skip_reason == "completed")
    n_queued = len(skipped) - n_done
    grid = f"{len(methods)} method(s) x {len(datasets)} dataset(s) x {len(seeds)} seed(s) = {len(plan)} run(s)"
    print(f"sweep: {grid}; {n_done} already completed, {n_queued} already queued, {len(todo)} to run"
          + (f" (suite {suite['name']})" if suite else ""))
    if dry_run:
        for r in plan:
            print(f"  {'run ' if r.skip_reason is None else 'skip'} {r.method:8s} {r.dataset:14s} seed {r.seed}  "
                  f"{r.run_dir}" + (f"  ({r.skip_reason})" if r.skip_reason else ""))
        return 0
    if not todo:
        print("nothing to submit: every run is already completed or queued"
              + (" (force=true runs them again)" if n_done else ""))
        return 0

    label = opts.get("name") or opts.get("sweep_id") or (suite["name"] if suite else "sweep")
    sid = new_sweep_id(results_dir, label)
    folder = Path(first.launcher.folder or results_dir / "submitit").resolve() / sid
    manifest = {
        "sweep_id": sid,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "launcher": launcher,
        "suite": suite["name"] if suite else None,
        "methods": methods,
        "datasets": datasets,
        "seeds": seeds,
        "overrides": full,
        "force": force,
        "cwd": os.getcwd(),
        "results_dir": str(results_dir.resolve()),
        "submitit_folder": str(folder),
        "slurm_conf": os.environ.get("SLURM_CONF"),
        "array_job_ids": [],
        "cancelled": None,
        "runs": [r.entry() for r in todo],
        "skipped": [r.entry() for r in skipped],
    }
    if launcher == "slurm":
        return _submit_slurm(todo, manifest, results_dir, folder, force, wait)
    return _run_here(todo, manifest, results_dir, folder, force, launcher)


def _dot_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        import json

        return json.dumps(v)
    return str(v)


def _launcher_key(cfg: DictConfig) -> str:
    import json

    from bench.config import to_container

    return json.dumps(to_container(cfg.launcher), sort_keys=True)


def _submit_slurm(todo: list[PlannedRun], manifest: dict, results_dir: Path, folder: Path, force: bool,
                  wait: bool) -> int:
    from bench.config import to_container

    if shutil.which("sbatch") is None:
        raise BenchError("launcher=slurm but there is no `sbatch` on PATH: run on a SLURM login node, "
                         "or use launcher=local")
    groups: dict[str, list[PlannedRun]] = {}
    for r in todo:
        groups.setdefault(_launcher_key(r.cfg), []).append(r)
    jobs = []
    try:
        with outside_job_env():
            for runs in groups.values():
                ex = make_executor(runs[0].cfg, folder / "%j")
                ex.update_parameters(name=f"bench-{manifest['sweep_id']}")
                with ex.batch():
                    submitted = [ex.submit(RunJob(to_container(r.cfg), force)) for r in runs]
                for r, job in zip(runs, submitted):
                    r.job_id = str(job.job_id)
                    r.paths = {"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
                    jobs.append((job, r))
                manifest["array_job_ids"].append(str(submitted[0].job_id).split("_")[0])
    except Exception as exc:
        if jobs:  # what went out is recorded, so `status` and `cancel` still reach it
            manifest["runs"] = [r.entry() for r in todo]
            manifest["submit_error"] = f"{type(exc).__name__}: {exc}"
            write_manifest(results_dir, manifest)
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"submitting to SLURM failed: {type(exc).__name__}: {str(exc).strip()[-1500:]}") from exc
    manifest["runs"] = [r.entry() for r in todo]
    path = write_manifest(results_dir, manifest)
    arrays = ", ".join(manifest["array_job_ids"])
    sid = manifest["sweep_id"]
    rd = "" if str(results_dir) == "results" else f" results_dir={results_dir}"
    print(f"sweep {sid}: submitted {len(todo)} run(s) as SLURM job array {arrays}")
    print(f"  manifest: {path}")
    print(f"  status:   python -m bench status sweep={sid}{rd}")
    print(f"  cancel:   python -m bench cancel sweep={sid}{rd}")
    if not wait:
        return 0
    records = _wait([j for j, _ in jobs], [r.cfg for _, r in jobs])
    return _print_records(records)


def _run_here(todo: list[PlannedRun], manifest: dict, results_dir: Path, folder: Path, force: bool,
              launcher: str) -> int:
    """debug: in this process; local: subprocesses, launcher.local_parallelism at a time. Both wait."""
    from bench.config import to_container
    from bench.runner import execute

    write_manifest(results_dir, manifest)
    print(f"sweep {manifest['sweep_id']}: running {len(todo)} run(s) with launcher={launcher}")
    records: list[dict] = []
    if launcher == "debug":
        for i, r in enumerate(todo):
            r.job_id = f"debug-{i}"
            manifest["runs"] = [x.entry() for x in todo]
            write_manifest(results_dir, manifest)
            try:
                records.append(execute(r.cfg, force=force))
            except Exception as exc:
                log.error("%s on %s seed %s failed: %s", r.method, r.dataset, r.seed, exc)
                records.append(_failed_record(r, exc))
        return _print_records(records)
    par = max(1, int(todo[0].cfg.launcher.local_parallelism))
    with outside_job_env():
        for i in range(0, len(todo), par):
            batch = todo[i : i + par]
            ex = make_executor(batch[0].cfg, folder / "%j")
            jobs = [ex.submit(RunJob(to_container(r.cfg), force)) for r in batch]
            for r, job in zip(batch, jobs):
                r.job_id = str(job.job_id)
                r.paths = {"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
            manifest["runs"] = [x.entry() for x in todo]
            write_manifest(results_dir, manifest)
            records.extend(_wait(jobs, [r.cfg for r in batch]))
    return _print_records(records)


def _failed_record(r: PlannedRun, exc: BaseException) -> dict:
    from bench import store

    try:
        rec = store.read_record(r.run_dir)
    except BenchError:
        rec = None
    if rec and rec.get("status") == "failed":
        return rec
    return {"method": r.method, "dataset": r.dataset, "seed": r.seed, "status": "failed",
            "error": {"type": type(exc).__name__, "message": str(exc)}}


def _print_records(records: list[dict]) -> int:
    from bench.table import print_summary

    print()
    print_summary(records)
    return 1 if any(r.get("status") != "completed" for r in records) else 0


STATUS_OPTIONS = ("sweep", "results_dir", "json", "all")


def status_command(args: list[str]) -> int:
    """python -m bench status [sweep=<id>|latest|all] [results_dir=results] [json=true]

    One line per run of the sweep (the latest by default): its job id, state, requeues, metrics or error.
    States: completed, running, pending, requeued, failed, diverged, cancelled, timeout, missing (no record
    and the job is gone).  sweep=all: one line per sweep.
    """
    if any(a in ("-h", "--help", "help") for a in args):
        print(status_command.__doc__)
        return 0
    opts, rest = pop_options(args, STATUS_OPTIONS)
    if rest:
        raise ConfigError(f"status takes {', '.join(k + '=' for k in STATUS_OPTIONS)}; got {' '.join(rest)}")
    results_dir = opts.get("results_dir", "results")
    as_json = parse_bool(opts.get("json"), "json")
    if opts.get("sweep") == "all" or parse_bool(opts.get("all"), "all"):
        return _status_all(results_dir, as_json)
    m = find_manifest(results_dir, opts.get("sweep"))
    rows = run_states(m)
    if as_json:
        import json

        print(json.dumps({"sweep_id": m["sweep_id"], "launcher": m.get("launcher"), "cancelled": m.get("cancelled"),
                          "runs": rows, "skipped": m.get("skipped", [])}, indent=2, default=str))
        return 0
    _print_status(m, rows)
    return 0


def _counts(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    order = ["completed", "running", "requeued", "pending", "failed", "diverged", "timeout", "cancelled", "missing",
             "unknown"]
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: order.index(s) if s in order else 99))


def _print_status(m: dict, rows: list[dict]) -> None:
    from tabulate import tabulate

    head = f"sweep {m['sweep_id']} ({m.get('launcher')}"
    if m.get("array_job_ids"):
        head += f", job array {', '.join(m['array_job_ids'])}"
    head += f", created {m.get('created')})"
    if m.get("cancelled"):
        head += f"  CANCELLED {m['cancelled']}"
    print(head)
    table = []
    for r in rows:
        met = r.get("metrics") or {}
        note = ""
        if r["state"] in ("failed", "diverged", "timeout", "missing") or (r["state"] == "cancelled" and r.get("error")):
            note = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            note = note[0][:90]
            if "timed-out too many times" in note:
                note = "timed out on every requeue: raise launcher.timeout_min or launcher.max_num_timeout"
            if not note and r.get("stderr"):
                note = f"see {r['stderr']}"
        table.append([r.get("job_id") or "-", r["method"], r["dataset"], r["seed"], r["state"],
                      r.get("requeues") if r.get("requeues") is not None else "-",
                      f"{100 * met['nmi']:.1f}" if met.get("nmi") is not None else "",
                      f"{100 * met['acc']:.1f}" if met.get("acc") is not None else "", note])
    print(tabulate(table, headers=["job", "method", "dataset", "seed", "state", "requeues", "NMI %", "ACC %", "note"],
                   tablefmt="simple", disable_numparse=True))
    skipped = m.get("skipped") or []
    tail = f"{len(rows)} run(s): {_counts(rows)}"
    if skipped:
        tail += f"; {len(skipped)} skipped at submission (already completed or queued)"
    print(tail)
    if m.get("submit_error"):
        print(f"warning: submission stopped part way: {m['submit_error']}")


def _status_all(results_dir: str, as_json: bool) -> int:
    manifests = load_manifests(results_dir)
    out = []
    for m in manifests:
        rows = run_states(m)
        out.append({"sweep_id": m["sweep_id"], "created": m.get("created"), "launcher": m.get("launcher"),
                    "runs": len(rows), "states": _counts(rows), "cancelled": m.get("cancelled")})
    if as_json:
        import json

        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print(f"no sweeps under {sweeps_dir(results_dir)}")
        return 0
    for s in out:
        print(f"{s['sweep_id']:40s} {s['launcher']:6s} {s['runs']:4d} run(s): {s['states']}"
              + ("  (cancelled)" if s["cancelled"] else ""))
    return 0


CANCEL_OPTIONS = ("sweep", "results_dir")


def cancel_command(args: list[str]) -> int:
    """python -m bench cancel [sweep=<id>|latest] [results_dir=results]

    Cancels the sweep's jobs that are still queued or running (scancel for slurm, a signal for local);
    the records of runs it stopped say status failed, error Cancelled.  A relaunch reruns them.
    """
    if any(a in ("-h", "--help", "help") for a in args):
        print(cancel_command.__doc__)
        return 0
    opts, rest = pop_options(args, CANCEL_OPTIONS)
    if rest:
        raise ConfigError(f"cancel takes {', '.join(k + '=' for k in CANCEL_OPTIONS)}; got {' '.join(rest)}")
    results_dir = opts.get("results_dir", "results")
    m = find_manifest(results_dir, opts.get("sweep"))
    n = cancel_sweep(m, results_dir)
    print(f"sweep {m['sweep_id']}: cancelled {n} job(s) still queued or running")
    rows = run_states(m)
    print(f"{len(rows)} run(s): {_counts(rows)}")
    return 0


def cancel_sweep(m: dict, results_dir: str | os.PathLike, settle_s: float = 20.0) -> int:
    """Stop the sweep's live jobs, wait for them to end, and mark the runs they interrupted."""
    launcher = m.get("launcher", "slurm")
    entries = [e for e in m.get("runs", []) if e.get("job_id")]
    live: list[str] = []
    if launcher == "slurm":
        states = slurm_states([str(e["job_id"]) for e in entries])
        live = [str(e["job_id"]) for e in entries if states.get(str(e["job_id"]), "PENDING") in ACTIVE_STATES]
        if live:
            arrays = m.get("array_job_ids") or sorted({j.split("_")[0] for j in live})
            res = _run_cmd(["scancel", *arrays])
            if res is None:
                raise BenchError("cannot cancel: there is no `scancel` on PATH (run this where the jobs were submitted)")
            if res.returncode != 0 and "already completing or completed" not in res.stderr \
                    and "Invalid job id" not in res.stderr:
                raise BenchError(f"scancel {' '.join(arrays)} failed: {res.stderr.strip()}")
            deadline = time.time() + settle_s
            while time.time() < deadline:
                states = slurm_states(live)
                if not any(states.get(j, "") in ACTIVE_STATES for j in live):
                    break
                time.sleep(0.5)
    elif launcher == "local":
        live = [str(e["job_id"]) for e in entries if _pid_alive(str(e["job_id"]))]
        for j in live:
            with contextlib.suppress(OSError):
                os.kill(int(j), signal.SIGINT)
        deadline = time.time() + settle_s
        while time.time() < deadline and any(_pid_alive(j) for j in live):
            time.sleep(0.2)
        for j in live:
            if _pid_alive(j):
                with contextlib.suppress(OSError):
                    os.kill(int(j), signal.SIGKILL)
    _mark_cancelled(m, {e["run_dir"] for e in entries if str(e["job_id"]) in live})
    m = {k: v for k, v in m.items() if k != "_path"}
    m["cancelled"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(results_dir, m)
    return len(live)


def _mark_cancelled(m: dict, run_dirs: set[str]) -> None:
    from bench import store

    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for run_dir in run_dirs:
        try:
            rec = store.read_record(run_dir)
        except BenchError:
            continue
        if not rec or rec.get("status") not in ("running", "failed"):
            continue
        err = rec.get("error") or {}
        stopped = err.get("type") in STOP_ERRORS or err.get("message") in (None, "interrupted")
        if rec.get("status") == "failed" and not stopped:
            continue  # it had failed on its own before the cancel
        rec["status"] = "failed"
        rec["error"] = {"type": "Cancelled", "message": f"cancelled with `python -m bench cancel` "
                                                        f"(sweep {m['sweep_id']}) at {when}"}
        store.write_record(run_dir, rec)
