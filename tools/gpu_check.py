"""`python -m tools.gpu_check`: FLUX.1 Kontext at its real size on one GPU, in one command, no download.

Trains FLUX.1 Kontext's real transformer (19 double + 38 single blocks, 24 heads x 128, ~11.9B parameters) with
random weights, through the trainer's real step (tools.gpu_check_row), for a matrix of
resolution (512, 1024 px; the control image at the same size) x base (none = bf16, qint8, qfloat8) x gradient
checkpointing (off, on) x train.compile (off, on). Text encoders are small ones with FLUX.1's real output shapes
(T5 512 x 4096, CLIP pooled 768) whose embeddings are cached, and latents are cached, as a 24 GB run does.

Each row runs in its own child process (a clean device, an exact peak, a hard per-row time limit; `--in-process` runs
them here instead), a few warm-up steps and then measured ones. A row that runs out of memory is a row with status
"oom", not a crash. Rows run in order of interest (bf16 first, compile last) until `--budget-s` is spent; the rest
are marked "skipped". Results: one JSON file (--out) and a printed table:
  s/step, samples/s: median of the measured optimizer steps (loss read included, as the train loop does);
  peak MiB: torch.cuda.max_memory_allocated over the measured steps (the peak while loading and quantizing is in
  the JSON as peak_setup_mib); planned MiB: the memory planner's figure for the row ("-" until it is wired in);
  MFU: model FLOPs per step / s per step / the GPU's dense bf16 peak (tools.bench_report.PEAK_BF16_TFLOPS).
  FLOPs per step = 2 x (frozen Linear forward FLOPs) + 3 x (LoRA Linear + attention forward FLOPs), where a Linear's
  forward is 2 x rows x in x out over the rows it really sees (image tokens, text tokens or one row per sample) and
  attention is 4 x heads x L_q x L_k x head_dim per call; gradient-checkpointing recompute is not counted.
`--processes N` (a multi-GPU machine) runs every row with 1 and with N processes through accelerate's launcher
and adds the scaling efficiency samples/s(N) / (N x samples/s(1)).
`--smoke` runs the same code on the CPU with the tiny model and a small matrix (what tests/test_gpu_check.py runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from itertools import product
from pathlib import Path
from typing import Any, Callable, Optional

from toolkit.state.atomic import atomic_write_text
from tools.gpu_check_row import FLUX_KONTEXT_TRANSFORMER, PLANNED_COLUMN, RowSpec, Settings, run_row

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CHILD_GRACE_S = 90.0  # imports, CUDA start and process exit on top of a row's own time limit (never past the budget)
PAIRS = 2
DEFAULTS = {  # (full run on a GPU, --smoke on the CPU)
    "resolutions": ("512,1024", "64"), "quantize": ("none,qint8,qfloat8", "none,qint8"),
    "checkpointing": ("off,on", "off,on"), "compile": ("off,on", "off"), "warmup": (2, 1), "steps": (3, 2),
    "max_sequence_length": (512, 32), "budget_s": (540.0, 300.0), "row_timeout_s": (150.0, 120.0),
    "device": ("cuda", "cpu"), "dtype": ("bf16", "fp32"),
}


def _switches(text: str) -> list[bool]:
    values = {"off": False, "on": True}
    try:
        return [values[v.strip()] for v in text.split(",")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a list of on/off, got {text!r}") from None


def matrix(resolutions: list[int], quantize: list[str], checkpointing: list[bool], compile: list[bool],
           processes: int = 1) -> list[RowSpec]:
    """Every combination, in order of interest: compile last, then by base, resolution, checkpointing; with N > 1
    processes each row once with 1 and once with N."""
    counts = (1,) if processes == 1 else (1, processes)
    return [RowSpec(r, q, gc, c, p) for c, q, r, gc, p in product(compile, quantize, resolutions, checkpointing,
                                                                   counts)]


def _write_pairs(folder: Path, size: int) -> None:
    from PIL import ImageOps

    import numpy as np

    from tools.demo_data import CAPTIONS, random_shapes_image

    rng = np.random.default_rng(size)
    for sub in ("target", "control"):
        (folder / sub).mkdir()
    for index in range(PAIRS):
        control = random_shapes_image(rng, size, size)
        control.save(folder / "control" / f"pair_{index}.png")
        ImageOps.invert(control).save(folder / "target" / f"pair_{index}.png")
        (folder / "target" / f"pair_{index}.txt").write_text(CAPTIONS[index % len(CAPTIONS)] + "\n")


def prepare(workdir: Path, resolutions: list[int], model_dir: Optional[Path], smoke: bool) -> tuple[Path, dict]:
    """The pipeline folder (built once: tiny for --smoke, else small encoders with FLUX.1's text shapes) and the
    pairs at each resolution; returns the folder and the random transformer's config."""
    from tools.tiny_common import install_atomically
    from tools.tiny_model import build_tiny_pipeline

    if model_dir is None:
        model_dir = build_tiny_pipeline(workdir / "model", preset="tiny" if smoke else "kontext-shapes")
    for size in resolutions:
        install_atomically(workdir / "data" / str(size), "gpu_check_pairs.json", {"size": size, "pairs": PAIRS},
                           False, lambda tmp, s=size: _write_pairs(tmp, s))
    if smoke:
        config = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
        return Path(model_dir), {k: v for k, v in config.items() if not k.startswith("_")}
    return Path(model_dir), dict(FLUX_KONTEXT_TRANSFORMER)


def _launch_prefix(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "tools.gpu_check"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tools.gpu_check"]


def run_child(spec: RowSpec, argv: list[str], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """The row in a child process (through the launcher for N processes), killed with its process group after
    timeout_s; a child that dies is a row with status "timeout" or "error"."""
    out = workdir / "rows" / f"{spec.id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = _launch_prefix(spec.processes) + list(argv) + ["--only", spec.id, "--in-process",
                                                             "--workdir", str(workdir), "--out", str(out)]
    child = subprocess.Popen(command, cwd=REPO, start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        rc = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return {"id": spec.id, "status": "timeout", "error": f"killed after {timeout_s:.0f} s"}
    if out.exists():
        return json.loads(out.read_text())["rows"][0]
    return {"id": spec.id, "status": "error", "error": f"the child exited with {rc} and wrote no row"}


def run_matrix(rows: list[RowSpec], settings: Settings, budget_s: float,
               runner: Callable[[RowSpec, float], dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in order until budget_s is spent; runner(spec, seconds_left) runs one."""
    start, results = time.perf_counter(), []
    for spec in rows:
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            results.append({"id": spec.id, "status": "skipped", "error": "the time budget (--budget-s) was spent"})
            continue
        log.info("gpu_check: row %s (%.0f s of budget left)", spec.id, left)
        row = runner(spec, left)
        row.setdefault(PLANNED_COLUMN, "-")
        results.append(row)
        log.info("gpu_check: %s", format_row(row))
    add_scaling(results)
    return results


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """scaling_efficiency on every N-process row whose 1-process twin has a throughput."""
    single = {r["id"].rsplit("-p", 1)[0]: r for r in rows if r["id"].endswith("-p1")}
    for row in rows:
        twin = single.get(row["id"].rsplit("-p", 1)[0])
        n = int(row["id"].rsplit("-p", 1)[1])
        if n > 1 and twin and row.get("samples_per_s") and twin.get("samples_per_s"):
            row["scaling_efficiency"] = row["samples_per_s"] / (n * twin["samples_per_s"])


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ("-" if value is None else str(value))


def format_row(row: dict[str, Any]) -> str:
    return (f"{row['id']:<38} {row.get('status', '?'):<10} {_num(row.get('s_per_step'), 3):>8} "
            f"{_num(row.get('samples_per_s'), 2):>9} {_num(row.get('peak_allocated_mib'), 0):>10} "
            f"{_num(row.get(PLANNED_COLUMN), 0):>11} {_num(row.get('mfu'), 3):>6} "
            f"{_num(row.get('tokens_per_sample'), 0):>7} {_num(row.get('scaling_efficiency'), 2):>7}  "
            f"{row.get('error', '')}")


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'row':<38} {'status':<10} {'s/step':>8} {'samples/s':>9} {'peak MiB':>10} {'planned MiB':>11} "
              f"{'MFU':>6} {'tokens':>7} {'scaling':>7}")
    return "\n".join([header, "-" * len(header)] + [format_row(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, small matrix (the tests)")
    parser.add_argument("--resolutions", help="comma list of px (default 512,1024; smoke 64)")
    parser.add_argument("--quantize", help="comma list of none/qint8/qfloat8 (default all three; smoke none,qint8)")
    parser.add_argument("--checkpointing", type=_switches, help="comma list of off/on (default off,on)")
    parser.add_argument("--compile", type=_switches, help="comma list of off/on (default off,on; smoke off)")
    parser.add_argument("--processes", type=int, default=1, help="N > 1: every row with 1 and N processes")
    parser.add_argument("--warmup", type=int, help="unmeasured steps per row (default 2)")
    parser.add_argument("--steps", type=int, help="measured steps per row (default 3)")
    parser.add_argument("--budget-s", type=float, help="stop starting rows after this many seconds (default 540)")
    parser.add_argument("--row-timeout-s", type=float, help="time limit of one row (default 150)")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens (default 512; smoke 32)")
    parser.add_argument("--device", help="torch device (default cuda; smoke cpu)")
    parser.add_argument("--model-dir", type=Path, help="an existing pipeline folder for the encoders (smoke)")
    parser.add_argument("--workdir", type=Path, help="model folder, data, caches (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("output/gpu_check.json"), help="the JSON result")
    parser.add_argument("--in-process", action="store_true", help="run the rows in this process, not in children")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # a child's one row
    return parser


def _resolved(args: argparse.Namespace) -> argparse.Namespace:
    pick = 1 if args.smoke else 0
    for name, values in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, values[pick])
    args.resolutions = [int(v) for v in str(args.resolutions).split(",")]
    args.quantize = [v.strip() for v in str(args.quantize).split(",")]
    for name in ("checkpointing", "compile"):
        if isinstance(getattr(args, name), str):
            setattr(args, name, _switches(getattr(args, name)))
    if args.model_dir is not None:
        args.model_dir = args.model_dir.resolve()  # children run in the repository root
    bad = [q for q in args.quantize if q not in ("none", "qint8", "qfloat8")]
    if bad or args.processes < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"gpu_check: bad arguments ({bad or 'processes >= 1, steps >= 1, warmup >= 0'})")
    return args


def execute(args: argparse.Namespace, argv: list[str], workdir: Path) -> dict[str, Any]:
    model_dir, transformer = prepare(workdir, args.resolutions, args.model_dir, args.smoke)
    settings = Settings(model_dir=model_dir, data_dir=workdir / "data", out_dir=workdir,
                        transformer_config=transformer, device=args.device, dtype=args.dtype, warmup=args.warmup,
                        steps=args.steps, row_timeout_s=args.row_timeout_s,
                        max_sequence_length=args.max_sequence_length)
    rows = matrix(args.resolutions, args.quantize, args.checkpointing, args.compile, args.processes)
    if args.only:
        rows = [r for r in rows if r.id == args.only]
    if args.in_process:
        def runner(spec: RowSpec, left: float) -> dict[str, Any]:
            return run_row(spec, replace(settings, row_timeout_s=min(settings.row_timeout_s, left)))
    else:
        def runner(spec: RowSpec, left: float) -> dict[str, Any]:
            return run_child(spec, argv, workdir, min(args.row_timeout_s + CHILD_GRACE_S, left))
    results = run_matrix(rows, settings, args.budget_s, runner)
    return {"command": "python -m tools.gpu_check " + " ".join(argv), "smoke": args.smoke,
            "transformer_config": transformer, "max_sequence_length": args.max_sequence_length,
            "warmup_steps": args.warmup, "measured_steps": args.steps, "flops_formula": FLOPS_FORMULA,
            "rows": results}


FLOPS_FORMULA = ("per optimizer step: 2 x frozen-Linear forward FLOPs + 3 x (LoRA Linear + attention) forward FLOPs; "
                 "Linear forward = 2 x rows x in x out over the rows it sees; attention = 4 x heads x Lq x Lk x "
                 "head_dim per call; checkpointing recompute not counted; MFU = FLOPs / s / dense bf16 peak")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _resolved(_parser().parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parent_argv = [a for a in argv if a != "--in-process"] if args.only is None else argv
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result = execute(args, parent_argv, args.workdir or Path(tmp))
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        if args.only is None:
            sys.stdout.write(format_table(result["rows"]) + f"\n\nJSON: {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
