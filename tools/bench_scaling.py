"""`python -m tools.bench_scaling CONFIG [--steps N] [--warmup K] [--model PATH]`: data-parallel scaling.

Trains CONFIG for warmup + steps optimizer steps with 1 and with 2 processes, each started by the real launcher
(run_distributed_training.sh), and reads the per-step wall time the trainer logs to TensorBoard
(`perf/step_seconds`, `perf/samples_per_second`, logged every step here). It prints samples/s for each process
count (from the median step time, so one step slowed by another program does not count; the mean is printed too),
the scaling efficiency throughput(2) / (2 x throughput(1)) and one JSON line. The load average printed with each run
tells whether something else was using the cores.

The per-process batch stays as configured, so 2 processes train twice the samples per step (weak scaling).
Without GPUs both runs give every process the same number of threads, cores // 2 (1 thread each on 2 cores):
otherwise the 1-process run would use all cores and the comparison would measure threads, not processes.
The config is copied with: distributed_training on, no sampling, no intermediate saves, log every step, output to
a temporary folder; `--model` points it at another base model (e.g. models/medium-flux-kontext).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from toolkit.config.loader import find_config_file, read_config_file
from toolkit.dist import available_cores

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "run_distributed_training.sh"
PROCESS_COUNTS = (1, 2)


@dataclass
class Throughput:
    processes: int
    steps: int  # measured steps (after warmup)
    seconds_per_step: float  # median: robust to a step slowed by something else on the machine
    samples_per_second: float  # samples per step / median seconds per step
    mean_samples_per_second: float  # all measured samples / all measured seconds
    load_average: float  # 1-minute load average when the run ended (> cores: the machine was shared)


def bench_config(raw: dict, out_dir: Path, steps: int, model: str | None) -> dict:
    """A copy of the job dict that trains `steps` steps, logs each one, and writes nothing but the run's logs."""
    raw = copy.deepcopy(raw)
    raw["config"]["name"] = "bench"
    for process in raw["config"]["process"]:
        process["training_folder"] = str(out_dir)
        process["log_every"] = 1
        process.setdefault("train", {}).update(steps=steps, distributed_training=True, disable_sampling=True)
        process.setdefault("save", {})["save_every"] = steps + 1
        if model is not None:
            process.setdefault("model", {})["name_or_path"] = model
    return raw


def read_step_times(log_dir: Path, warmup: int) -> tuple[list[float], list[float]]:
    """Per-step seconds and samples of the steps after `warmup`, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    seconds = {e.step: e.value for e in events.Scalars("perf/step_seconds")}
    rates = {e.step: e.value for e in events.Scalars("perf/samples_per_second")}
    measured = sorted(step for step in seconds if step > warmup)
    return [seconds[s] for s in measured], [seconds[s] * rates[s] for s in measured]


def run_once(raw: dict, processes: int, steps: int, warmup: int, model: str | None, env: dict,
             workdir: Path) -> Throughput:
    out_dir = workdir / f"p{processes}"
    config = workdir / f"bench_p{processes}.yaml"
    config.write_text(yaml.safe_dump(bench_config(raw, out_dir, warmup + steps, model), sort_keys=False))
    proc = subprocess.run(["bash", str(LAUNCHER), str(config), str(processes)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"bench: the {processes}-process run failed (exit {proc.returncode})")
    seconds, samples = read_step_times(out_dir / "bench" / "logs", warmup)
    if not seconds:
        raise SystemExit(f"bench: no step timings logged for {processes} process(es)")
    median = statistics.median(seconds)
    return Throughput(processes, len(seconds), median, statistics.median(samples) / median,
                      sum(samples) / sum(seconds), os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a training config (path or name under config/)")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured (default 2)")
    parser.add_argument("--model", default=None, help="replace model.name_or_path, e.g. models/medium-flux-kontext")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    raw = read_config_file(find_config_file(args.config))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "KONTEXT_CPU_THREADS")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    gpu = torch.cuda.is_available()
    threads = None
    if gpu:
        setup = f"GPU: {torch.cuda.get_device_name(0)}, one process per GPU"
    else:
        threads = max(1, available_cores() // max(PROCESS_COUNTS))
        env["OMP_NUM_THREADS"] = str(threads)  # the launcher passes it on to every rank (KONTEXT_CPU_THREADS)
        setup = (f"CPU: {threads} thread(s) per process in both runs ({available_cores()} cores); "
                 "processes talk over gloo")
    log.info("%s; %d warmup + %d measured steps per run", setup, args.warmup, args.steps)

    results = {}
    with tempfile.TemporaryDirectory(prefix="kontext-bench-") as tmp:
        for processes in PROCESS_COUNTS:
            log.info("training with %d process(es)...", processes)
            results[processes] = run_once(raw, processes, args.steps, args.warmup, args.model, env, Path(tmp))
    one, two = results[1], results[2]
    efficiency = two.samples_per_second / (2 * one.samples_per_second)
    lines = [f"setup: {setup}"]
    lines += [f"{r.processes} process(es): {r.samples_per_second:.3f} samples/s "
              f"(median {r.seconds_per_step:.3f} s/step over {r.steps} steps; mean {r.mean_samples_per_second:.3f} "
              f"samples/s; load average {r.load_average:.1f})" for r in (one, two)]
    lines.append(f"scaling efficiency: throughput(2) / (2 x throughput(1)) = {efficiency:.3f}")
    lines.append(json.dumps({"config": str(args.config), "model": args.model, "device": "cuda" if gpu else "cpu",
                             "threads_per_process": threads, "warmup": args.warmup,
                             "results": {str(k): asdict(v) for k, v in results.items()},
                             "scaling_efficiency": round(efficiency, 4)}))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
