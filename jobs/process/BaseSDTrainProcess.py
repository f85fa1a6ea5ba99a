"""The LoRA training loop: `type: sd_trainer` processes.

Order of work: check everything the user gave (config, dataset, sample prompts, output folder) before any model
loads; then load, add the LoRA, wrap for data parallelism, train `steps` optimizer steps, save and sample on
schedule. Rank questions go to toolkit.dist.Runtime; the objective is `compute_loss` (math in
toolkit.train.flow_matching); the architecture only encodes, packs and runs its transformer.

Resume (jobs/process/checkpointer.py, toolkit.state.train_state): every save writes the step LoRA and a training
state; a run starts from the newest complete state of its folder (or train.resume_from) and continues
bit-identically. SIGTERM/SIGINT finish the step, save and stop (toolkit.train.signals).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from jobs.process.checkpointer import Checkpointer
from jobs.process.outputs import RunOutputs
from jobs.process.preflight import Problems
from jobs.process.sample_round import render_round
from jobs.process.training_run import StepResult, TrainingRun, describe_batch
from toolkit.adapters import full_finetune
from toolkit.adapters.lora_convert import find_conventions
from toolkit.adapters.network import check_pretrained_file, load_pretrained
from toolkit.arch import Architecture, get_architecture
from toolkit.config.schema import TrainProcessConfig
from toolkit.data.cache import CachingModel, cache_dataset, cache_folder_problems
from toolkit.data.dataset import PairedDataset, collate_batch
from toolkit.data.pairs import discover_pairs
from toolkit.data.sampler import BucketBatchSampler
from toolkit.dist import Runtime, rank_seed
from toolkit.dtypes import compute_dtype
from toolkit.errors import ConfigError
from toolkit.publish.hub import check_hub_access, retry_hint
from toolkit.publish.model_source import hub_model_problem
from toolkit.render.sampling import build_requests
from toolkit.state import train_state, transformer_folder
from toolkit.state.checkpoint import resolve_run_folder
from toolkit.train import flow_matching, stages
from toolkit.train.compile import check_compile, compile_blocks
from toolkit.train.ema import EMA, ema_weights
from toolkit.train.metrics import TrainingMonitor
from toolkit.train.lr_schedule import make_lr_scheduler, planned_lrs, schedule_points
from toolkit.train.optim import make_optimizer
from toolkit.train.signals import GracefulStop
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)


CPU_QUANTIZE_NOTE = ("model.quantize on a CPU: the 8-bit transformer saves memory but trains about 2x slower "
                     "per step here; set model.quantize: false unless the model does not fit in memory")


class BaseSDTrainProcess:
    """One `sd_trainer` entry of `config.process`."""

    def __init__(self, cfg: TrainProcessConfig, job_name: str, job_config, config_file: Optional[Path] = None, *,
                 index: int = 0, fresh: bool = False):
        self.cfg = cfg
        self.name = job_name
        self.job_config = job_config
        self.config_file = config_file
        self.train = cfg.train
        self.arch_cls = get_architecture(cfg.model.arch)
        self.fresh = fresh  # run.py --fresh: start over in a new versioned run folder instead of resuming
        self.resume_state: Optional[Path] = None  # chosen by preflight
        self.full_finetune = stages.is_full_finetune(cfg)  # train the transformer itself, no LoRA
        self.index = index  # this process's place in config.process
        self.model_cfg = cfg.model  # with model.transformer_path resolved by preflight (toolkit.train.stages)

    # -- before any model loads -------------------------------------------------------------------------------
    def preflight(self, upstream: Sequence[Path] = ()):
        """Check model location, dataset, sample prompts, Hub access and the output folder, all of them; raises one
        UserError naming everything that is wrong. Writes nothing.
        `upstream`: the results of the job's earlier processes (model.transformer_path '[process:N]')."""
        problems, source = Problems(), self.cfg.model.name_or_path
        source_problems = self.arch_cls.check_source(source)
        problems.add(source_problems)
        if not source_problems and not Path(source).expanduser().exists():  # a Hub id: cached, or reachable + token
            problems.add(filter(None, [hub_model_problem(source)]))
        if self.cfg.network is not None:
            problems.run(check_pretrained_file, self.cfg.network.pretrained_lora, self.cfg.network.type)
        self.model_cfg = problems.run(stages.resolve_model, self.cfg.model, list(upstream), self.index,
                                      default=self.cfg.model)
        pairs = problems.run(discover_pairs, self.cfg.datasets, default=[])
        problems.add(cache_folder_problems(self.cfg.datasets))
        requests = []
        if not self.train.disable_sampling and self.cfg.sample.prompts:
            s = self.cfg.sample
            requests = problems.run(build_requests, s.prompts, seed=s.seed, walk_seed=s.walk_seed, width=s.width,
                                    height=s.height, guidance_scale=s.guidance_scale, steps=s.sample_steps,
                                    key_path="config.process[0].sample.prompts", default=[])
        if self.cfg.save.push_to_hub:  # token, network and write access, before hours of training
            problems.run(check_hub_access, self.cfg.save.hf_repo_id)
        outputs = RunOutputs(*resolve_run_folder(Path(self.cfg.training_folder), self.name, self.fresh),
                             full_finetune=self.full_finetune)
        if self.fresh and self.train.resume_from == "latest":
            problems.add(["--fresh starts a new run but train.resume_from is 'latest': drop one of them"])
        else:
            outputs = problems.run(self._plan_resume, outputs, default=outputs)
        problems.run(outputs.check_writable)
        problems.raise_if_any()
        return pairs, requests, outputs

    def _plan_resume(self, outputs: RunOutputs) -> RunOutputs:
        """Choose the state to resume from. A first run stopped before its first scheduled save (no final LoRA) does
        not block a changed config: the new run goes to a new versioned folder, as --fresh would, and the stopped one
        is kept."""
        try:
            self.resume_state = train_state.plan_resume(outputs.folder, self.train.resume_from,
                                                        train_state.training_config(self.cfg), outputs.lora_files())
        except train_state.ConfigChangedError as exc:
            if exc.step >= self.cfg.save.save_every or outputs.final_path.exists():
                raise
            aside = RunOutputs(*resolve_run_folder(Path(self.cfg.training_folder), self.name, fresh=True),
                               full_finetune=self.full_finetune)
            log.warning("the config changed since %s was stopped after %d step(s), before its first scheduled save: "
                        "starting over in %s (the stopped run is kept; --fresh does the same)", outputs.folder,
                        exc.step, aside.folder)
            self.resume_state = None
            return aside
        return outputs

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, upstream: Sequence[Path] = ()) -> Path:
        pairs, requests, outputs = self.preflight(upstream)
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
            from jobs.push import push_after_training  # Hub libraries load only when a push is asked for

            push_after_training(outputs.folder, final, dataset_size=len(pairs))
        return final

    def setup(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> TrainingRun:
        """Load the model, add the LoRA, build data and optimizer, wrap for data parallelism."""
        train = self.train
        # Held-out pairs (dataset val_folder_path) are checked here, before the model loads.
        validation = ValidationSet.from_datasets(self.cfg.datasets, self.cfg.trigger_word, train.seed, train.guidance)
        set_seed(train.seed)  # same LoRA init on every rank
        dtype = compute_dtype(train.dtype, rt.device)
        if rt.device.type == "cpu" and self.model_cfg.quantize:
            log.warning(CPU_QUANTIZE_NOTE)
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
        for level, note in dataset.fit_buckets(train.batch_size * rt.world_size):  # before caches key on buckets
            if rt.is_main:
                log.log(level, note)
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
        generator = torch.Generator(device=rt.device).manual_seed(rank_seed(train.seed, rt.rank))
        checkpointer = Checkpointer(cfg=self.cfg, rt=rt, outputs=outputs, full_finetune=self.full_finetune,
                                    transformer=model.transformer, denoiser=denoiser, params=params,
                                    optimizer=optimizer, scheduler=scheduler, sampler=sampler, generator=generator,
                                    lora_config=lora_config, ema=ema)
        start = checkpointer.restore(self.resume_state) if self.resume_state is not None else 0
        if rt.is_main:
            outputs.prepare(self.job_config)
            train_state.remove_temporary(outputs.folder)
            transformer_folder.remove_temporary(outputs.folder)
            if 0 < start < train.steps and train_state.is_finished(self.resume_state):
                outputs.keep_final(start, train.steps)
        monitor = TrainingMonitor(outputs.log_dir, train.steps, min(start, train.steps), enabled=rt.is_main)
        return TrainingRun(rt=rt, model=model, denoiser=denoiser, params=params, optimizer=optimizer,
                           scheduler=scheduler, batches=self._batches(loader, sampler, dataset), dataset=dataset,
                           sampler=sampler, outputs=outputs, requests=requests, lora_config=lora_config,
                           generator=generator, checkpointer=checkpointer, monitor=monitor, start_step=start,
                           validation=validation, ema=ema)

    def _attach_caches(self, rt: Runtime, model: Architecture, dataset: PairedDataset, requests,
                       validation: Optional[ValidationSet]) -> None:
        """Encode latents / caption embeddings once (toolkit.data.cache); with captions cached, free the text encoders
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
        run = self.setup(rt, pairs, requests, outputs)
        start, monitor, checkpointer = run.start_step, run.monitor, run.checkpointer
        for step, lr in schedule_points(planned_lrs(train.lr_scheduler, train.lr, train.lr_warmup_steps,
                                                    train.steps, train.lr_scheduler_params)) \
                if monitor.first_in_folder else ():  # once per run folder: a resume must not redraw it from step 1
            monitor.scalars(step, {"train/lr_schedule": lr})  # the plan, from a copy: the real one is untouched
        try:
            with GracefulStop() as stop:
                run.stop = stop
                if requests and not train.skip_first_sample and start == 0:
                    self._sample(run, step=0)
                for step in range(start + 1, train.steps + 1):
                    result = self.optimizer_step(run)
                    monitor.step_done(result.loss)
                    if step < train.steps and rt.any_rank(stop.requested):  # every rank stops after the same step
                        checkpointer.stop(step, stop.signum)
                    self._after_step(run, step, result)
                final = checkpointer.save_final()
                if start < train.steps:
                    checkpointer.save(train.steps, step_lora=False)
                if requests and train.steps % self.cfg.sample.sample_every and start < train.steps:
                    self._sample(run, step=train.steps)
        finally:
            monitor.close()
        if rt.is_main:
            resumed = f" ({train.steps - start} steps trained by this run, from step {start})" if start else ""
            log.info("done: %d steps%s in %.1f s; LoRA: %s", train.steps, resumed, monitor.elapsed(), final)
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

    def optimizer_step(self, run: TrainingRun) -> StepResult:
        """gradient_accumulation_steps micro-batches, one all-reduce (on the last), one optimizer step.
        Loss and gradient norm stay on the device (no host sync; read at log intervals)."""
        accum = self.train.gradient_accumulation_steps
        total = torch.zeros((), device=run.rt.device)
        for micro in range(accum):
            batch = next(run.batches)
            with run.rt.no_sync(run.denoiser, skip=micro < accum - 1):
                try:
                    loss = self.compute_loss(run, batch) / accum
                    run.rt.backward(loss)
                except torch.OutOfMemoryError:
                    log.error("out of memory on a micro-batch of %s; lower train.batch_size or the resolution, or "
                              "turn on model.quantize / train.gradient_checkpointing", describe_batch(batch))
                    raise
            total += loss.detach()
        grad_norm = run.rt.clip_grad_norm(run.params, self.train.max_grad_norm)
        lr = run.scheduler.get_last_lr()[0]  # the lr this step uses (train/lr_schedule's value at this step)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.step()
        return StepResult(loss=total, grad_norm=grad_norm, lr=lr)

    def compute_loss(self, run: TrainingRun, batch: dict) -> torch.Tensor:
        """Flow-matching loss of one micro-batch, through the WRAPPED denoiser so DDP syncs the gradients:
        x_t = (1 - t) x0 + t noise, target = noise - x0, loss = weighted mean (pred - target)^2."""
        model = run.model
        encoded = model.encode_batch(batch)
        x0 = model.clean_latents(encoded)
        t, weights = flow_matching.sample_timesteps(self.train.timestep_type, x0.shape[0], run.generator,
                                                    x0.shape[1], device=run.rt.device)
        noise = torch.randn(x0.shape, generator=run.generator, device=run.generator.device, dtype=torch.float32)
        noise = noise.to(x0.device, x0.dtype)
        x_t = flow_matching.noisy_latents(x0, noise, t)
        target = flow_matching.flow_target(x0, noise)
        pred = run.denoiser(**model.denoiser_inputs(encoded, x_t, t, self.train.guidance))
        return flow_matching.flow_matching_loss(pred, target, weights)

    def _after_step(self, run: TrainingRun, step: int, result: StepResult) -> None:
        cfg = self.cfg
        if step % cfg.log_every == 0 or step == self.train.steps:
            seconds, _ = run.monitor.window()
            mean_loss = run.rt.mean(result.loss)  # collective: every rank reaches it at the same step
            samples = self.train.batch_size * run.rt.world_size * self.train.gradient_accumulation_steps
            run.monitor.scalars(step, {"train/loss": mean_loss, "train/lr": result.lr,
                                       "train/grad_norm": float(result.grad_norm), "perf/step_seconds": seconds,
                                       "perf/samples_per_second": samples / max(seconds, 1e-9)})
            if cfg.performance_log_every and step % cfg.performance_log_every == 0 and run.rt.is_main:
                log.info("step %d: %.3f s/step, %.2f samples/s", step, seconds, samples / max(seconds, 1e-9))
        run.checkpointer.maybe_save(step)
        if run.requests and step % cfg.sample.sample_every == 0:
            self._sample(run, step)
        if run.validation is not None and step % cfg.sample.sample_every == 0:
            with ema_weights(run.ema):  # every rank: same weights, same value, no collective
                val_loss = run.validation.loss(run.model)
            run.monitor.scalars(step, {"val/loss": val_loss})
            log.info("step %d: val/loss %.5f", step, val_loss)

    def _sample(self, run: TrainingRun, step: int) -> None:
        """Each rank renders its share of the prompts; the main process writes the images and the contact sheet.
        A stop signal ends the round between images (or denoising steps) and stops the run here."""
        mine = [run.requests[i] for i in run.rt.my_share(len(run.requests))]
        stop = run.stop
        with run.monitor.paused():  # sampling is not step time: the bar's ETA and perf/step_seconds leave it out
            mine_rendered = render_round(run.model, mine, step, run.ema, stop=stop and (lambda: stop.requested),
                                         total=len(run.requests))
        if stop is not None and run.rt.any_rank(stop.requested):
            run.checkpointer.stop(step, stop.signum, during="samples")
        rendered = run.rt.gather(mine_rendered)
        if run.rt.is_main:
            by_index = dict(rendered)
            run.outputs.write_samples(step, [(r, by_index[r.index]) for r in run.requests],
                                      base_model=self.cfg.model.name_or_path)


__all__ = ["BaseSDTrainProcess"]
