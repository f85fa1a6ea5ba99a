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
from typing import Optional, Sequence

import torch
from accelerate.utils import set_seed

from jobs.process import training_data
from jobs.process.checkpointer import Checkpointer
from jobs.process.held_out import held_out_edits, measure_held_out
from jobs.process.outputs import RunOutputs
from jobs.process.preflight import Problems, arch_dataset_problems
from jobs.process.sample_round import render_round
from jobs.process.training_run import StepResult, TrainingRun, describe_batch
from toolkit.adapters import full_finetune
from toolkit.adapters.lora_convert import find_conventions
from toolkit.adapters.network import adapters_disabled, check_pretrained_file, load_pretrained
from toolkit.adapters.strength import adapter_strength, batch_strength
from toolkit.arch import get_architecture
from toolkit.config.loader import job_to_dict
from toolkit.config.schema import TrainProcessConfig
from toolkit.data.cache import cache_folder_problems
from toolkit.data.pairs import discover_pairs
from toolkit.dist import Runtime, rank_seed
from toolkit.dtypes import compute_dtype
from toolkit.publish.hub import check_hub_access, retry_hint
from toolkit.publish.model_source import hub_model_problem
from toolkit.render.sampling import build_requests
from toolkit.state import train_state, transformer_folder
from toolkit.state.checkpoint import resolve_run_folder
from toolkit.state.config_change import field_defaults
from toolkit.train import flow_matching, preservation, stages
from toolkit.train.compile import check_compile, compile_blocks
from toolkit.train.ema import EMA
from toolkit.train.metrics import TrainingMonitor
from toolkit.train.trackers import flatten, missing_packages, start_trackers
from toolkit.train.nonfinite import NonFiniteGuard
from toolkit.train.lr_schedule import make_lr_scheduler, planned_lrs, schedule_points
from toolkit.train.optim import make_optimizer
from toolkit.train.reg_schedule import StepBatches
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
        problems.add(self.arch_cls.check_model_options(self.cfg.model))
        if (self.cfg.save.format == "comfy" and self.cfg.network is not None and self.cfg.network.type == "lora"
                and find_conventions(self.cfg.model.arch) is None):  # found here, not when the first file is saved
            problems.add([f"save.format: comfy: no ComfyUI key layout is known for model.arch "
                          f"{self.cfg.model.arch}; use diffusers"])
        if self.cfg.network is not None:
            problems.run(check_pretrained_file, self.cfg.network.pretrained_lora, self.cfg.network.type)
        self.model_cfg = problems.run(stages.resolve_model, self.cfg.model, list(upstream), self.index,
                                      default=self.cfg.model)
        for key in ("mask_path", "changed_region_loss"):
            if any(getattr(d, key) for d in self.cfg.datasets) and not self.arch_cls.supports_loss_masks():
                problems.add([f"datasets[].{key}: model.arch {self.cfg.model.arch} cannot train with loss masks"])
        if any(d.control_dropout_rate for d in self.cfg.datasets) and not self.arch_cls.trains_without_controls:
            problems.add([f"datasets[].control_dropout_rate: model.arch {self.cfg.model.arch} cannot train a batch "
                          "without its control images; set it to 0"])
        problems.add(arch_dataset_problems(self.arch_cls, self.cfg.datasets, self.train.cache_text_embeddings))
        pairs = problems.run(discover_pairs, self.cfg.datasets, default=[])
        problems.add(cache_folder_problems(self.cfg.datasets))
        problems.add(missing_packages(self.cfg.trackers))
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
                                                        train_state.training_config(self.cfg), outputs.lora_files(),
                                                        field_defaults(self.cfg))
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
        rt = Runtime(distributed=self.train.distributed_training, device=self.cfg.device,
                     timeout_s=self.train.ddp_timeout_seconds)
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
        params, lora_config = full_finetune.add_trainable(model.transformer, net, model.lora_targets())
        if net is not None and net.pretrained_lora:  # every rank loads it; a resume then overwrites it
            count = load_pretrained(model.transformer, net.pretrained_lora, lora_config,
                                    find_conventions(self.cfg.model.arch))
            log.info("started the %s from %s (%d tensors)", net.type, net.pretrained_lora, count)
        if train.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        model.transformer.train()
        if train.compile:
            compile_blocks(model.transformer)

        dataset, reg_dataset = training_data.prepare_datasets(pairs, self.cfg, rt)
        training_data.attach_caches(self.cfg, rt, model, [d for d in (dataset, reg_dataset) if d is not None],
                                    requests, validation)
        stream = training_data.make_stream(dataset, rt, train, train.seed)
        reg = None if reg_dataset is None else training_data.make_stream(
            reg_dataset, rt, train, train.seed + training_data.REG_SEED_OFFSET)
        sampler = stream.sampler
        optimizer = make_optimizer(train.optimizer, params, train.lr, train.optimizer_params)
        scheduler = make_lr_scheduler(train.lr_scheduler, optimizer, train.lr_warmup_steps, train.steps,
                                      train.lr_scheduler_params)
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
        schedule = training_data.reg_schedule(self.cfg, sampling=bool(requests)) if reg is not None else None
        if reg is not None:
            training_data.log_reg(reg, schedule, train.steps, train.reg_weight)
        generator = torch.Generator(device=rt.device).manual_seed(rank_seed(train.seed, rt.rank))
        checkpointer = Checkpointer(cfg=self.cfg, rt=rt, outputs=outputs, full_finetune=self.full_finetune,
                                    transformer=model.transformer, denoiser=denoiser, params=params,
                                    optimizer=optimizer, scheduler=scheduler, sampler=sampler, generator=generator,
                                    lora_config=lora_config, ema=ema, reg_sampler=reg and reg.sampler,
                                    schedule=schedule)
        start = checkpointer.restore(self.resume_state) if self.resume_state is not None else 0
        if rt.is_main:
            outputs.prepare(self.job_config)
            train_state.remove_temporary(outputs.folder)
            transformer_folder.remove_temporary(outputs.folder)
            if 0 < start < train.steps and train_state.is_finished(self.resume_state):
                outputs.keep_final(start, train.steps)
        monitor = TrainingMonitor(outputs.log_dir, train.steps, min(start, train.steps), enabled=rt.is_main,
                                  trackers=self._trackers(outputs) if rt.is_main else ())
        return TrainingRun(rt=rt, model=model, denoiser=denoiser, params=params, optimizer=optimizer,
                           scheduler=scheduler, dataset=dataset,
                           batches=StepBatches(training_data.epochs(stream), reg and training_data.epochs(reg),
                                               schedule, start, train.gradient_accumulation_steps),
                           sampler=sampler, outputs=outputs, requests=requests, lora_config=lora_config,
                           generator=generator, checkpointer=checkpointer, monitor=monitor, start_step=start,
                           validation=validation, edits=held_out_edits(validation, self.cfg.sample, rt.device),
                           ema=ema)

    def _trackers(self, outputs: RunOutputs) -> list:
        """W&B / MLflow runs of the main process (process trackers), with the resolved config, secrets redacted."""
        if not (self.cfg.trackers.use_wandb or self.cfg.trackers.use_mlflow):
            return []
        job = job_to_dict(self.job_config, redact=True) if self.job_config is not None else None
        params = flatten(job["config"]["process"][self.index]) if job is not None else {}
        return start_trackers(self.cfg.trackers, self.name, outputs.folder.name, outputs.folder, params)

    def _train(self, rt: Runtime, pairs, requests, outputs: RunOutputs) -> Path:
        train = self.train
        run = self.setup(rt, pairs, requests, outputs)
        start, monitor, checkpointer = run.start_step, run.monitor, run.checkpointer
        guard = NonFiniteGuard(train.max_nonfinite_steps)
        for step, lr in schedule_points(planned_lrs(train.lr_scheduler, train.lr, train.lr_warmup_steps,
                                                    train.steps, train.lr_scheduler_params)) \
                if monitor.first_in_folder else ():  # once per run folder: a resume must not redraw it from step 1
            monitor.scalars(step, {"train/lr_schedule": lr})  # the plan, from a copy: the real one is untouched
        try:
            with GracefulStop() as stop:
                run.stop = stop
                if requests and not train.skip_first_sample and (start == 0 or train.force_first_sample):
                    self._sample(run, step=start)
                if start == 0 and not train.skip_first_sample:  # the untrained baseline of the held-out curves
                    measure_held_out(run, step=0)
                for step in range(start + 1, train.steps + 1):
                    result = self.optimizer_step(run)
                    monitor.step_done(result.loss)
                    guard.record(step, result.applied, result.files, checkpointer.last_checkpoint())
                    if step < train.steps and result.stop:  # agreed by every rank: all stop after the same step
                        checkpointer.stop(step, stop.signum)
                    self._after_step(run, step, result)
                final = checkpointer.save_final()
                if start < train.steps:
                    checkpointer.save(train.steps, step_lora=False)
                if train.steps % self.cfg.sample.sample_every and start < train.steps:
                    if requests:
                        self._sample(run, step=train.steps)
                    measure_held_out(run, step=train.steps)  # the held-out curves end at the final LoRA
        finally:
            monitor.close()
        if rt.is_main:
            resumed = f" ({train.steps - start} steps trained by this run, from step {start})" if start else ""
            log.info("done: %d steps%s in %.1f s; LoRA: %s", train.steps, resumed, monitor.elapsed(), final)
        return final

    def optimizer_step(self, run: TrainingRun) -> StepResult:
        """gradient_accumulation_steps micro-batches, one all-reduce (on the last), one optimizer step unless the
        loss or gradient norm is not finite on some rank (toolkit.train.nonfinite). The only host sync is the one
        scalar pair of Runtime.agree (that decision and the stop-signal flag); loss and gradient norm stay on the
        device otherwise (read at log intervals)."""
        accum = self.train.gradient_accumulation_steps
        total = torch.zeros((), device=run.rt.device)
        files: list[str] = []
        for micro in range(accum):
            batch = next(run.batches)
            files += map(str, batch.get("path", []))
            # the dataset's network_weight, kept through backward (checkpointing re-runs the forward there)
            with run.rt.no_sync(run.denoiser, skip=micro < accum - 1), \
                    adapter_strength(run.model.transformer, batch_strength(batch["network_weight"])):
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
        stop, finite = run.rt.agree(run.stop is not None and run.stop.requested, total, grad_norm)
        if finite:
            run.optimizer.step()
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if finite and run.ema is not None:
            run.ema.step()
        return StepResult(loss=total, grad_norm=grad_norm, lr=lr, applied=finite, stop=stop, files=tuple(files))

    def compute_loss(self, run: TrainingRun, batch: dict) -> torch.Tensor:
        """Flow-matching loss of one micro-batch, through the WRAPPED denoiser so DDP syncs the gradients:
        x_t = (1 - t) x0 + t noise, target = noise - x0, loss = weighted mean of rho(pred - target), rho = train.loss_type
        (squared error by default), weighted by timestep and by each item's dataset loss_multiplier, and per latent by
        the loss mask (mask_path)."""
        model = run.model
        encoded = model.encode_batch(batch)
        x0 = model.clean_latents(encoded)
        t, weights = flow_matching.sample_timesteps(self.train.timestep_type, x0.shape[0], run.generator,
                                                    x0.shape[1], device=run.rt.device,
                                                    content_or_style=self.train.content_or_style)
        noise = torch.randn(x0.shape, generator=run.generator, device=run.generator.device, dtype=torch.float32)
        noise = noise.to(x0.device, x0.dtype)
        x_t = flow_matching.noisy_latents(x0, noise, t)
        target = flow_matching.flow_target(x0, noise)
        weights = weights * batch["loss_multiplier"].to(weights.device)  # dataset loss_multiplier, per item
        masks = model.loss_weights(batch["mask"], encoded) if "mask" in batch else None  # dataset mask_path
        inputs = model.denoiser_inputs(encoded, x_t, t, self.train.guidance)
        if self.train.diff_output_preservation:
            return self._loss_with_preservation(run, batch, encoded, (x_t, t), inputs, target, weights, masks)
        pred = run.denoiser(**inputs)
        return flow_matching.flow_matching_loss(pred, target, weights, self.train.loss_type, masks)

    def _loss_with_preservation(self, run: TrainingRun, batch: dict, encoded, x_t_and_t: tuple, inputs: dict,
                                target: torch.Tensor, weights: torch.Tensor,
                                masks: Optional[torch.Tensor]) -> torch.Tensor:
        """The flow-matching loss plus ai-toolkit's differential output preservation (toolkit.train.preservation):
        the base model's prediction on the class caption (LoRA off, no gradient, the unwrapped denoiser, so DDP
        sees nothing) and the LoRA's on both captions in ONE forward through the wrapped denoiser, so DDP syncs the
        gradients of both terms once."""
        model, train = run.model, self.train
        captions = preservation.class_captions(batch["caption"], self.cfg.trigger_word,
                                               train.diff_output_preservation_class)
        x_t, t = x_t_and_t
        class_inputs = model.denoiser_inputs(model.with_captions(encoded, captions), x_t, t, train.guidance)
        with torch.no_grad(), adapters_disabled(model.transformer):
            base_pred = model.denoiser()(**class_inputs)
        pred, class_pred = run.denoiser(**model.stack_inputs([inputs, class_inputs])).chunk(2)
        return (flow_matching.flow_matching_loss(pred, target, weights, train.loss_type, masks)
                + preservation.preservation_loss(class_pred, base_pred, train.diff_output_preservation_multiplier))

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
        if not result.applied:  # nothing is saved, sampled or validated from a skipped step
            return
        run.checkpointer.maybe_save(step)
        if run.requests and step % cfg.sample.sample_every == 0 and step >= cfg.sample.sample_start_step:
            self._sample(run, step)
        if step % cfg.sample.sample_every == 0:
            measure_held_out(run, step)  # validation loss and edit metrics of the held-out pairs

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
