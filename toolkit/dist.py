"""Everything about processes, ranks and devices, in one place (the train loop asks this object, never `rank == 0`).

Data parallelism is Hugging Face accelerate's. What this module adds on top, because peers get it wrong:
- the trainable module is wrapped (DDP) with every frozen parameter and buffer excluded from DDP's broadcast and
  all-reduce, so only LoRA gradients are synced, and the trainer calls the WRAPPED module so the sync happens;
- data loaders use `split_batches=True`: the bucket sampler yields global batches (batch_size x world size) from
  one bucket and accelerate hands each rank its own slice of it;
- a guard against silently duplicated training: the launcher exports the process count it asked for, and a
  different world size here is an error (accelerate's `--cpu` alone silently runs one process; `--multi_gpu`
  without GPUs runs independent copies);
- on CPU, each rank gets cores / local processes threads;
- under Ray Train (jobs.ray_launcher) the process group is Ray's: accelerate joins it, the end of training
  leaves it to Ray, and every saved training state is reported to Ray as a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import datetime
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, gather_object

from toolkit.errors import UserError

log = logging.getLogger(__name__)

EXPECTED_WORLD_SIZE_ENV = "KONTEXT_EXPECTED_WORLD_SIZE"
# CPU threads per rank chosen by the launcher (run_distributed_training.sh), so what it prints is what torch uses.
CPU_THREADS_ENV = "KONTEXT_CPU_THREADS"
# "ray" in a Ray Train worker (set by jobs.ray_launcher); unset under accelerate launch or a single process.
LAUNCHER_ENV = "KONTEXT_LAUNCHER"
# A rank stuck in a collective because another rank died or stalled gives up after this long instead of hanging
# forever (train.ddp_timeout_seconds; this environment default serves callers without a config).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("KONTEXT_COLLECTIVE_TIMEOUT_MIN", "30")))


def resolve_device(requested: str) -> str:
    """The device a single process should use: the requested one, or CPU (with a warning) when CUDA is absent."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: training on CPU (slow; fp32)", requested)
        return "cpu"
    if requested == "mps" and not torch.backends.mps.is_available():
        log.warning("device mps requested but not available: training on CPU")
        return "cpu"
    return requested


def available_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup CPU affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for noise and timesteps: ranks differ, runs with the same seed and world size repeat."""
    digest = hashlib.sha256(f"{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Runtime:
    """The process group as the trainer sees it: who am I, which device, how to sync."""

    def __init__(self, distributed: bool, device: str = "auto", timeout_s: "int | None" = None) -> None:
        world = launched_world_size()
        if world > 1 and not distributed:
            raise UserError(f"launched with {world} processes but train.distributed_training is false: set it to "
                            "true, or run `python run.py CONFIG` for single-process training")
        self.distributed = distributed
        self.under_ray = os.environ.get(LAUNCHER_ENV) == "ray"
        device = resolve_device(device)
        cpu = device == "cpu"
        if device.startswith("cuda:") and world == 1:
            torch.cuda.set_device(torch.device(device))
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision="no",  # dtypes are chosen by the architecture; LoRA params stay fp32
            gradient_accumulation_steps=1,  # the train loop accumulates itself (see BaseSDTrainProcess)
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                             InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT if timeout_s is None
                                                    else datetime.timedelta(seconds=timeout_s))],
        )
        self._check_world_size()
        self._check_fsdp()
        if self.device.type == "cpu" and self.world_size > 1:
            self._share_cpu_threads()

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_multiprocess(self) -> bool:
        return self.world_size > 1

    def _check_world_size(self) -> None:
        expected = os.environ.get(EXPECTED_WORLD_SIZE_ENV)
        if expected is not None and int(expected) != self.world_size:
            raise UserError(f"the launcher asked for {expected} processes but this process sees a world size of "
                            f"{self.world_size}: training would be silently duplicated or undersized. Check the "
                            "accelerate arguments (on CPU use run_distributed_training.sh, not `--cpu`).")
        if launched_world_size() != self.world_size:
            raise UserError(f"WORLD_SIZE={launched_world_size()} but accelerate formed a group of "
                            f"{self.world_size} processes")

    def _check_fsdp(self) -> None:
        """An FSDP accelerate config on a machine without GPUs: accelerate 1.15 either refuses (sync_module_states:
        true, "no available devices found") or silently sets up plain CPU data parallelism, unsharded. Refuse the
        second too: the user asked for sharding."""
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_sharded:
            raise UserError(f"launched with an FSDP accelerate config, but accelerate set up "
                            f"{self.accelerator.distributed_type.value} on {self.device} without sharding: FSDP "
                            "needs GPUs (see README, Full fine-tuning and stages); drop --config_file "
                            "config/accelerate/fsdp.yaml to train unsharded")

    def _share_cpu_threads(self) -> None:
        """The launcher's choice (CPU_THREADS_ENV), else the cores this process may run on / local processes.

        Set explicitly because torch would start every rank with all cores, and N ranks x all cores on the same
        cores oversubscribes them (2 ranks x 2 threads on 2 cores was 4x slower than 2 x 1)."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        threads = int(os.environ.get(CPU_THREADS_ENV, "0")) or max(1, available_cores() // local)
        torch.set_num_threads(threads)
        log.info("rank %d: %d CPU threads (%d local processes)", self.rank, threads, local)

    def data_workers(self, requested: "int | None") -> int:
        """DataLoader workers for this rank: `requested`, else 0 on CPU (workers would take cores from the step),
        else min(4, half of this rank's share of the cores)."""
        if requested is not None:
            return requested
        if self.device.type == "cpu":
            return 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        return min(4, available_cores() // max(1, local) // 2)

    # -- wrapping ---------------------------------------------------------------------------------------------
    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """Wrap for data parallelism (only when distributed); frozen weights are never broadcast nor reduced."""
        if not self.distributed:
            return module
        ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in module.named_buffers()]
        module._ddp_params_and_buffers_to_ignore = ignore
        if self.is_sharded:
            log.info("FSDP: parameters sharded over %d processes", self.world_size)
        return self.accelerator.prepare_model(module)

    def prepare(self, *objects: Any) -> Any:
        """Optimizer, lr scheduler, data loaders: accelerate's wrappers (they act only when distributed)."""
        prepared = self.accelerator.prepare(*objects) if self.distributed else objects
        return prepared if len(objects) != 1 or not isinstance(prepared, tuple) else prepared[0]

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)

    @property
    def is_sharded(self) -> bool:
        """Parameters are sharded across processes (accelerate launched with an FSDP config)."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    def full_state_dict(self, module: torch.nn.Module) -> dict:
        """The wrapped module's whole state dict; a collective under FSDP (consolidated on the main process with
        FULL_STATE_DICT, see config/accelerate/fsdp.yaml), a plain state_dict() otherwise."""
        return self.accelerator.get_state_dict(module)

    # -- step -------------------------------------------------------------------------------------------------
    def no_sync(self, module: torch.nn.Module, skip: bool):
        """Skip the gradient all-reduce for micro-batches that are not the last of an accumulation."""
        if skip and self.is_multiprocess:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip (max_norm > 0) and return the global gradient norm, without a host sync."""
        if max_norm > 0:
            return self.accelerator.clip_grad_norm_(params, max_norm)
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over ranks (a collective: every rank must call it at the same step)."""
        value = value.detach().float().reshape(1).to(self.device)
        if self.is_multiprocess:
            value = self.accelerator.reduce(value, reduction="mean")
        return float(value.item())

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on at least one rank, e.g. a stop signal that reached only some processes.
        A collective when the world size is > 1: every rank must call it at the same step."""
        if not self.is_multiprocess:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def agree(self, flag: bool, *values: torch.Tensor) -> tuple[bool, bool]:
        """(`flag` is true on some rank, every value is finite on every rank): ONE all-reduce of two numbers and one
        host read, so the train loop's per-step decisions (stop on a signal, apply or skip a non-finite step) cost
        a single sync. A collective when the world size is > 1: every rank must call it at the same step."""
        finite = torch.stack([torch.isfinite(v.detach()).all().to(self.device) for v in values]).all() \
            if values else torch.ones((), dtype=torch.bool, device=self.device)
        counts = torch.stack([torch.tensor(1.0 if flag else 0.0, device=self.device), (~finite).float()])
        if self.is_multiprocess:
            counts = self.accelerator.reduce(counts, reduction="sum")
        flagged, nonfinite = counts.tolist()
        return flagged > 0, nonfinite == 0

    def checkpoint_saved(self, step: int, state_dir: Path) -> None:
        """Every rank calls it once the training state of `step` is complete; under Ray the main process's state
        folder becomes a Ray checkpoint (ray.train.report is a barrier, so the other ranks report nothing)."""
        if self.under_ray:
            import ray.train  # only under Ray, where it is installed

            state = state_dir if self.is_main else None
            checkpoint = ray.train.Checkpoint.from_directory(str(state)) if state is not None else None
            ray.train.report({"step": step}, checkpoint=checkpoint)

    # -- coordination -----------------------------------------------------------------------------------------
    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def my_share(self, count: int) -> list[int]:
        """Indices of `count` work items this rank handles (round robin), e.g. sample prompts."""
        return list(range(self.rank, count, self.world_size))

    def gather(self, items: list) -> list:
        """Concatenate every rank's list on every rank (pickled objects; small things only)."""
        return gather_object(items) if self.is_multiprocess else list(items)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield

    def end(self) -> None:
        if self.under_ray:  # the process group is Ray's: it destroys it when the worker ends (we run no trackers)
            return
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
