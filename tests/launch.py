"""Launching real multi-process CPU runs for tests: accelerate with gloo (`--multi_gpu` + ACCELERATE_USE_CPU, which
FACTS.md found to give real data parallelism without GPUs), the bash launcher, and reading what the runs left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import REPO, merge, tiny_config_dict, write_config

SCRIPTS = Path(__file__).parent / "dist_scripts"
LAUNCHER = REPO / "run_distributed_training.sh"
LAUNCH_TIMEOUT_S = 300  # generous: a loaded CI runner; a healthy 2-process tiny run takes 10-20 s
FAILURE_BOUND_S = 120  # a failed rank must end the whole run within this
# Variables a launch sets for its children; inherited values would leak into the runs under test.
_LAUNCH_VARS = ("KONTEXT_", "ACCELERATE_", "NCCL_", "TORCH_NCCL_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


# -- launching ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def accelerate_launch(script: Path, *args, env: dict[str, str] | None = None, processes: int = 2,
                      timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """What FACTS.md found to give real gloo data parallelism without GPUs (`--cpu` would run ONE process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *map(str, args)]
    env = clean_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", KONTEXT_CPU_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_launcher(*args, script: Path = LAUNCHER, cwd: Path = REPO, env: dict[str, str] | None = None,
                 timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd,
                          env=clean_env(**{"PYTHON": sys.executable, **(env or {})}),
                          capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def ddp_config(folder: Path, model_dir: Path, data_dir: Path, name: str, **overrides) -> Path:
    """The tiny demo config (tests/helpers) with distributed_training on and 1 item per process per step."""
    cfg = merge(tiny_config_dict(folder / "out", model_dir, data_dir, name=name),
                {"train.distributed_training": True, "train.batch_size": 1, **overrides})
    return write_config(folder / f"{name}.yaml", cfg)


def read_probes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"probe_rank{r}.json").read_text()) for r in range(2)]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
