"""What one training run holds while it runs, and what one optimizer step reports.

Kept out of the process object so it never outlives the run; built in one place (BaseSDTrainProcess.setup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from jobs.process.checkpointer import Checkpointer
from jobs.process.outputs import RunOutputs
from toolkit.arch import Architecture
from toolkit.data.dataset import PairedDataset
from toolkit.data.sampler import BucketBatchSampler
from toolkit.dist import Runtime
from toolkit.train.edit_eval import EditEval
from toolkit.train.ema import EMA
from toolkit.train.metrics import TrainingMonitor
from toolkit.train.signals import GracefulStop
from toolkit.train.validation import ValidationSet


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the mean micro-batch loss and the clipped-before gradient norm as device tensors (read
    on the host only at log intervals), and the lr the step used (train/lr_schedule's value at this step)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    applied: bool = True  # False: a non-finite loss or gradient on some rank, the update was skipped on every rank
    stop: bool = False  # a stop signal reached some rank (agreed with the finite check, one collective)
    files: tuple[str, ...] = ()  # this rank's images of the step, named when it is skipped


@dataclass
class TrainingRun:
    rt: Runtime
    model: Architecture
    denoiser: torch.nn.Module  # the wrapped (DDP) module: the loss must go through it
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: Iterator[dict]  # micro-batches, epoch after epoch
    dataset: PairedDataset
    sampler: BucketBatchSampler
    outputs: RunOutputs
    requests: list
    lora_config: object
    generator: torch.Generator  # per-rank noise and timesteps
    checkpointer: Checkpointer  # save / restore / stop / prune
    monitor: TrainingMonitor
    start_step: int  # 0, or the step a resumed training state ended at
    validation: Optional[ValidationSet] = None  # held-out pairs, None when no dataset has val_folder_path
    edits: Optional[EditEval] = None  # the held-out pairs as edit problems (edit metrics), None without them
    ema: Optional[EMA] = None  # train.ema_config: averaged LoRA weights for samples, validation and saves
    stop: Optional[GracefulStop] = None  # the stop-signal flag while the loop runs: agreed on at each step, and
    # sampling checks it per image


def describe_batch(batch: dict) -> str:
    """Image paths and tensor shapes of a batch, for error reports."""
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    return f"{shapes}; images: {', '.join(map(str, batch.get('path', [])))}"
