"""`python run.py CONFIG --launcher ray --num-workers N`: the same training job under Ray Train's TorchTrainer.

Ray starts one worker per GPU (or CPU workers over gloo), initialises torch.distributed in each and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR... Each worker then runs the job's processes exactly as a process started by
`accelerate launch` would: toolkit.dist.Runtime builds accelerate's Accelerator on top of Ray's process group (it
is told so by dist.LAUNCHER_ENV, and then leaves the group for Ray to destroy), so sharding, the one writer, checkpoints
and resume are the trainer's own. What Ray adds:

- every complete training state (`<run folder>/state/<step>`) is reported with `ray.train.report` as a Checkpoint
  and copied by Ray to `<storage_path>/<run name>/checkpoint_*` (storage_path may be a shared folder or a URI);
- a Ray run is named after the run folder, so a restarted launch finds its checkpoints: a worker whose run folder
  lost its states (another node, a wiped disk) resumes from Ray's newest checkpoint; one with states of its own
  continues from those (they are at least as new). `--fresh` starts a new run folder and so a new Ray run.

Ray is optional (requirements-ray.txt); nothing here imports it before a Ray launch is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from toolkit.errors import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "pip install -r requirements-ray.txt"
# Driver environment handed to the workers (a remote cluster's workers do not inherit it). Secrets are not: a
# worker reads HF_TOKEN from its own environment or the .env beside the code, like run.py.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TOKENIZERS_PARALLELISM", "KONTEXT_CPU_THREADS",
                 "KONTEXT_COLLECTIVE_TIMEOUT_MIN", "OMP_NUM_THREADS")


class RayMissingError(UserError):
    """`--launcher ray` without ray installed."""


@dataclass(frozen=True)
class RayOptions:
    num_workers: int
    use_gpu: bool = False
    address: Optional[str] = None  # None: a local Ray instance (or the one this process already joined)
    storage_path: Optional[str] = None  # None: <training_folder>/ray_checkpoints of the job's first training process
    max_failures: int = 0  # worker group restarts (from the newest checkpoint) before the launch fails


def require_ray():
    """The ray module, or a RayMissingError that says how to install it."""
    try:
        import ray
        import ray.train.torch  # noqa: F401  (ray without its train extra fails here)
    except ImportError as exc:
        raise RayMissingError(f"--launcher ray needs Ray Train, which is not installed ({exc}); install it with "
                              f"`{INSTALL_HINT}` (in this environment), or train with accelerate "
                              "(./run_distributed_training.sh)") from exc
    return ray


def runtime_env(extra: Optional[dict] = None) -> dict:
    """What every worker process needs: this repository importable, the forwarded variables."""
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env_vars = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
                **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    extra = dict(extra or {})
    env_vars.update(extra.pop("env_vars", {}))
    return {"env_vars": env_vars, **extra}


def connect(address: Optional[str] = None, extra_runtime_env: Optional[dict] = None, **init_kwargs) -> bool:
    """Join the cluster at `address` ("auto", HOST:PORT, ray://...) or start a local instance; reuse a session
    this process already has. Returns whether this call started the session (the caller then shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, runtime_env=runtime_env(extra_runtime_env), **init_kwargs)
    except ConnectionError as exc:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster ({exc}); start one with "
                        "`ray start --head`, or leave --address out for a local instance") from exc
    return True


# -- the driver -----------------------------------------------------------------------------------------------
def launch(job: Any, options: RayOptions, fresh: bool = False) -> Any:
    """Run `job` (a jobs.ExtensionJob, models not loaded) on `options.num_workers` Ray workers; returns Ray's Result.
    Config problems are raised here, before Ray starts."""
    first = _first_trainer(job)
    check_launch(job, options, fresh)
    from toolkit.state.checkpoint import resolve_run_folder

    training_folder = Path(first.cfg.training_folder).resolve()
    run_folder, run_name = resolve_run_folder(training_folder, first.name, fresh)
    if fresh:
        # Made here, so that every worker (and a worker group Ray restarts) resolves to it without --fresh.
        run_folder.mkdir(parents=True, exist_ok=True)
    storage = options.storage_path or str(training_folder / "ray_checkpoints")
    started = connect(options.address)
    try:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        spec = {"job_class": type(job), "job_config": job.config, "config_file": _config_file(job),
                "cwd": os.getcwd(), "num_workers": options.num_workers}
        trainer = TorchTrainer(
            functools.partial(_worker_main, spec),  # not train_loop_config: Ray exports that to its dashboard
            scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu),
            run_config=RunConfig(name=run_name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=options.max_failures),
                                 checkpoint_config=CheckpointConfig(
                                     num_to_keep=max(1, first.cfg.save.max_step_saves_to_keep))))
        log.info("Ray: %d %s worker(s), run %s, checkpoints in %s/%s", options.num_workers,
                 "GPU" if options.use_gpu else "CPU", run_name, storage, run_name)
        return _fit(trainer)
    finally:
        if started:
            import ray

            ray.shutdown()


def check_launch(job: Any, options: RayOptions, fresh: bool) -> None:
    if options.num_workers < 1:
        raise UserError(f"--num-workers must be at least 1, got {options.num_workers}")
    if options.max_failures < 0:
        raise UserError(f"--max-failures must be 0 or more, got {options.max_failures}")
    for i, process in enumerate(job.processes):
        train = getattr(process, "train", None)
        if train is not None and options.num_workers > 1 and not train.distributed_training:
            raise UserError(f"config.process[{i}].train.distributed_training must be true for --launcher ray "
                            f"with {options.num_workers} workers (or use --num-workers 1)")
        if train is not None and fresh and train.resume_from == "latest":
            raise UserError(f"--fresh starts a new run but config.process[{i}].train.resume_from is 'latest': "
                            "drop one of them")
    for i, process in enumerate(job.processes):
        device = getattr(process.cfg, "device", "auto")
        if device.startswith("cuda") and not options.use_gpu:
            raise UserError(f"config.process[{i}].device is {device} but --use-gpu is not given: Ray would start "
                            "CPU workers; add --use-gpu (one worker per GPU) or set device: cpu")
        if device == "cpu" and options.use_gpu:
            raise UserError(f"config.process[{i}].device is cpu but --use-gpu reserves a GPU per worker: set "
                            "device: auto (or cuda), or leave --use-gpu out")


def _first_trainer(job: Any) -> Any:
    for process in job.processes:
        if hasattr(process, "train"):
            return process
    raise UserError("--launcher ray runs training processes (type: sd_trainer); this config has none")


def _config_file(job: Any) -> Optional[Path]:
    file = getattr(job.processes[0], "config_file", None)
    return Path(file).resolve() if file else None


def _fit(trainer: Any) -> Any:
    """trainer.fit(); a user error on a worker (bad dataset, unusable state) comes back as that UserError."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        failures = getattr(exc, "worker_failures", {}) or {}
        for rank in sorted(failures):
            cause = _user_error(failures[rank])
            if cause is not None:
                raise UserError(f"Ray worker {rank}: {cause}") from exc
        raise


def _user_error(exc: BaseException) -> Optional[BaseException]:
    while exc is not None:  # Ray may wrap the worker's exception (RayTaskError...)
        if isinstance(exc, UserError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


# -- inside each worker ---------------------------------------------------------------------------------------
def _worker_main(spec: dict) -> None:
    """A Ray Train worker: the job's processes as under accelerate (same Runtime, same trainer)."""
    import ray.train

    from toolkit.dist import EXPECTED_WORLD_SIZE_ENV, LAUNCHER_ENV

    os.environ[LAUNCHER_ENV] = "ray"  # Runtime: Ray owns the process group; report checkpoints to Ray
    os.environ[EXPECTED_WORLD_SIZE_ENV] = str(spec["num_workers"])
    if Path(spec["cwd"]).is_dir():  # relative paths in the config mean the same on every node
        os.chdir(spec["cwd"])
    _worker_logging()
    job = spec["job_class"](spec["job_config"], spec["config_file"])  # never fresh: launch() made the folder
    with _checkpoint_dir(ray.train.get_checkpoint()) as state:
        if state is not None:
            adopt_state(job.processes, state)
        job.run()


@contextlib.contextmanager
def _checkpoint_dir(checkpoint: Any) -> Iterator[Optional[Path]]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:  # a local folder as it is, a remote one downloaded
        yield Path(folder)


def adopt_state(processes: list, state: Path) -> Optional[Any]:
    """Let the training process whose config made `state` resume from it when its run folder has no state of its
    own (train_state.plan_resume prefers the run folder's). Returns that process, or None (with a warning)."""
    from toolkit.state import train_state

    problem = train_state.check_state(state)
    if problem is not None:
        log.warning("Ray checkpoint %s is not usable (%s): not resuming from it", state, problem)
        return None
    saved = train_state.read_info(state).get("config_hash")
    for process in processes:
        train = getattr(process, "train", None)
        if train is None or train.resume_from is not None:
            continue
        if saved == train_state.config_hash(train_state.training_config(process.cfg)):
            train.resume_from = str(state)
            return process
    log.warning("Ray checkpoint %s was saved with another training config: not resuming from it", state)
    return None


def _worker_logging() -> None:
    """run.py's logging in a worker: INFO on rank 0, warnings elsewhere, secrets redacted."""
    from toolkit.redact import install_log_redaction

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dotenv import load_dotenv

    load_dotenv(REPO / ".env", override=False)  # as run.py: HF_TOKEN from the .env beside the code
    install_log_redaction()


__all__ = ["INSTALL_HINT", "RayMissingError", "RayOptions", "adopt_state", "check_launch",
           "connect", "launch", "require_ray", "runtime_env"]
