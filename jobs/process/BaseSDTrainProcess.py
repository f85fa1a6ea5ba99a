"""The LoRA training loop: `type: sd_trainer` processes.

Order of work: check everything the user gave (config, dataset, sample prompts, output folder) before any model
loads; then load, add the LoRA, wrap for data parallelism, train `steps` optimizer steps, save and sample on
schedule. Rank questions go to toolkit.dist.Runtime; the math lives in toolkit.kontext.

Resume (toolkit.train_state): every save writes the step LoRA and a training state; a run starts from the newest
complete state of its folder (or train.resume_from) and continues bit-identically. SIGTERM/SIGINT finish the step,
save and stop (toolkit.signals).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from jobs.process.checkpointing import CheckpointMixin
from jobs.process.outputs import RunOutputs
from toolkit import full_finetune, kontext, stages, train_state, transformer_folder
from toolkit.arch import Architecture, get_architecture
from toolkit.cache import CachingModel, cache_dataset, cache_folder_problems
from toolkit.checkpoint import resolve_run_folder
from toolkit.compile import check_compile, compile_blocks
from toolkit.config.schema import TrainProcessConfig
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import discover_pairs
from toolkit.data.sampler import BucketBatchSampler
from toolkit.dist import Runtime, rank_seed
from toolkit.ema import EMA, ema_weights
from toolkit.errors import ConfigError
from toolkit.adapter import check_pretrained_file, load_pretrained
from toolkit.hub import check_hub_access, retry_hint
from toolkit.lora import check_only_lora_trains  # noqa: F401  (re-exported: tests import it from here)
from toolkit.lora_convert import find_conventions
from toolkit.lr_schedule import planned_lrs, schedule_points
from toolkit.metrics import TrainingMonitor
from toolkit.optim import make_lr_scheduler, make_optimizer
from toolkit.sampling import build_requests, load_controls
from toolkit.signals import GracefulStop
from toolkit.validation import ValidationSet

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def compute_dtype(name: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    """The frozen base's dtype: as configured on GPU; fp32 on CPU, where bf16/fp16 matmuls are several times slower.
    `key` names the config key in the log line."""
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("%s %s on CPU: using float32 (CPU half-precision is slow)", key, name)
        return torch.float32
    return dtype


class BaseSDTrainProcess(CheckpointMixin):
    """One `sd_trainer` entry of `config.process`."""

    def __init__(self, cfg: TrainProcessConfig, job_name: str, job_config, config_file: Optional[Path] = None):
        self.cfg = cfg
        self.name = job_name
        self.job_config = job_config
        self.config_file = config_file
        self.train = cfg.train
        self.arch_cls = get_architecture(cfg.model.arch)
        self.fresh = False  # run.py --fresh: start over in a new versioned run folder instead of resuming
        self.resume_state: Optional[Path] = None  # chosen by preflight
        self.full_finetune = stages.is_full_finetune(cfg)  # train the transformer itself, no LoRA
        self.index, self.upstream = 0, []  # set by the job: this process's index, earlier processes' results
        self.model_cfg = cfg.model  # with model.transformer_path resolved by preflight (toolkit.stages)

    # -- before any model loads -------------------------------------------------------------------------------
    def preflight(self):
        """Check model location, dataset and sample prompts; raises a UserError naming what is wrong."""
        problems = self.arch_cls.check_source(self.cfg.model.name_or_path)
        if problems:
            raise ConfigError("\n".join(problems))
        if self.cfg.network is not None:
            check_pretrained_file(self.cfg.network.pretrained_lora, self.cfg.network.type)
        self.model_cfg = stages.resolve_model(self.cfg.model, self.upstream, self.index)
        pairs = discover_pairs(self.cfg.datasets)
        problems = cache_folder_problems(self.cfg.datasets)
        if problems:
            raise ConfigError("\n".join(problems))
        requests = []
        if not self.train.disable_sampling and self.cfg.sample.prompts:
            s = self.cfg.sample
            requests = build_requests(s.prompts, seed=s.seed, walk_seed=s.walk_seed, width=s.width,
                                      height=s.height, guidance_scale=s.guidance_scale, steps=s.sample_steps,
                                      key_path="config.process[0].sample.prompts")
        if self.cfg.save.push_to_hub:  # token, network and write access, before hours of training
            check_hub_access(self.cfg.save.hf_repo_id)
        outputs = RunOutputs(*resolve_run_folder(Path(self.cfg.training_folder), self.name, self.fresh),
                             full_finetune=self.full_finetune)
        if self.fresh and self.train.resume_from == "latest":
            raise ConfigError("--fresh starts a new run but train.resume_from is 'latest': drop one of them")
        self.resume_state = train_state.plan_resume(outputs.folder, self.train.resume_from,
                                                    train_state.training_config(self.cfg), outputs.lora_files())
        outputs.check_writable()
        return pairs, requests, outputs

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        pairs, requests, outputs = self.preflight()
        if self.resume_state is not None and outputs.final_path.exists() and \
                train_state.read_info(self.resume_state)["step"] >= self.train.steps:
            log.info("%s is already trained (%d steps, state %s); run with --fresh to train again%s",
                     outputs.final_path, self.train.steps, self.resume_state,
                     f", or {retry_hint(outputs.folder)}" if self.cfg.save.push_to_hub else "")
            return outputs.final_path
        rt = Runtime(distributed=self.train.distributed_training, device=self.cfg.device)
        try:
            final = self._train(rt, pairs, requests, outputs)
            push = self.cfg.save.push_to_hub and rt.is_main
        finally:
            rt.end()
        if push:  # after the process group is gone: a long upload keeps no other rank waiting
            from jobs.push import push_after_training  # jobs.push imports this module (via jobs.compare)

            push_after_training(outputs.folder, final, dataset_size=len(pairs))
        return final

    def setup(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> "TrainingRun":
        """Load the model, add the LoRA, build data and optimizer, wrap for data parallelism."""
        train = self.train
        # Held-out pairs (dataset val_folder_path) are checked here, before the model loads.
        validation = ValidationSet.from_datasets(self.cfg.datasets, self.cfg.trigger_word, train.seed, train.guidance)
        set_seed(train.seed)  # same LoRA init on every rank
        dtype = compute_dtype(train.dtype, rt.device)
        if train.compile:
            check_compile(rt.device)  # before the model loads
        model = self.arch_cls.load(self.model_cfg, rt.device, dtype)
        net = None if self.full_finetune else self.cfg.network
        params, lora_config = full_finetune.add_trainable(model.transformer, net, self.arch_cls.default_lora_targets)
        if net is not None and net.pretrained_lora:  # every rank loads it; a resume then overwrites it
            count = load_pretrained(model.transformer, net.pretrained_lora, lora_config,
                                    find_conventions(self.cfg.model.arch))
            log.info("started the %s from %s (%d tensors)", net.type, net.pretrained_lora, count)
        if train.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        model.transformer.train()
        if train.compile:
            compile_blocks(model.transformer)

        dataset = PairedDataset(pairs, self.cfg.datasets, trigger_word=self.cfg.trigger_word, seed=train.seed)
        self._attach_caches(rt, model, dataset, requests, validation)
        sampler = BucketBatchSampler(dataset.bucket_keys, batch_size=train.batch_size * rt.world_size,
                                     seed=train.seed)
        # Its own generator: starting an epoch's iterator would otherwise draw from the global RNG (LoRA dropout's),
        # and a resumed run starts one at a point where an uninterrupted run does not.
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                            num_workers=rt.data_workers(train.num_workers), pin_memory=rt.device.type == "cuda",
                            generator=torch.Generator().manual_seed(train.seed))
        optimizer = make_optimizer(train.optimizer, params, train.lr, train.optimizer_params)
        scheduler = make_lr_scheduler(train.lr_scheduler, optimizer, train.lr_warmup_steps, train.steps,
                                      train.lr_scheduler_params)
        if train.distributed_training:
            # Data loaders are prepared only for distributed runs: accelerate splits each global batch by rank.
            loader = rt.prepare(loader)
        optimizer, scheduler = rt.prepare(optimizer, scheduler)
        denoiser = rt.prepare_model(model.denoiser())
        full_finetune.check_trainable(model.transformer, params, self.full_finetune)
        ema = EMA.from_config(train.ema_config, model.transformer)

        log.info("world size %d | per-process batch %d x processes %d x accumulation %d = effective batch %d | "
                 "%d pairs, %d items, %d batches/epoch | %s: %d trainable params",
                 rt.world_size, train.batch_size, rt.world_size, train.gradient_accumulation_steps,
                 train.batch_size * rt.world_size * train.gradient_accumulation_steps, len(pairs), len(dataset),
                 len(sampler), "full fine-tune" if self.full_finetune else f"LoRA rank {net.linear}",
                 sum(p.numel() for p in params))
        return TrainingRun(rt=rt, model=model, denoiser=denoiser, params=params, optimizer=optimizer,
                           scheduler=scheduler, batches=self._batches(loader, sampler, dataset), dataset=dataset,
                           sampler=sampler, outputs=outputs,
                           requests=requests, lora_config=lora_config, validation=validation, ema=ema,
                           generator=torch.Generator(device=rt.device).manual_seed(rank_seed(train.seed, rt.rank)))

    def _attach_caches(self, rt: Runtime, model: Architecture, dataset: PairedDataset, requests,
                       validation: Optional[ValidationSet]) -> None:
        """Encode latents / caption embeddings once (toolkit.cache); with captions cached, free the text encoders
        after encoding what sampling and validation will still ask for."""
        latents = any(d.cache_latents or d.cache_latents_to_disk for d in self.cfg.datasets)
        text = self.train.cache_text_embeddings
        if not (latents or text):
            return
        if not isinstance(model, CachingModel):
            raise ConfigError(f"model.arch {self.cfg.model.arch}: this architecture cannot cache latents or "
                              "text embeddings; turn the cache options off")
        dataset.attach_cache(cache_dataset(dataset, self.cfg.datasets, rt=rt, batch_size=self.train.batch_size,
                                           latents=model.latent_encoder() if latents else None,
                                           text=model.text_encoder() if text else None))
        if text:
            keep = [r.prompt for r in requests]
            if validation is not None:
                keep += [c for i in range(len(validation.dataset)) for c in validation.dataset.item_captions(i)]
            model.unload_text_encoders(keep)

    def _train(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> Path:
        train = self.train
        ctx = self.setup(rt, pairs, requests, outputs)
        start = self._restore(ctx, self.resume_state) if self.resume_state is not None else 0
        if rt.is_main:
            outputs.prepare(self.job_config)
            train_state.remove_temporary(outputs.folder)
            transformer_folder.remove_temporary(outputs.folder)
        ctx.monitor = monitor = TrainingMonitor(outputs.log_dir, train.steps, min(start, train.steps),
                                                enabled=rt.is_main)
        for step, lr in schedule_points(planned_lrs(train.lr_scheduler, train.lr, train.lr_warmup_steps,
                                                    train.steps, train.lr_scheduler_params)):
            monitor.scalars(step, {"train/lr_schedule": lr})  # the plan, from a copy: the real one is untouched
        try:
            with GracefulStop() as stop:
                if requests and not train.skip_first_sample and start == 0:
                    self._sample(ctx, step=0)
                for step in range(start + 1, train.steps + 1):
                    loss = self.optimizer_step(ctx)
                    monitor.step_done()
                    if step < train.steps and rt.any_rank(stop.requested):  # every rank stops after the same step
                        self._stop(ctx, step, stop.signum)
                    self._after_step(ctx, step, loss)
                try:
                    with ema_weights(ctx.ema):  # every saved LoRA holds the EMA weights when EMA is on
                        final = outputs.save_final(ctx.model.transformer, ctx.lora_config, self.cfg, train.steps, rt,
                                                   wrapped=ctx.denoiser)
                except OSError as exc:
                    raise train_state.CheckpointSaveError(self._save_failure(outputs, train.steps, exc)) from exc
                if start < train.steps:
                    self._save_checkpoint(ctx, train.steps, step_lora=False)
                if requests and train.steps % self.cfg.sample.sample_every and start < train.steps:
                    self._sample(ctx, step=train.steps)
        finally:
            monitor.close()
        if rt.is_main:
            log.info("done: %d steps in %.1f s; LoRA: %s", train.steps, monitor.elapsed(), final)
        return final

    @staticmethod
    def _batches(loader, sampler: BucketBatchSampler, dataset: PairedDataset) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch (`steps` counts optimizer steps, not epochs)."""
        epoch = sampler.epoch  # 0, or the epoch a resume restored (the generator body starts at the first next())
        while True:
            # accelerate's prepared loader re-applies its own pass counter on iteration; set it too.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            yield from loader
            epoch += 1

    def optimizer_step(self, ctx: "TrainingRun") -> torch.Tensor:
        """gradient_accumulation_steps micro-batches, one all-reduce (on the last), one optimizer step.

        Returns the step's loss as a device tensor (no host sync; callers read it at log intervals)."""
        accum = self.train.gradient_accumulation_steps
        total = torch.zeros((), device=ctx.rt.device)
        for micro in range(accum):
            batch = next(ctx.batches)
            with ctx.rt.no_sync(ctx.denoiser, skip=micro < accum - 1):
                try:
                    loss = self.compute_loss(ctx, batch) / accum
                    ctx.rt.backward(loss)
                except torch.OutOfMemoryError:
                    log.error("out of memory on a micro-batch of %s; lower train.batch_size or the resolution, or "
                              "turn on model.quantize / train.gradient_checkpointing", describe_batch(batch))
                    raise
            total += loss.detach()
        ctx.grad_norm = ctx.rt.clip_grad_norm(ctx.params, self.train.max_grad_norm)
        ctx.lr = ctx.scheduler.get_last_lr()[0]  # the lr this step uses (train/lr_schedule's value at this step)
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.ema is not None:
            ctx.ema.step()
        return total

    def compute_loss(self, ctx: "TrainingRun", batch: dict) -> torch.Tensor:
        """Flow-matching loss of one micro-batch, through the WRAPPED denoiser so DDP syncs the gradients."""
        encoded = ctx.model.encode_batch(batch)
        x0 = ctx.model.clean_latents(encoded)
        t, weights = kontext.sample_timesteps(self.train.timestep_type, x0.shape[0], ctx.generator, x0.shape[1],
                                              device=ctx.rt.device)
        noise = torch.randn(x0.shape, generator=ctx.generator, device=ctx.generator.device, dtype=torch.float32)
        inputs, target = ctx.model.make_inputs(encoded, noise, t, self.train.guidance)
        return kontext.flow_matching_loss(ctx.denoiser(**inputs), target, weights)

    def _after_step(self, ctx: "TrainingRun", step: int, loss: torch.Tensor) -> None:
        cfg = self.cfg
        if step % cfg.log_every == 0 or step == self.train.steps:
            seconds, _ = ctx.monitor.window()
            mean_loss = ctx.rt.mean(loss)  # collective: every rank reaches it at the same step
            samples = self.train.batch_size * ctx.rt.world_size * self.train.gradient_accumulation_steps
            ctx.monitor.scalars(step, {"train/loss": mean_loss, "train/lr": ctx.lr,
                                       "train/grad_norm": float(ctx.grad_norm), "perf/step_seconds": seconds,
                                       "perf/samples_per_second": samples / max(seconds, 1e-9)})
            if cfg.performance_log_every and step % cfg.performance_log_every == 0 and ctx.rt.is_main:
                log.info("step %d: %.3f s/step, %.2f samples/s", step, seconds, samples / max(seconds, 1e-9))
        if step % cfg.save.save_every == 0 and step != self.train.steps:
            self._save_checkpoint(ctx, step)
        if ctx.requests and step % cfg.sample.sample_every == 0:
            self._sample(ctx, step)
        if ctx.validation is not None and step % cfg.sample.sample_every == 0:
            with ema_weights(ctx.ema):  # every rank: same weights, same value, no collective
                val_loss = ctx.validation.loss(ctx.model)
            ctx.monitor.scalars(step, {"val/loss": val_loss})
            log.info("step %d: val/loss %.5f", step, val_loss)

    def _sample(self, ctx: "TrainingRun", step: int) -> None:
        """Each rank renders its share of the prompts; the main process writes the images and the contact sheet."""
        mine = [ctx.requests[i] for i in ctx.rt.my_share(len(ctx.requests))]
        controls = [load_controls(r) for r in mine]  # one image per --ctrl_img
        with ema_weights(ctx.ema):
            images = ctx.model.sample(mine, controls)
        rendered = ctx.rt.gather([(r.index, img) for r, img in zip(mine, images)])
        if ctx.rt.is_main:
            by_index = dict(rendered)
            ctx.outputs.write_samples(step, [(r, by_index[r.index]) for r in ctx.requests])


@dataclass
class TrainingRun:
    """What one training run holds while it runs (kept out of the process object so it never outlives the run)."""

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
    monitor: Optional[TrainingMonitor] = None
    validation: Optional[ValidationSet] = None  # held-out pairs, None when no dataset has val_folder_path
    ema: Optional[EMA] = None  # train.ema_config: averaged LoRA weights for samples, validation and saves
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    lr: float = 0.0  # the lr of the last optimizer step


def describe_batch(batch: dict) -> str:
    """Image paths and tensor shapes of a batch, for error reports."""
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
    return f"{shapes}; images: {', '.join(map(str, batch.get('path', [])))}"


__all__ = ["BaseSDTrainProcess", "TrainingRun", "check_only_lora_trains", "compute_dtype", "describe_batch",
           "rank_seed"]
