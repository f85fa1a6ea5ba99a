"""One row of `tools.gpu_check`: a random-weight FLUX Kontext transformer trained a few real optimizer steps.

The row goes through the trainer's own code: the job dict is loaded and checked like a user's config,
BaseSDTrainProcess.preflight + setup load, quantize, add the LoRA, turn on gradient checkpointing / compile and
build the (cached) data, and every timed step is BaseSDTrainProcess.optimizer_step with the loss read the loop does
at log intervals (tools.bench). Only the transformer's weights differ from a real run: FluxKontext's
`transformer_components` is overridden to build the transformer from a config with random weights directly on the
device, so FLUX.1's 12B transformer trains without a 24 GB download.

A row never ends the matrix: an out-of-memory error is recorded as status "oom", any other failure as "error",
and the memory of the row is freed before the next one.
"""

from __future__ import annotations

import gc
import logging
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from extensions.flux_kontext.model import FluxKontext
from toolkit.dist import Runtime
from tools.bench import Bench, bench_job_dict, read_logged
from tools.bench_report import peak_tflops

log = logging.getLogger(__name__)

# FLUX.1 Kontext [dev]'s transformer/config.json (black-forest-labs/FLUX.1-Kontext-dev): ~11.9B parameters.
FLUX_KONTEXT_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
# The column the memory planner's figure goes in (`run.py plan`); "-" until a planner fills it.
PLANNED_COLUMN = "planned_mib"


@dataclass(frozen=True)
class RowSpec:
    """One point of the matrix."""

    resolution: int
    quantize: str  # "none" (the train dtype), "qfloat8" or "qint8" (optimum-quanto weights)
    checkpointing: bool
    compile: bool
    processes: int = 1

    @property
    def id(self) -> str:
        return (f"{self.resolution}px-{self.quantize}-gc_{'on' if self.checkpointing else 'off'}"
                f"-compile_{'on' if self.compile else 'off'}-p{self.processes}")


@dataclass(frozen=True)
class Settings:
    """What every row shares."""

    model_dir: Path  # a pipeline folder for the VAE, tokenizers and text encoders (the transformer is replaced)
    data_dir: Path  # <data_dir>/<resolution>/{target,control}: pairs at exactly that size
    out_dir: Path  # run folders and caches
    transformer_config: dict  # the random transformer's FluxTransformer2DModel config
    device: str = "cuda"
    dtype: str = "bf16"
    warmup: int = 2
    steps: int = 3
    row_timeout_s: float = 240.0
    max_sequence_length: int = 512
    lora_rank: int = 16
    batch_size: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict)


def random_weight_kontext(config: dict, seed: int) -> type:
    """FluxKontext whose transformer is built from `config` with random weights, on the device, in the train dtype
    (default dtype switched while the modules are made: 12B parameters are never materialised in fp32)."""
    from diffusers import FluxTransformer2DModel

    class RandomWeightKontext(FluxKontext):
        @classmethod
        def transformer_components(cls, model_cfg, source, device, dtype):
            torch.manual_seed(seed)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    transformer = FluxTransformer2DModel(**config)
            finally:
                torch.set_default_dtype(previous)
            return {"transformer": transformer.to(dtype).eval()}

    return RandomWeightKontext


def job_dict(spec: RowSpec, settings: Settings) -> dict:
    """The row's job: demo-style pairs at the row's size, latents and text cached (the text encoders are unloaded,
    so the step is what a cached 24 GB run trains), no sampling, no saving."""
    data = settings.data_dir / str(spec.resolution)
    process = {
        "type": "sd_trainer", "device": settings.device, "log_every": 1000,
        "network": {"type": "lora", "linear": settings.lora_rank, "linear_alpha": settings.lora_rank},
        "save": {"dtype": "float32", "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(data / "target"), "control_path": str(data / "control"),
                      "caption_ext": "txt", "resolution": [spec.resolution], "cache_latents_to_disk": True,
                      "cache_dir": str(settings.out_dir / "cache" / str(spec.resolution))}],
        "train": {"batch_size": settings.batch_size, "gradient_checkpointing": spec.checkpointing,
                  "optimizer": "adamw", "lr": 1e-4, "dtype": settings.dtype, "seed": settings.seed,
                  "compile": spec.compile, "cache_text_embeddings": True, "timestep_type": "sigmoid",
                  "distributed_training": spec.processes > 1, **settings.extra},
        "model": {"name_or_path": str(settings.model_dir), "arch": "flux_kontext",
                  "quantize": spec.quantize != "none", "max_sequence_length": settings.max_sequence_length,
                  **({"qtype": spec.quantize} if spec.quantize != "none" else {})},
    }
    raw = {"job": "extension", "config": {"name": "gpu_check", "process": [process]}}
    return bench_job_dict(raw, settings.out_dir / "runs" / spec.id, settings.warmup + settings.steps + 1)


def _device_peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _timed_steps(bench: Bench, settings: Settings, deadline: float) -> tuple[list[float], list[float]]:
    """Warm-up steps (compile, optimizer state, allocator), then measured ones until `steps` or the deadline."""
    process, ctx = bench.process, bench.ctx
    seconds, losses = [], []
    for index in range(settings.warmup + settings.steps):
        if index == settings.warmup:
            _reset_peak(ctx.rt.device)
        bench.sync()
        start = time.perf_counter()
        loss = read_logged(ctx, process.optimizer_step(ctx))
        bench.sync()
        if index >= settings.warmup:
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
        if time.perf_counter() > deadline:
            log.warning("row time limit reached after %d step(s)", index + 1)
            break
    return seconds, losses


def _flops_per_step(bench: Bench) -> tuple[int, Any]:
    """Model FLOPs of one optimizer step on the next batch (tools.bench_report.count_flops), counted eagerly: the
    counting hooks must not reach compiled blocks."""
    batch = next(bench.ctx.batches)
    prepared = bench.prepare_reference([batch] * bench.train.gradient_accumulation_steps)
    if not bench.train.compile:
        return bench.flops(prepared)
    with torch.compiler.set_stance("force_eager"):
        return bench.flops(prepared)


def _measure(spec: RowSpec, settings: Settings, deadline: float) -> dict[str, Any]:
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.config.loader import load_job_dict

    job = load_job_dict(job_dict(spec, settings), f"gpu_check row {spec.id}")
    process = BaseSDTrainProcess(job.config.process[0], job.config.name, job)
    process.arch_cls = random_weight_kontext(settings.transformer_config, settings.seed)
    pairs, requests, outputs = process.preflight()
    rt = Runtime(distributed=spec.processes > 1, device=settings.device)
    try:
        _reset_peak(rt.device)
        start = time.perf_counter()
        ctx = process.setup(rt, pairs, requests, outputs)
        setup_seconds = time.perf_counter() - start
        setup_peak = _device_peak_mib(rt.device)
        bench = Bench(process, ctx)
        seconds, losses = _timed_steps(bench, settings, deadline)
        peak = _device_peak_mib(rt.device)
        if not seconds:
            return {"status": "time_limit", "setup_seconds": setup_seconds, "peak_setup_mib": setup_peak}
        flops, count = _flops_per_step(bench)
        return _figures(ctx, settings, seconds, losses, flops, count) | {
            "setup_seconds": setup_seconds, "peak_setup_mib": setup_peak, "peak_allocated_mib": peak,
            "transformer_params": sum(p.numel() for p in ctx.model.transformer.parameters()),
            "trainable_params": sum(p.numel() for p in ctx.params)}
    finally:
        rt.end()


def _figures(ctx, settings: Settings, seconds: list[float], losses: list[float], flops: int, count) -> dict:
    step = statistics.median(seconds)
    device = ctx.rt.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name) if device.type == "cuda" else None
    achieved = flops / step / 1e12
    return {
        "status": "ok" if len(seconds) == settings.steps else "time_limit", "device_name": name,
        "world_size": ctx.rt.world_size, "measured_steps": len(seconds), "s_per_step": step,
        "s_per_step_min": min(seconds), "s_per_step_max": max(seconds),
        "samples_per_s": settings.batch_size * ctx.rt.world_size / step, "loss_mean": statistics.fmean(losses),
        "tokens_per_sample": count.tokens_per_sample, "flops_per_step": flops, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def free_memory(device: str, compiled: bool) -> None:
    """What a finished (or failed) row leaves behind: garbage, the CUDA cache, compiled graphs."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_row(spec: RowSpec, settings: Settings) -> dict[str, Any]:
    """The row's figures (status "ok", or "time_limit" with fewer steps), or its failure as a row: "oom" or
    "error". Never raises for a failing row."""
    row: dict[str, Any] = {"id": spec.id, **asdict(spec), "dtype": settings.dtype, PLANNED_COLUMN: "-"}
    start = time.perf_counter()
    try:
        row.update(_measure(spec, settings, start + settings.row_timeout_s))
    except torch.OutOfMemoryError as exc:
        row.update(status="oom", error=str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "OOM")
    except Exception as exc:  # noqa: BLE001 - one failing row is reported, the matrix goes on
        log.exception("row %s failed", spec.id)
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    row["row_seconds"] = time.perf_counter() - start
    free_memory(settings.device, spec.compile)
    return row


__all__ = ["FLUX_KONTEXT_TRANSFORMER", "PLANNED_COLUMN", "RowSpec", "Settings", "free_memory", "job_dict",
           "random_weight_kontext", "run_row"]
