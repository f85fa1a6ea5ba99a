"""The run's checkpointer: saves the step LoRA and the training state, prunes old ones, restores a state, stops on a
signal, and reports a failed write with the previous checkpoint intact.

The state format and its safety rules live in toolkit.state.train_state; this object decides what goes into it and
when (`maybe_save`). It holds the parts of the run that have state, handed over once they are built.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from jobs.process.outputs import RunOutputs
from toolkit.adapters import full_finetune
from toolkit.config.schema import TrainProcessConfig
from toolkit.data.sampler import BucketBatchSampler
from toolkit.train.reg_schedule import RegSchedule
from toolkit.dist import Runtime, rank_seed
from toolkit.state import train_state, transformer_folder
from toolkit.train.ema import EMA, ema_weights
from toolkit.train.nonfinite import TrainingDiverged
from toolkit.train.signals import TrainingInterrupted, signal_name

log = logging.getLogger(__name__)


@dataclass
class Checkpointer:
    cfg: TrainProcessConfig
    rt: Runtime
    outputs: RunOutputs
    full_finetune: bool
    transformer: torch.nn.Module  # holds the trainable weights (LoRA, or itself in a full fine-tune)
    denoiser: torch.nn.Module  # the wrapped module: FSDP gathers the weights through it
    params: list
    optimizer: Any
    scheduler: Any
    sampler: BucketBatchSampler
    generator: torch.Generator
    lora_config: Any
    ema: Optional[EMA] = None
    reg_sampler: Optional[BucketBatchSampler] = None  # of the is_reg datasets, with `schedule`
    schedule: Optional[RegSchedule] = None  # which steps drew regularisation batches
    # The data position where this process started: samples consumed before `start_step` (a resume may have been
    # saved with another process count, so it is not start_step x the current global batch), and the
    # regularisation loader's global batches.
    start_step: int = field(default=0, init=False)
    start_samples: int = field(default=0, init=False)
    start_reg_batches: int = field(default=0, init=False)
    saved_step: int = 0  # the step of the newest complete checkpoint (or the restored state): a stop saves only after it

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.transformer.named_parameters() if p.requires_grad}

    def maybe_save(self, step: int) -> None:
        """save.save_every: a checkpoint every that many steps (the last step is saved by save_final)."""
        if step % self.cfg.save.save_every == 0 and step != self.steps:
            self.save(step)

    def save(self, step: int, step_lora: bool = True) -> None:
        """The step LoRA, then the training state, then pruning; every rank calls it (each rank's RNGs go to the
        main process, which writes). A failed write is raised on every rank, with the previous checkpoint intact."""
        rt = self.rt
        self._refuse_nonfinite(step)
        rngs = rt.gather([train_state.capture_rng(self.generator)])
        error, states = None, full_finetune.states_writable(rt)
        with ema_weights(self.ema):  # the transformer's weights (EMA applied), gathered from every process (FSDP)
            weights = transformer_folder.module_state_dict(rt, self.denoiser, self.transformer,
                                                           copy=self.ema is not None) \
                if (self.full_finetune or rt.is_sharded) and step_lora else None
        if rt.is_main:
            try:
                if step_lora:
                    with ema_weights(self.ema):
                        self.outputs.save_step(self.transformer, self.lora_config, self.cfg, step, rt, weights)
                self.outputs.save_state(step, write_state=states, trainable=self._trainable(),
                                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                                        rng=rngs, info=self._info(step),
                                        extra_files=self.ema.state_files() if self.ema else None)
                self.prune(step, step_lora, states)
            except OSError as exc:
                error = self.failure_message(step, exc)
        errors = [e for e in rt.gather([error]) if e]  # also the barrier: no rank runs ahead of the write
        if errors:
            raise train_state.CheckpointSaveError(errors[0])
        rt.checkpoint_saved(step, train_state.state_root(self.outputs.folder) / f"{step:09d}")
        self.saved_step = step

    def _refuse_nonfinite(self, step: int) -> None:
        """Never write NaN/Inf weights (every rank agrees; FSDP: each checks its shard). Since every checkpoint is
        checked here and pruning keeps the one just written, pruning never deletes the newest finite checkpoint."""
        _, finite = self.rt.agree(False, *self._trainable().values())
        if not finite:
            last = self.last_checkpoint()
            kept = f"the last good checkpoint ({last}) is intact" if last else "no earlier checkpoint exists"
            raise TrainingDiverged(f"the trained weights are not finite (NaN/Inf) at step {step}: refusing to save "
                                   f"them; {kept}")

    def last_checkpoint(self) -> Optional[str]:
        """The newest training state under its final name (every one was checked finite before it was written)."""
        states = train_state.list_states(self.outputs.folder)
        return str(states[-1][1]) if states else None

    def prune(self, step: int, step_lora: bool, states: bool = True) -> None:
        """Only after the checkpoint of `step` is complete: keep save.max_step_saves_to_keep of each kind."""
        self.outputs.prune(step, self.cfg.save.max_step_saves_to_keep, step_lora, states)

    def _reg_steps(self, step: int) -> int:
        """Steps 1..step that drew regularisation batches."""
        return self.schedule.reg_steps(step) if self.reg_sampler is not None and self.schedule else 0

    def consumed_samples(self, step: int) -> int:
        """Items of the data order consumed after `step`: where this process started plus what it trained since
        (regularisation steps draw from their own loader)."""
        main_steps = (step - self.start_step) - (self._reg_steps(step) - self._reg_steps(self.start_step))
        return self.start_samples + main_steps * self.cfg.train.gradient_accumulation_steps * self.sampler.batch_size

    def _reg_consumed(self, step: int) -> int:
        """Global batches the regularisation loader handed out after `step`."""
        return self.start_reg_batches + (self._reg_steps(step) - self._reg_steps(self.start_step)) \
            * self.cfg.train.gradient_accumulation_steps

    def _info(self, step: int) -> dict:
        samples = self.consumed_samples(step)
        consumed = samples // self.sampler.batch_size
        hashed = train_state.training_config(self.cfg)
        reg = {} if self.reg_sampler is None else {"reg_consumed_batches": self._reg_consumed(step),
                                                    "reg_batches_per_epoch": len(self.reg_sampler)}
        return {**train_state.data_position(consumed, len(self.sampler)), "consumed_batches": consumed, **reg,
                "consumed_samples": samples,
                "batches_per_epoch": len(self.sampler), "world_size": self.rt.world_size,
                "global_batch_size": self.sampler.batch_size, "config_hash": train_state.config_hash(hashed),
                "config": hashed}

    def save_final(self) -> Path:
        """The final LoRA (or transformer folder), EMA weights applied; every rank calls it."""
        self._refuse_nonfinite(self.steps)
        try:
            with ema_weights(self.ema):  # every saved LoRA holds the EMA weights when EMA is on
                return self.outputs.save_final(self.transformer, self.lora_config, self.cfg, self.steps, self.rt,
                                               wrapped=self.denoiser)
        except OSError as exc:
            raise train_state.CheckpointSaveError(self.failure_message(self.steps, exc)) from exc

    def failure_message(self, step: int, exc: OSError) -> str:
        reason = "no space left on the disk" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        states = train_state.list_states(self.outputs.folder)
        kept = (f"the last complete checkpoint ({states[-1][1]}) is intact" if states
                else "there is no earlier checkpoint")
        return (f"cannot save the checkpoint of step {step} in {self.outputs.folder}: {reason}; {kept}. Free some "
                "space (or fix the folder) and run the same command again to resume.")

    def restore(self, path: Path) -> int:
        """Load a training state (LoRA, optimizer, lr schedule, RNGs, data position); returns its step."""
        rt, train = self.rt, self.cfg.train
        state = train_state.load_state(path, rt.rank)
        info = state.info
        train_state.copy_trainable(self._trainable(), state.trainable, path)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if train_state.rescale_lr(self.scheduler, self.optimizer, train.lr):
            log.warning("train.lr changed since the state was saved: continuing its lr schedule at lr %g", train.lr)
        full_finetune.check_trainable(self.transformer, self.params, self.full_finetune)
        step, consumed = int(info["step"]), int(info["consumed_batches"])
        reg_consumed = int(info.get("reg_consumed_batches", 0))
        if self.ema is not None:
            self.ema.restore(path, step)
        if info["world_size"] == rt.world_size and info["global_batch_size"] == self.sampler.batch_size \
                and state.rng is not None:
            train_state.restore_rng(state.rng, self.generator)
        else:
            log.warning("the state was saved with %d processes x global batch %d, this run has %d x %d: resuming "
                        "after the same number of samples, but data order and noise differ from an uninterrupted "
                        "run", info["world_size"], info["global_batch_size"], rt.world_size,
                        self.sampler.batch_size)
            # The data order does not depend on the global batch (toolkit.data.sampler): continue at the same item,
            # rounded down to a whole batch of this run (at most one global batch minus one item is seen again).
            samples = int(info.get("consumed_samples", consumed * int(info["global_batch_size"])))
            consumed = samples // self.sampler.batch_size
            reg_consumed = reg_consumed * int(info["global_batch_size"]) // self.sampler.batch_size
            self.generator.manual_seed(rank_seed(train.seed + step, rt.rank))  # new noise, not a replay
        self.start_step, self.start_samples = step, consumed * self.sampler.batch_size
        self.start_reg_batches = reg_consumed
        position = train_state.data_position(consumed, len(self.sampler))
        self.sampler.load_state_dict(position)  # before the first batch is drawn: see training_data.epochs
        if self.reg_sampler is not None:
            self.reg_sampler.load_state_dict(train_state.data_position(reg_consumed, len(self.reg_sampler)))
        log.info("resuming from %s: step %d of %d, epoch %d, batch %d of %d", path, step, train.steps,
                 position["epoch"], position["batches_done"], len(self.sampler))
        self.saved_step = step
        return step

    def stop(self, step: int, signum: Optional[int], during: str = "") -> None:
        """A stop was requested (on this or another rank): save this step's checkpoint, unless no step was trained
        since the last one (a stop during sampling), and raise."""
        why = signal_name(signum) if signum else "a stop request on another process"
        when = f"during the {during} of step {step}" if during else f"after step {step}"
        if step <= self.saved_step:
            kept = (f"the checkpoint of step {step} is complete" if step else
                    "no step was trained, nothing saved (a changed config starts afresh)")
            raise TrainingInterrupted(f"stopped by {why} {when} of {self.steps}; {kept}", signum or 15)
        self.save(step)
        raise TrainingInterrupted(f"stopped by {why} {when} of {self.steps}; checkpoint saved in "
                                  f"{train_state.state_root(self.outputs.folder) / f'{step:09d}'}; run the same "
                                  "command again to resume", signum or 15)
