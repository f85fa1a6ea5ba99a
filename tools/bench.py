"""`python -m tools.bench CONFIG [--warmup N] [--steps M] [--json-only]`: where a training step's time goes.

Loads CONFIG's model and data through the real trainer (BaseSDTrainProcess.preflight + setup; outputs go to a
temporary folder, sampling and saving are off), then:

1. runs N warm-up and M measured REAL optimizer steps (BaseSDTrainProcess.optimizer_step, plus the loss and
   grad-norm host read the loop does at log intervals): median / min / max seconds and samples/s;
2. right after each real step, the same-run reference on identical tensors: the step's batches are encoded
   beforehand (untimed), then only transformer forward + loss + backward + optimizer.step + zero_grad are timed.
   overhead_ratio = median over steps of real / reference (goal <= 1.10);
3. M instrumented real steps: the same optimizer_step with clocks around its parts (the batch iterator, the
   architecture's encode_images / encode_captions, the denoiser's forward hooks, Runtime.backward,
   Runtime.clip_grad_norm onwards), so the breakdown cannot drift from the trainer's code. On a GPU every clock
   read synchronizes first. Its total is compared with the real steps of the same batch shapes.

It prints a table and one line `BENCH_JSON {...}`. FLOPs, peak table and formatting: tools/bench_report.py.
This is a top-level tool like run.py: it imports jobs/ (the trainer) lazily, the one place toolkit/ does.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from toolkit.train import flow_matching
from tools.bench_report import PHASES, contention_warning, count_flops, format_table, peak_tflops
from toolkit.dist import Runtime, available_cores
from toolkit.errors import UserError

log = logging.getLogger(__name__)

JSON_PREFIX = "BENCH_JSON "
OVERHEAD_GOAL = 1.10
# Architecture methods timed as their own phase when the architecture has them (toolkit names no architecture).
ENCODER_PHASES = {"vae_encode": "encode_images", "text_encode": "encode_captions"}


class PhaseClock:
    """Exclusive wall time per phase over a stack of nested phases; `sync` runs before every clock read."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds = {phase: 0.0 for phase in PHASES}
        self.stack: list[str] = []
        self._last = 0.0

    def _tick(self) -> None:
        self.sync()
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self._last
        self._last = now

    def push(self, phase: str) -> None:
        self._tick()
        self.stack.append(phase)

    def pop(self) -> None:
        self._tick()
        self.stack.pop()

    def replace(self, phase: str) -> None:
        """The current phase ends and `phase` starts (e.g. the optimizer part after the last backward)."""
        self._tick()
        self.stack[-1] = phase

    @contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        self.push(phase)
        try:
            yield
        finally:
            self.pop()


def _timed(fn: Callable, enter: Callable[[], None], leave: Callable[[], None]) -> Callable:
    def wrapper(*args, **kwargs):
        enter()
        try:
            return fn(*args, **kwargs)
        finally:
            leave()
    return wrapper


def _timed_batches(batches: Iterator[dict], clock: PhaseClock) -> Iterator[dict]:
    while True:
        with clock.phase("data"):
            batch = next(batches)
        yield batch


@contextmanager
def instrumented(ctx, clock: PhaseClock) -> Iterator[None]:
    """Clocks around the parts of the real step (instance attributes and hooks, all removed on exit)."""
    model, rt, batches = ctx.model, ctx.rt, ctx.batches
    patched = []
    for phase, method in ENCODER_PHASES.items():
        if callable(getattr(model, method, None)):
            setattr(model, method, _timed(getattr(model, method), lambda p=phase: clock.push(p), clock.pop))
            patched.append((model, method))
    rt.backward = _timed(rt.backward, lambda: clock.push("backward"), clock.pop)
    rt.clip_grad_norm = _timed(rt.clip_grad_norm, lambda: clock.replace("optimizer"), lambda: None)
    patched += [(rt, "backward"), (rt, "clip_grad_norm")]
    hooks = [ctx.denoiser.register_forward_pre_hook(lambda *_: clock.push("forward")),
             ctx.denoiser.register_forward_hook(lambda *_: clock.pop())]
    ctx.batches = _timed_batches(batches, clock)
    try:
        yield
    finally:
        ctx.batches = batches
        for hook in hooks:
            hook.remove()
        for obj, name in patched:
            delattr(obj, name)  # the class's method shows through again


def _recording(batches: Iterator[dict], seen: list) -> Iterator[dict]:
    for batch in batches:
        seen.append(batch)
        yield batch


def _shape_key(batches: list[dict]) -> tuple:
    return tuple((k, tuple(v.shape)) for b in batches for k, v in sorted(b.items()) if isinstance(v, torch.Tensor))


def read_logged(ctx, result) -> float:
    """The host reads the train loop does at log intervals (BaseSDTrainProcess._after_step) of a StepResult."""
    value = ctx.rt.mean(result.loss)
    float(result.grad_norm)
    return value


class Bench:
    """One benchmark: a set-up TrainingRun and the three kinds of timed steps."""

    def __init__(self, process, ctx) -> None:
        self.process, self.ctx, self.train = process, ctx, process.train
        cuda = ctx.rt.device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(ctx.rt.device)) if cuda else (lambda: None)
        self.generator = torch.Generator(device=ctx.rt.device).manual_seed(12345)
        self.flops_by_shape: dict[tuple, Any] = {}

    def real_step(self) -> tuple[float, list[dict]]:
        """One real optimizer step; returns its seconds and the micro-batches it trained on."""
        ctx, seen = self.ctx, []
        batches = ctx.batches
        ctx.batches = _recording(batches, seen)
        try:
            self.sync()
            start = time.perf_counter()
            read_logged(ctx, self.process.optimizer_step(ctx))
            self.sync()
            return time.perf_counter() - start, seen
        finally:
            ctx.batches = batches

    def prepare_reference(self, batches: list[dict]) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """Denoiser inputs, targets and weights of `batches`, encoded once, untimed (noise from our own RNG)."""
        model, prepared = self.ctx.model, []
        for batch in batches:
            with torch.no_grad():
                encoded = model.encode_batch(batch)
                x0 = model.clean_latents(encoded)
                t, weights = flow_matching.sample_timesteps(self.train.timestep_type, x0.shape[0], self.generator,
                                                            x0.shape[1], device=self.ctx.rt.device)
                noise = torch.randn(x0.shape, generator=self.generator, device=self.generator.device)
                inputs, target = flow_matching.inputs_and_target(model, encoded, noise, t, self.train.guidance)
            prepared.append((inputs, target, weights))
        return prepared

    def reference_step(self, prepared: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> float:
        """Bare transformer forward + backward + optimizer on pre-encoded tensors: no data, encoders, DDP, clip."""
        ctx = self.ctx
        denoiser = ctx.rt.unwrap(ctx.denoiser)
        self.sync()
        start = time.perf_counter()
        for inputs, target, weights in prepared:
            loss = flow_matching.flow_matching_loss(denoiser(**inputs), target, weights) / len(prepared)
            loss.backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - start

    def instrumented_step(self) -> tuple[dict[str, float], list[dict]]:
        ctx, clock, seen = self.ctx, PhaseClock(self.sync), []
        batches = ctx.batches
        ctx.batches = _recording(batches, seen)
        try:
            with instrumented(ctx, clock):
                clock.push("other")
                result = self.process.optimizer_step(ctx)
                clock.pop()
                with clock.phase("logging"):
                    read_logged(ctx, result)
        finally:
            ctx.batches = batches
        return clock.seconds, seen

    def flops(self, prepared) -> tuple[int, Any]:
        """Model FLOPs of one optimizer step on these inputs (cached per shape), and the FlopCount of the first."""
        counts = []
        for inputs, _, _ in prepared:
            key = tuple((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor))
            if key not in self.flops_by_shape:
                self.flops_by_shape[key] = count_flops(self.ctx.rt.unwrap(self.ctx.denoiser), inputs,
                                                       self.train.batch_size)
            counts.append(self.flops_by_shape[key])
        return sum(c.train_step for c in counts), counts[0]

    def run(self, warmup: int, steps: int) -> dict[str, Any]:
        for _ in range(warmup):
            self.real_step()
        # The peaks the measured steps reach (the RSS peak is the process's, model loading included).
        if self.ctx.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.rt.device)
        real, ref, flops, counts, real_by_shape = [], [], [], [], {}
        for _ in range(steps):
            seconds, batches = self.real_step()
            prepared = self.prepare_reference(batches)
            real.append(seconds)
            ref.append(self.reference_step(prepared))
            step_flops, count = self.flops(prepared)
            flops.append(step_flops)
            counts.append(count)
            real_by_shape.setdefault(_shape_key(batches), []).append(seconds)
        phases, instrumented_total, expected = {p: 0.0 for p in PHASES}, 0.0, 0.0
        for _ in range(steps):
            seconds, batches = self.instrumented_step()
            for phase, value in seconds.items():
                phases[phase] += value / steps
            instrumented_total += sum(seconds.values()) / steps
            same_shape = real_by_shape.get(_shape_key(batches), real)
            expected += statistics.median(same_shape) / steps
        return self._result(real, ref, flops, counts, phases, instrumented_total, expected)

    def _result(self, real, ref, flops, counts, phases, instrumented_total, expected) -> dict[str, Any]:
        ctx, train = self.ctx, self.train
        device = ctx.rt.device
        cuda = device.type == "cuda"
        device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
        samples = train.batch_size * ctx.rt.world_size * train.gradient_accumulation_steps
        step = statistics.median(real)
        tokens = [c.tokens_per_sample for c in counts]
        tflops = sum(flops) / sum(real) / 1e12 if cuda else None
        peak = peak_tflops(device_name) if cuda else None
        transformer = ctx.model.transformer
        return {
            "device": device.type, "device_name": device_name, "dtype": str(next(p.dtype for p in transformer.parameters() if not p.requires_grad)),
            "world_size": ctx.rt.world_size, "torch_threads": torch.get_num_threads(),
            "batch_size": train.batch_size, "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "samples_per_step": samples,
            "transformer_params": sum(p.numel() for p in transformer.parameters()),
            "trainable_params": sum(p.numel() for p in ctx.params),
            "tokens_per_sample": int(statistics.median(tokens)), "tokens_per_sample_range": [min(tokens), max(tokens)],
            "measured_steps": len(real),
            "step_seconds_median": step, "step_seconds_min": min(real), "step_seconds_max": max(real),
            "step_seconds_mean": statistics.fmean(real), "samples_per_second": samples / step,
            "breakdown_seconds": phases, "instrumented_step_seconds": instrumented_total,
            # VAE + text encoders per step (0 when every latent and caption comes from a cache), and which encoders
            # were loaded at all by the end (architectures that load them lazily report it)
            "encoder_seconds": sum(phases.get(p, 0.0) for p in ENCODER_PHASES),
            "encoders_loaded": list(getattr(getattr(ctx.model, "encoders", None), "loaded", ["unknown"])),
            "instrumented_vs_real": instrumented_total / expected,
            "reference_step_seconds_median": statistics.median(ref),
            "overhead_ratio": statistics.median(r / b for r, b in zip(real, ref)), "overhead_goal": OVERHEAD_GOAL,
            "load_average_1min": os.getloadavg()[0], "cpu_cores": available_cores(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "sdpa_calls_per_forward": counts[0].attention_calls,
            "flops_per_step": statistics.fmean(flops),
            "flops_convention": "model FLOPs: frozen Linear 2x fwd, LoRA Linear and attention 3x fwd, no recompute",
            "achieved_tflops": tflops,
            "peak_tflops": (peak if peak is not None else "unknown") if cuda else None,
            "mfu": tflops / peak if tflops is not None and peak else None,
        }


def bench_job_dict(raw: dict, out_dir: Path, total_steps: int) -> dict:
    """A copy of the job that writes only into out_dir, never samples, saves or resumes."""
    raw = copy.deepcopy(raw)
    raw["config"]["name"] = "bench"
    for process in raw["config"]["process"]:
        process["training_folder"] = str(out_dir)
        train = process.setdefault("train", {})
        train.update(steps=total_steps, disable_sampling=True)
        train.pop("resume_from", None)
        process.setdefault("save", {})["save_every"] = total_steps + 1
    return raw


def missing_input_hints(process_cfg) -> list[str]:
    """Commands that build a missing demo model or dataset folder (before anything tries to load it)."""
    from tools.tiny_model import PRESETS

    hints = []
    model = Path(process_cfg.model.name_or_path).expanduser()
    preset = next((p for p in sorted(PRESETS) if model.name == p or model.name.startswith(p + "-")), None)
    if preset is not None and not model.exists():
        hints.append(f"model folder {model} is missing; build it with: "
                     f"python -m tools.tiny_model --out {process_cfg.model.name_or_path} --preset {preset}")
    for dataset in process_cfg.datasets:
        folder = Path(dataset.folder_path).expanduser()
        if not folder.exists() and folder.parent.name.startswith("demo"):
            hints.append(f"dataset folder {folder} is missing; build it with: "
                         f"python -m tools.demo_data --out {folder.parent}")
    return hints


def run_benchmark(config: str, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Set up CONFIG's first sd_trainer process and benchmark it; returns the result dict (see the module doc)."""
    from jobs.extensions import load_extensions
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.config.loader import find_config_file, load_job_dict, read_config_file

    path = find_config_file(config)
    warning = contention_warning(available_cores())
    if warning:
        log.warning("%s", warning)
    load_extensions()
    with tempfile.TemporaryDirectory(prefix="kontext-bench-") as tmp:
        job = load_job_dict(bench_job_dict(read_config_file(path), Path(tmp), warmup + 2 * steps), str(path))
        configs = [p for p in job.config.process if p.type == "sd_trainer"]
        if not configs:
            raise UserError(f"{path}: no sd_trainer process to benchmark")
        hints = missing_input_hints(configs[0])
        if hints:
            raise UserError("\n".join(hints))
        process = BaseSDTrainProcess(configs[0], job.config.name, job, path)
        start = time.perf_counter()
        pairs, requests, outputs = process.preflight()
        rt = Runtime(distributed=process.train.distributed_training, device=process.cfg.device)
        try:
            ctx = process.setup(rt, pairs, requests, outputs)
            setup_seconds = time.perf_counter() - start
            result = Bench(process, ctx).run(warmup, steps)
        finally:
            rt.end()
    return {"config": str(config), "model": configs[0].model.name_or_path, "warmup_steps": warmup,
            "setup_seconds": setup_seconds, **result, "contention_warning": warning}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a training config (path or name under config/)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured real steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each kind (default 10)")
    parser.add_argument("--json-only", action="store_true", help="print only the BENCH_JSON line")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING if args.json_only else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        result = _rounded(run_benchmark(args.config, args.warmup, args.steps))
    except UserError as exc:
        log.error("bench: %s", exc)
        return 2
    if not args.json_only:
        sys.stdout.write(format_table(result) + "\n")
    sys.stdout.write(JSON_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
