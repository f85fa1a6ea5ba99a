"""Checkpoints and resume of the train loop (a mixin of BaseSDTrainProcess): save the step LoRA and the training
state, report a failed write with the previous checkpoint intact, restore a state, stop on a signal.

The state format and its safety rules live in toolkit.train_state; this module decides what goes into it.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from jobs.process.outputs import RunOutputs
from toolkit import full_finetune, train_state, transformer_folder
from toolkit.dist import rank_seed
from toolkit.ema import ema_weights
from toolkit.signals import TrainingInterrupted, signal_name

if TYPE_CHECKING:
    from jobs.process.BaseSDTrainProcess import TrainingRun

log = logging.getLogger(__name__)


class CheckpointMixin:
    """Needs `cfg`, `train` and `full_finetune` on the process."""

    @staticmethod
    def _trainable(ctx: "TrainingRun") -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in ctx.model.transformer.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, ctx: "TrainingRun", step: int, step_lora: bool = True) -> None:
        """The step LoRA, then the training state; every rank calls it (each rank's RNGs go to the main process,
        which writes). A failed write is raised on every rank, with the previous checkpoint intact."""
        rngs = ctx.rt.gather([train_state.capture_rng(ctx.generator)])
        error, states = None, full_finetune.states_writable(ctx.rt)
        with ema_weights(ctx.ema):  # the transformer's weights (EMA applied), gathered from every process (FSDP)
            weights = transformer_folder.module_state_dict(ctx.rt, ctx.denoiser, ctx.model.transformer,
                                                           copy=ctx.ema is not None) \
                if (self.full_finetune or ctx.rt.is_sharded) and step_lora else None
        if ctx.rt.is_main:
            consumed = step * self.train.gradient_accumulation_steps
            hashed = train_state.training_config(self.cfg)
            info = {**train_state.data_position(consumed, len(ctx.sampler)), "consumed_batches": consumed,
                    "batches_per_epoch": len(ctx.sampler), "world_size": ctx.rt.world_size,
                    "global_batch_size": ctx.sampler.batch_size, "config_hash": train_state.config_hash(hashed),
                    "config": hashed}
            try:
                if step_lora:
                    with ema_weights(ctx.ema):
                        ctx.outputs.save_step(ctx.model.transformer, ctx.lora_config, self.cfg, step, ctx.rt, weights)
                ctx.outputs.save_state(step, self.cfg.save.max_step_saves_to_keep, step_lora, write_state=states,
                                       trainable=self._trainable(ctx), optimizer=ctx.optimizer.state_dict(),
                                       scheduler=ctx.scheduler.state_dict(), rng=rngs, info=info,
                                       extra_files=ctx.ema.state_files() if ctx.ema else None)
            except OSError as exc:
                error = self._save_failure(ctx.outputs, step, exc)
        errors = [e for e in ctx.rt.gather([error]) if e]  # also the barrier: no rank runs ahead of the write
        if errors:
            raise train_state.CheckpointSaveError(errors[0])
        ctx.rt.checkpoint_saved(step, train_state.state_root(ctx.outputs.folder) / f"{step:09d}")

    @staticmethod
    def _save_failure(outputs: RunOutputs, step: int, exc: OSError) -> str:
        reason = "no space left on the disk" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        states = train_state.list_states(outputs.folder)
        kept = (f"the last complete checkpoint ({states[-1][1]}) is intact" if states
                else "there is no earlier checkpoint")
        return (f"cannot save the checkpoint of step {step} in {outputs.folder}: {reason}; {kept}. Free some space "
                "(or fix the folder) and run the same command again to resume.")

    def _restore(self, ctx: "TrainingRun", path: Path) -> int:
        """Load a training state into the run (LoRA, optimizer, lr schedule, RNGs, data position); returns its step."""
        state = train_state.load_state(path, ctx.rt.rank)
        info, train = state.info, self.train
        train_state.copy_trainable(self._trainable(ctx), state.trainable, path)
        ctx.optimizer.load_state_dict(state.optimizer)
        ctx.scheduler.load_state_dict(state.scheduler)
        if train_state.rescale_lr(ctx.scheduler, ctx.optimizer, train.lr):
            log.warning("train.lr changed since the state was saved: continuing its lr schedule at lr %g", train.lr)
        full_finetune.check_trainable(ctx.model.transformer, ctx.params, self.full_finetune)
        step, consumed = int(info["step"]), int(info["consumed_batches"])
        if ctx.ema is not None:
            ctx.ema.restore(path, step)
        if info["world_size"] == ctx.rt.world_size and info["global_batch_size"] == ctx.sampler.batch_size \
                and state.rng is not None:
            train_state.restore_rng(state.rng, ctx.generator)
        else:
            log.warning("the state was saved with %d processes x global batch %d, this run has %d x %d: resuming "
                        "after the same number of samples, but data order and noise differ from an uninterrupted "
                        "run", info["world_size"], info["global_batch_size"], ctx.rt.world_size,
                        ctx.sampler.batch_size)
            consumed = consumed * int(info["global_batch_size"]) // ctx.sampler.batch_size
            ctx.generator.manual_seed(rank_seed(train.seed + step, ctx.rt.rank))  # new noise, not a replay
        position = train_state.data_position(consumed, len(ctx.sampler))
        ctx.sampler.load_state_dict(position)  # before the first next(ctx.batches): see _batches
        log.info("resuming from %s: step %d of %d, epoch %d, batch %d of %d", path, step, train.steps,
                 position["epoch"], position["batches_done"], len(ctx.sampler))
        return step

    def _stop(self, ctx: "TrainingRun", step: int, signum: Optional[int]) -> None:
        """A stop was requested (on this or another rank): save this step's checkpoint and raise."""
        self._save_checkpoint(ctx, step)
        why = signal_name(signum) if signum else "a stop request on another process"
        raise TrainingInterrupted(f"stopped by {why} after step {step} of {self.train.steps}; checkpoint saved in "
                                  f"{train_state.state_root(ctx.outputs.folder) / f'{step:09d}'}; run the same "
                                  "command again to resume", signum or 15)
