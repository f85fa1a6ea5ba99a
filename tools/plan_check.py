"""`python -m tools.plan_check [CONFIG ...]`: the memory planner (run.py plan) against a measured CPU training step.

For each config (default: the tiny and the medium Kontext configs) the real trainer loads the model and data (as
tools.bench does: outputs in a temporary folder, no sampling or saving) and runs one optimizer step, so the optimizer
state exists; then a second real step is measured:

  measured peak = bytes of every live tensor at the step's start (each storage once: model weights, the LoRA, the
                  optimizer state, caches; found through the garbage collector)
                + the peak of what the step allocates (toolkit.plan.trace.PeakTracker on the real tensors: every
                  storage an op creates, until it is freed).

CPU tensors have no allocator statistics to read, and the process RSS mixes in the Python heap, libraries and
memory-mapped files; counting tensor storages is what a GPU's torch.cuda.max_memory_allocated counts. Each measured step
is planned for the same config at its batch's pixel size and batch size (the planner's default is the largest square
bucket). Prints both, and the error of the plan against the measurement (gradient accumulation set to 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from toolkit.plan.planner import Options
from toolkit.plan.trace import PeakTracker
from tools.bench import bench_job_dict, missing_input_hints

log = logging.getLogger(__name__)
DEFAULT_CONFIGS = ("config/examples/train_lora_flux_kontext_tiny.yaml",
                   "config/examples/bench_medium_flux_kontext.yaml")
MiB = 2 ** 20


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor the garbage collector can see, each storage counted once."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _recording(batches, seen: list):
    for batch in batches:
        seen.append(batch)
        yield batch


def _pixel_size(batch: dict) -> tuple[int, int]:
    if "target" in batch:
        return tuple(batch["target"].shape[-2:])
    return tuple(8 * side for side in batch["target_latents"].shape[-2:])  # latents cached: VAE factor 8


def measure(process, ctx, steps: int) -> list[dict[str, Any]]:
    """One warm-up optimizer step, then `steps` measured ones (gradient accumulation 1), each with its batch's
    pixel size and batch size."""
    process.optimizer_step(ctx)
    seen: list = []
    ctx.batches = _recording(ctx.batches, seen)
    results = []
    for _ in range(steps):
        baseline = live_tensor_bytes()
        tracker = PeakTracker()
        with tracker:
            process.optimizer_step(ctx)
        batch = seen[-1]
        results.append({"size_hw": _pixel_size(batch), "batch": len(batch["caption"]), "baseline": baseline,
                        "step_peak": tracker.peak, "measured": baseline + tracker.peak})
    return results


def check(config: str, steps: int = 2, checkpointing: Optional[bool] = None) -> list[dict[str, Any]]:
    """Measured and planned peaks of `steps` training steps of CONFIG's first process."""
    from jobs.extensions import load_extensions
    from jobs.plan import make_planner
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.config.loader import find_config_file, load_job_dict, read_config_file
    from toolkit.dist import Runtime
    from toolkit.errors import UserError

    load_extensions()
    path = find_config_file(config)
    with tempfile.TemporaryDirectory(prefix="plan-check-") as tmp:
        raw = bench_job_dict(read_config_file(path), Path(tmp), steps + 1)
        raw["config"]["process"][0]["train"]["gradient_accumulation_steps"] = 1
        if checkpointing is not None:
            raw["config"]["process"][0]["train"]["gradient_checkpointing"] = checkpointing
        job = load_job_dict(raw, str(path))
        cfg = job.config.process[0]
        hints = missing_input_hints(cfg)
        if hints:
            raise UserError("\n".join(hints))
        process = BaseSDTrainProcess(cfg, job.config.name, job, path)
        pairs, requests, outputs = process.preflight()
        rt = Runtime(distributed=False, device=cfg.device)
        try:
            results = measure(process, process.setup(rt, pairs, requests, outputs), steps)
        finally:
            rt.end()
    planner = make_planner(cfg)
    for r in results:
        opts = replace(Options.from_config(cfg), size=r["size_hw"], batch=r["batch"])
        plan = planner.plan(opts, other=False)
        r.update(config=config, checkpointing=cfg.train.gradient_checkpointing, planned=plan.train_peak, error=plan.train_peak / r["measured"] - 1,
                 planned_step=sum(p.nbytes for p in plan.parts if p.name in ("gradients", "activations")))
        r["step_error"] = r["planned_step"] / r["step_peak"] - 1
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.plan_check", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=2, help="measured steps per config (default 2)")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default=None,
                   help="override the configs' train.gradient_checkpointing")
    p.add_argument("--table", action="store_true", help="print README's 'Will it fit?' table (FLUX.1 Kontext [dev] "
                   "from the flux-kontext-dev preset at 512 and 1024 px) instead of measuring")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.table:
        sys.stdout.write(fit_table() + "\n")
        return 0
    checkpointing = None if args.gradient_checkpointing is None else args.gradient_checkpointing == "on"
    for r in (r for config in args.configs for r in check(config, args.steps, checkpointing)):
        config = r["config"]
        sys.stdout.write(f"{config} (checkpointing {'on' if r['checkpointing'] else 'off'}): batch {r['batch']} x {r['size_hw'][0]}x{r['size_hw'][1]} px | measured {r['measured'] / MiB:.1f}"
                         f" MiB (live tensors {r['baseline'] / MiB:.1f} + step {r['step_peak'] / MiB:.1f}) | planned "
                         f"{r['planned'] / MiB:.1f} MiB (step {r['planned_step'] / MiB:.1f}) | error {r['error']:+.1%}"
                         f" (step {r['step_error']:+.1%})\n")
        sys.stdout.write("PLAN_CHECK_JSON " + json.dumps(r) + "\n")
    return 0


TABLE_ROWS = (  # (label, Options changes) applied to the 24 GB example's options
    ("bf16, no checkpointing", {"quantize": False, "checkpointing": False, "text_cached": False, "low_vram": False}),
    ("bf16, checkpointing", {"quantize": False, "checkpointing": True, "text_cached": False, "low_vram": False}),
    ("bf16, checkpointing, cached text", {"quantize": False, "checkpointing": True, "text_cached": True,
                                          "low_vram": False}),
    ("qfloat8, checkpointing", {"quantize": True, "checkpointing": True, "text_cached": False, "low_vram": False}),
    ("qfloat8, checkpointing, low_vram", {"quantize": True, "checkpointing": True, "text_cached": False,
                                          "low_vram": True}),
    ("qfloat8, checkpointing, low_vram, cached text", {"quantize": True, "checkpointing": True, "text_cached": True,
                                                       "low_vram": True}),
    ("+ quantize_te (8-bit T5)", {"quantize": True, "checkpointing": True, "text_cached": True, "low_vram": True,
                                  "quantize_te": True}),
)
TABLE_GPUS = (16, 24, 48, 80)  # card memory as sold: these cards hold that many GiB
HEADROOM_GIB = 1.0  # CUDA context and allocator fragmentation, not counted by the plan


def fit_table(config: str = "config/examples/train_lora_flux_kontext_24gb.yaml", preset: str = "flux-kontext-dev",
              resolutions: tuple[int, ...] = (512, 1024)) -> str:
    """Markdown: the planned peak of FLUX.1 Kontext [dev] (from `preset`) per option row and resolution, and on
    which card sizes it fits with HEADROOM_GIB to spare."""
    from jobs.extensions import load_extensions
    from jobs.plan import make_planner, training_process

    load_extensions()
    process = training_process(config, 0)
    planner, base = make_planner(process, preset), Options.from_config(process)
    head = "| options (LoRA rank 16, adamw8bit, batch 1, control at the target's size) |"
    head += "".join(f" {r} px: peak GiB | fits |" for r in resolutions)
    lines = [head, "|---|" + "---|---|" * len(resolutions)]
    for label, change in TABLE_ROWS:
        cells = []
        for resolution in resolutions:
            plan = planner.plan(replace(base, resolution=resolution, **change), other=False)
            fits = [f"{gb}" for gb in TABLE_GPUS if plan.peak <= (gb - HEADROOM_GIB) * 2 ** 30]
            cells.append(f" {plan.peak / 2 ** 30:.1f} | {', '.join(fits) + ' GB' if fits else 'none'} |")
        lines.append(f"| {label} |" + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
