"""The LoRA training loop: `type: sd_trainer` processes.

Order of work: check everything the user gave (config, dataset, sample prompts, output folder) before any model
loads; then load, add the LoRA, wrap for data parallelism, train `steps` optimizer steps, save and sample on
schedule. Rank questions go to toolkit.dist.Runtime; the math lives in toolkit.kontext.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from jobs.process.outputs import RunOutputs
from toolkit import kontext
from toolkit.arch import Architecture, get_architecture
from toolkit.config.schema import TrainProcessConfig
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import discover_pairs
from toolkit.data.sampler import BucketBatchSampler
from toolkit.dist import Runtime
from toolkit.errors import ConfigError
from toolkit.lora import add_lora, make_lora_config
from toolkit.metrics import TrainingMonitor
from toolkit.optim import make_lr_scheduler, make_optimizer
from toolkit.sampling import build_requests, load_control

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: as configured on GPU; fp32 on CPU, where bf16/fp16 matmuls are several times slower."""
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        log.info("train.dtype %s on CPU: using float32 (CPU half-precision is slow)", name)
        return torch.float32
    return dtype


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for noise and timesteps: ranks differ, runs with the same seed and world size repeat."""
    digest = hashlib.sha256(f"{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class BaseSDTrainProcess:
    """One `sd_trainer` entry of `config.process`."""

    def __init__(self, cfg: TrainProcessConfig, job_name: str, job_config, config_file: Optional[Path] = None):
        self.cfg = cfg
        self.name = job_name
        self.job_config = job_config
        self.config_file = config_file
        self.train = cfg.train
        self.arch_cls = get_architecture(cfg.model.arch)

    # -- before any model loads -------------------------------------------------------------------------------
    def preflight(self):
        """Check model location, dataset and sample prompts; raises a UserError naming what is wrong."""
        problems = self.arch_cls.check_source(self.cfg.model.name_or_path)
        if problems:
            raise ConfigError("\n".join(problems))
        pairs = discover_pairs(self.cfg.datasets)
        if any(d.cache_latents_to_disk or d.cache_latents for d in self.cfg.datasets):
            log.warning("cache_latents / cache_latents_to_disk are not implemented yet: latents are encoded "
                        "on the fly every step (same results, slower)")
        requests = []
        if not self.train.disable_sampling and self.cfg.sample.prompts:
            s = self.cfg.sample
            requests = build_requests(s.prompts, seed=s.seed, walk_seed=s.walk_seed, width=s.width,
                                      height=s.height, guidance_scale=s.guidance_scale, steps=s.sample_steps,
                                      key_path="config.process[0].sample.prompts")
        outputs = RunOutputs(Path(self.cfg.training_folder) / self.name, self.name)
        outputs.check_writable()
        return pairs, requests, outputs

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        pairs, requests, outputs = self.preflight()
        rt = Runtime(distributed=self.train.distributed_training, device=self.cfg.device)
        try:
            return self._train(rt, pairs, requests, outputs)
        finally:
            rt.end()

    def setup(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> "TrainingRun":
        """Load the model, add the LoRA, build data and optimizer, wrap for data parallelism."""
        train = self.train
        set_seed(train.seed)  # same LoRA init on every rank
        dtype = compute_dtype(train.dtype, rt.device)
        model = self.arch_cls.load(self.cfg.model, rt.device, dtype)
        net = self.cfg.network
        lora_config = make_lora_config(net.linear, net.linear_alpha,
                                       net.target_modules or self.arch_cls.default_lora_targets, net.dropout)
        params = add_lora(model.transformer, lora_config)
        if train.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        model.transformer.train()

        dataset = PairedDataset(pairs, self.cfg.datasets, trigger_word=self.cfg.trigger_word, seed=train.seed)
        sampler = BucketBatchSampler(dataset.bucket_keys, batch_size=train.batch_size * rt.world_size,
                                     seed=train.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=0,
                            pin_memory=rt.device.type == "cuda")
        optimizer = make_optimizer(train.optimizer, params, train.lr, train.optimizer_params)
        scheduler = make_lr_scheduler(train.lr_scheduler, optimizer, train.lr_warmup_steps, train.steps)
        if train.distributed_training:
            # Data loaders are prepared only for distributed runs: accelerate splits each global batch by rank.
            loader = rt.prepare(loader)
        optimizer, scheduler = rt.prepare(optimizer, scheduler)
        denoiser = rt.prepare_model(model.denoiser())

        log.info("world size %d | per-process batch %d x processes %d x accumulation %d = effective batch %d | "
                 "%d pairs, %d items, %d batches/epoch | LoRA rank %d: %d trainable params",
                 rt.world_size, train.batch_size, rt.world_size, train.gradient_accumulation_steps,
                 train.batch_size * rt.world_size * train.gradient_accumulation_steps, len(pairs), len(dataset),
                 len(sampler), net.linear, sum(p.numel() for p in params))
        return TrainingRun(rt=rt, model=model, denoiser=denoiser, params=params, optimizer=optimizer,
                           scheduler=scheduler, batches=self._batches(loader, sampler, dataset), dataset=dataset,
                           sampler=sampler, outputs=outputs,
                           requests=requests, lora_config=lora_config,
                           generator=torch.Generator(device=rt.device).manual_seed(rank_seed(train.seed, rt.rank)))

    def _train(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> Path:
        train = self.train
        ctx = self.setup(rt, pairs, requests, outputs)
        if rt.is_main:
            outputs.prepare(self.job_config)
        ctx.monitor = monitor = TrainingMonitor(outputs.log_dir, train.steps, 0, enabled=rt.is_main)
        try:
            if requests and not train.skip_first_sample:
                self._sample(ctx, step=0)
            for step in range(1, train.steps + 1):
                loss = self.optimizer_step(ctx)
                monitor.step_done()
                self._after_step(ctx, step, loss)
            final = outputs.save_final(ctx.model.transformer, ctx.lora_config, self.cfg, train.steps, rt)
            if requests and train.steps % self.cfg.sample.sample_every:
                self._sample(ctx, step=train.steps)
        finally:
            monitor.close()
        if rt.is_main:
            log.info("done: %d steps in %.1f s; LoRA: %s", train.steps, monitor.elapsed(), final)
        return final

    @staticmethod
    def _batches(loader, sampler: BucketBatchSampler, dataset: PairedDataset) -> Iterator[dict]:
        """Micro-batches forever, epoch after epoch (`steps` counts optimizer steps, not epochs)."""
        epoch = 0
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
                loss = self.compute_loss(ctx, batch) / accum
                ctx.rt.backward(loss)
            total += loss.detach()
        ctx.grad_norm = ctx.rt.clip_grad_norm(ctx.params, self.train.max_grad_norm)
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
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
            ctx.monitor.scalars(step, {"train/loss": mean_loss, "train/lr": ctx.scheduler.get_last_lr()[0],
                                       "train/grad_norm": float(ctx.grad_norm), "perf/step_seconds": seconds,
                                       "perf/samples_per_second": samples / max(seconds, 1e-9)})
            if cfg.performance_log_every and step % cfg.performance_log_every == 0 and ctx.rt.is_main:
                log.info("step %d: %.3f s/step, %.2f samples/s", step, seconds, samples / max(seconds, 1e-9))
        if step % cfg.save.save_every == 0 and step != self.train.steps:
            ctx.outputs.save_step(ctx.model.transformer, ctx.lora_config, cfg, step, ctx.rt)
        if ctx.requests and step % cfg.sample.sample_every == 0:
            self._sample(ctx, step)

    def _sample(self, ctx: "TrainingRun", step: int) -> None:
        """Each rank renders its share of the prompts; the main process writes the images and the contact sheet."""
        mine = [ctx.requests[i] for i in ctx.rt.my_share(len(ctx.requests))]
        controls = [load_control(r.ctrl_img, r.width, r.height) for r in mine]
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
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


__all__ = ["BaseSDTrainProcess", "TrainingRun", "compute_dtype", "rank_seed"]
