"""FSDP (config/accelerate/fsdp.yaml) for the full fine-tune: block-granular wrapping, the refusal on CPU, and a
GPU-only end-to-end run of the tiny full fine-tune under FSDP with one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel

from tests.helpers import REPO, merge, tiny_config_dict, write_config
from tests.launch import free_port

FSDP_CONFIG = REPO / "config" / "accelerate" / "fsdp.yaml"
# Measured with accelerate 1.15.0 / torch 2.13 CPU build (README, "Full fine-tuning and stages").
CPU_REASON = ("FSDP needs a GPU: on CPU accelerate 1.15.0 raises 'There are currently no available devices found, "
              "must be one of 'XPU', 'CUDA', ...' (FullyShardedDataParallelPlugin with sync_module_states), and "
              "without sync_module_states it silently sets up unsharded MULTI_CPU data parallelism")


def _launch(config_file: Path, run_config: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", "1", "--main_process_port", str(free_port()), str(REPO / "run.py"), str(run_config)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "WORLD_SIZE", "RANK"))}
    return subprocess.run(cmd, cwd=REPO, env={**clean, "HF_HUB_OFFLINE": "1", **env}, capture_output=True,
                          text=True, timeout=600)


def _full_config(tmp_path: Path, model_dir: Path, data_dir: Path, device: str) -> Path:
    cfg = merge(tiny_config_dict(tmp_path / "out", model_dir, data_dir),
                {"network": None, "device": device, "train.distributed_training": True, "train.steps": 3,
                 "save.save_every": 2, "sample.prompts": []})
    return write_config(tmp_path / "cfg.yaml", cfg)


def test_fsdp_config_wraps_each_flux_block(tiny_model_dir):
    """Sharding units are the double- and single-stream blocks, named as diffusers names their classes."""
    fsdp = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # consolidated on the main process when saving
    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_model_dir / "transformer"))
    blocks = {type(transformer.transformer_blocks[0]).__name__, type(transformer.single_transformer_blocks[0]).__name__}
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == blocks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("sync, expected", [
    (True, "There are currently no available devices found, must be one of 'XPU', 'CUDA'"),
    (False, "launched with an FSDP accelerate config, but accelerate set up MULTI_CPU"),
])
def test_fsdp_on_cpu_is_refused_not_silently_unsharded(tmp_path, tiny_model_dir, demo_data_dir, sync, expected):
    config_file = tmp_path / "fsdp.yaml"
    config_file.write_text(FSDP_CONFIG.read_text().replace("fsdp_sync_module_states: true",
                                                           f"fsdp_sync_module_states: {str(sync).lower()}"))
    proc = _launch(config_file, _full_config(tmp_path, tiny_model_dir, demo_data_dir, "cpu"))
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "tiny" / "transformer").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CPU_REASON)
def test_tiny_full_finetune_under_fsdp_saves_a_consolidated_transformer(tmp_path, tiny_model_dir, demo_data_dir):
    proc = _launch(FSDP_CONFIG, _full_config(tmp_path, tiny_model_dir, demo_data_dir, "cuda"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "FSDP: parameters sharded over 1 processes" in log and "full fine-tune" in log
    run_dir = tmp_path / "out" / "tiny"
    base = FluxTransformer2DModel.from_pretrained(str(tiny_model_dir / "transformer")).state_dict()
    for folder in (run_dir / "transformer", run_dir / "transformer_000000002"):
        tuned = FluxTransformer2DModel.from_pretrained(str(folder)).state_dict()
        assert tuned.keys() == base.keys(), "consolidated keys are the plain diffusers names"
        assert sum(not torch.equal(base[k], tuned[k]) for k in base) > len(base) // 2
