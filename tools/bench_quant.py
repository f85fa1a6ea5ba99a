"""`python -m tools.bench_quant [--steps N]`: what 8-bit quantization and caching cost and save while training.

Trains the benchmark config (config/examples/bench_medium_flux_kontext.yaml: the ~82M-param medium model on the demo
data at 128 px) for a fixed number of steps in each variant below, each in its own process (so peak memory is its
own), and prints one table row per variant:

  full precision | quantize qint8 | quantize qfloat8 | + gradient checkpointing | + latent and text caching
  | + low_vram loading

  | full precision + latent and text caching

  | control at about 64x64 px | text trimmed to the captions | control 64 px + text trimmed   (the cheaper Kontext
  steps: datasets[].control_resolution, model.trim_text_tokens; compared with full precision)

Rows starting with "+" add one change to qfloat8 (the default qtype) with everything above them; each row says which
row it is compared with ("vs": its step time / that row's), always the row that differs by just its own change:
caching is measured both on full precision (where the encoders' share is largest) and on qfloat8 + checkpointing.
With --repeats R the variants run R times, round robin (A B C .. A B C ..), so a load change on a shared machine hits
every row alike; a row's s/step is the median over all its measured steps. Columns:
median seconds per optimizer step and the part of it spent in the frozen encoders (VAE + text), setup seconds
(loading, quantizing, filling the caches), peak process memory (RSS) over the whole run and during the training steps
alone, peak device memory on a GPU, bytes of the transformer's base weights, and the loss on a fixed batch (fixed
timesteps and noise) before and after the N steps. Build the inputs once:

  python -m tools.tiny_model --out models/medium-flux-kontext --preset medium
  python -m tools.demo_data --out data/demo

A tool like run.py: it imports jobs/ (the trainer) lazily, inside the child process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from toolkit.train import flow_matching
from tools.bench_report import contention_warning
from toolkit.dist import available_cores

log = logging.getLogger(__name__)

CONFIG = "config/examples/bench_medium_flux_kontext.yaml"
JSON_PREFIX = "BENCH_QUANT_JSON "
_QF8 = {"model.quantize": True, "model.qtype": "qfloat8"}
_CACHING = {"train.cache_text_embeddings": True, "dataset.cache_latents_to_disk": True}
_CKPT = {"train.gradient_checkpointing": True}
# name -> dotted overrides of the first process; "dataset." keys go to every dataset entry.
VARIANTS: dict[str, dict[str, Any]] = {
    "full precision": {},
    "quantize qint8": {"model.quantize": True, "model.qtype": "qint8"},
    "quantize qfloat8": _QF8,
    "+ gradient checkpointing": {**_QF8, **_CKPT},
    "+ latent and text caching": {**_QF8, **_CKPT, **_CACHING},
    "+ low_vram loading": {**_QF8, **_CKPT, **_CACHING, "model.low_vram": True},
    "full precision + latent and text caching": _CACHING,
    "control at about 64x64 px": {"dataset.control_resolution": 64},
    "text trimmed to the captions": {"model.trim_text_tokens": True},
    "control 64 px + text trimmed": {"dataset.control_resolution": 64, "model.trim_text_tokens": True},
}
# What each row's "vs" column compares it with: the variant that differs from it by exactly the one change it names.
COMPARED_TO: dict[str, Optional[str]] = {
    "full precision": None,
    "quantize qint8": "full precision",
    "quantize qfloat8": "full precision",
    "+ gradient checkpointing": "quantize qfloat8",
    "+ latent and text caching": "+ gradient checkpointing",
    "+ low_vram loading": "+ latent and text caching",
    "full precision + latent and text caching": "full precision",
    "control at about 64x64 px": "full precision",
    "text trimmed to the captions": "full precision",
    "control 64 px + text trimmed": "full precision",
}


def _job_dict(raw: dict, out_dir: Path, overrides: dict[str, Any], steps: int, device: str) -> dict:
    """The benchmark config writing only under out_dir (outputs and the disk cache), never sampling nor saving."""
    process = raw["config"]["process"][0]
    process.update(training_folder=str(out_dir / "output"), device=device)
    process.setdefault("train", {}).update(steps=steps, disable_sampling=True)
    process.setdefault("save", {})["save_every"] = steps + 1
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        if section == "dataset":
            for index, dataset in enumerate(process["datasets"]):
                dataset[key] = value
                dataset["cache_dir"] = str(out_dir / f"cache{index}")  # a fresh cache: its build is measured too
        else:
            process.setdefault(section, {})[key] = value
    return raw


def _fixed_loss(ctx, batch: dict) -> float:
    """Flow-matching loss of `batch` at fixed timesteps and noise, LoRA in eval mode (no dropout)."""
    model = ctx.model
    denoiser = model.denoiser()
    denoiser.eval()
    try:
        with torch.no_grad():
            encoded = model.encode_batch(batch)
            x0 = model.clean_latents(encoded)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            t = torch.linspace(0.2, 0.8, x0.shape[0])
            inputs, target = flow_matching.inputs_and_target(model, encoded, noise, t, 1.0)
            return flow_matching.flow_matching_loss(denoiser(**inputs), target, torch.ones(x0.shape[0])).item()
    finally:
        denoiser.train()


class RssPeak:
    """The highest RSS seen while active, sampled every few milliseconds (ru_maxrss also covers the loading)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil  # an accelerate dependency

        self.process, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


def _base_weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if "lora_" not in k)


def run_variant(name: str, steps: int, warmup: int, device: str, config: str) -> dict[str, Any]:
    """Set up the benchmark config with variant `name`, train warmup + steps steps; the measurements as a dict."""
    from jobs.extensions import load_extensions
    from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess
    from toolkit.config.loader import load_job_dict, read_config_file
    from toolkit.data.dataset import collate_batch
    from toolkit.dist import Runtime

    load_extensions()
    with tempfile.TemporaryDirectory(prefix="kontext-bench-quant-") as tmp:
        raw = _job_dict(read_config_file(Path(config)), Path(tmp), VARIANTS[name], warmup + steps, device)
        job = load_job_dict(raw, config)
        process = BaseSDTrainProcess(job.config.process[0], job.config.name, job, Path(config))
        start = time.perf_counter()
        pairs, requests, outputs = process.preflight()
        rt = Runtime(distributed=False, device=process.cfg.device)
        try:
            ctx = process.setup(rt, pairs, requests, outputs)
            setup_seconds = time.perf_counter() - start
            batch = collate_batch([ctx.dataset[0]])
            loss_before = _fixed_loss(ctx, batch)
            with RssPeak() as training_rss:
                step_seconds, encode_seconds = _train(process, ctx, steps, warmup)
            loss_after = _fixed_loss(ctx, batch)
        finally:
            rt.end()
    cuda = rt.device.type == "cuda"
    return {"variant": name, "steps": steps, "device": rt.device.type, "threads": torch.get_num_threads(),
            "step_seconds": statistics.median(step_seconds), "step_seconds_all": step_seconds,
            "encode_seconds": statistics.median(encode_seconds), "setup_seconds": setup_seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_training_rss_mib": training_rss.peak / 2**20,
            "peak_device_mib": torch.cuda.max_memory_allocated(rt.device) / 2**20 if cuda else None,
            "transformer_weight_bytes": _base_weight_bytes(ctx.model.transformer),
            "loss_before": loss_before, "loss_after": loss_after}


def _train(process, ctx, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of each measured optimizer step, and of its encode_batch part (VAE + text encoders)."""
    sync = (lambda: torch.cuda.synchronize(ctx.rt.device)) if ctx.rt.device.type == "cuda" else (lambda: None)
    model, encode_batch, spent = ctx.model, ctx.model.encode_batch, [0.0]

    def timed_encode(batch):
        sync()
        begin = time.perf_counter()
        try:
            return encode_batch(batch)
        finally:
            sync()
            spent[0] += time.perf_counter() - begin

    model.encode_batch = timed_encode  # an instance attribute: the class method is untouched
    step_seconds, encode_seconds = [], []
    try:
        for step in range(warmup + steps):
            spent[0] = 0.0
            sync()
            begin = time.perf_counter()
            float(process.optimizer_step(ctx).loss)  # the host read the train loop does when it logs
            sync()
            if step >= warmup:
                step_seconds.append(time.perf_counter() - begin)
                encode_seconds.append(spent[0])
    finally:
        del model.encode_batch
    return step_seconds, encode_seconds


def _versus(row: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> str:
    """"x1.23 vs <row>" for the row it is compared with; for caching rows also the saving the encoders' share
    predicts (issue: caching should cut the step by at least that share)."""
    base = by_name.get(COMPARED_TO.get(row["variant"]) or "")
    if base is None:
        return "-"
    text = f"x{row['step_seconds'] / base['step_seconds']:.2f} vs {base['variant']}"
    if "caching" in row["variant"] and base["step_seconds"] > 0:
        text += f" (encoders were {base['encode_seconds'] / base['step_seconds']:.0%} of it)"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get("full precision", rows[0])["transformer_weight_bytes"]
    gpu = any(r["peak_device_mib"] is not None for r in rows)
    head = ["variant", "s/step", "vs", "encode s/step", "setup s", "peak RSS MiB: run / training"] \
        + (["peak GPU MiB"] if gpu else []) \
        + ["transformer weights", "loss before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['step_seconds']:.3f}", _versus(r, by_name), f"{r['encode_seconds']:.3f}",
                 f"{r['setup_seconds']:.1f}", f"{r['peak_rss_mib']:.0f} / {r['peak_training_rss_mib']:.0f}"] \
            + ([f"{r['peak_device_mib']:.0f}"] if gpu else []) \
            + [f"{r['transformer_weight_bytes'] / 2**20:.1f} MiB ({r['transformer_weight_bytes'] / base:.0%})",
               f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from R runs of a variant: medians over all measured steps; the spread of the per-run medians."""
    steps = [s for r in runs for s in r["step_seconds_all"]]
    encode = [r["encode_seconds"] for r in runs]
    return {**runs[0], "step_seconds": statistics.median(steps), "step_seconds_all": steps,
            "run_medians": [r["step_seconds"] for r in runs], "encode_seconds": statistics.median(encode),
            "setup_seconds": statistics.median(r["setup_seconds"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_training_rss_mib": max(r["peak_training_rss_mib"] for r in runs)}


def _child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "tools.bench_quant", "--variant", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--config", args.config]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith(JSON_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"variant {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(JSON_PREFIX):])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_quant", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--config", default=CONFIG, help=f"the training config to vary (default {CONFIG})")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole variant list this many times, round robin (default 1; 3 on a busy machine)")
    parser.add_argument("--only", type=lambda text: [v.strip() for v in text.split(",")],
                        help="comma list of the variants to run (default: all), e.g. 'full precision,text trimmed "
                             "to the captions'")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.variant:
        result = run_variant(args.variant, args.steps, args.warmup, args.device, args.config)
        sys.stdout.write(JSON_PREFIX + json.dumps(result) + "\n")
        return 0
    for needed in ("models/medium-flux-kontext", "data/demo"):
        if not Path(needed).exists() and needed in Path(args.config).read_text(encoding="utf-8"):
            log.error("%s is missing; see `python -m tools.bench_quant --help` for how to build it", needed)
            return 2
    warning = contention_warning(available_cores())
    if warning:
        log.warning("%s", warning)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            runs[name].append(_child(name, args))
            log.warning("round %d, %s: %.3f s/step", repeat + 1, name, runs[name][-1]["step_seconds"])
    rows = [merge_repeats(runs[name]) for name in names]
    sys.stdout.write(format_table(rows) + "\n")
    sys.stdout.write(f"{args.steps} steps after {args.warmup} warm-up per variant x {args.repeats} round(s), device "
                     f"{args.device}, {rows[0]['threads']} threads; total {time.perf_counter() - started:.0f} s; "
                     f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
                     + (f"; WARNING: {warning}" if warning else "") + "\n")
    sys.stdout.write(JSON_PREFIX + json.dumps(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
