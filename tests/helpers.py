"""Config builders for tests that train the tiny model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def tiny_config_dict(out_dir: Path, model_dir: Path, data_dir: Path, name: str = "tiny") -> dict:
    """The demo config pointed at test folders, small enough for a few seconds of CPU training."""
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [{
                "type": "sd_trainer",
                "training_folder": str(out_dir),
                "device": "cpu",
                "trigger_word": "inv3rt",
                "log_every": 1,
                "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                "save": {"dtype": "float32", "save_every": 3, "max_step_saves_to_keep": 2},
                "datasets": [{"folder_path": str(data_dir / "target"), "control_path": str(data_dir / "control"),
                              "caption_ext": "txt", "caption_dropout_rate": 0.0, "resolution": [64]}],
                "train": {"batch_size": 2, "steps": 4, "gradient_accumulation_steps": 1,
                          "gradient_checkpointing": False, "optimizer": "adamw", "lr": 1e-3,
                          "timestep_type": "sigmoid", "dtype": "fp32", "seed": 7, "skip_first_sample": True},
                "model": {"name_or_path": str(model_dir), "arch": "flux_kontext", "max_sequence_length": 16},
                "sample": {"sample_every": 1000, "width": 64, "height": 64, "sample_steps": 2,
                           "prompts": [f"[trigger] invert --ctrl_img {data_dir / 'sample_control' / 'sample_000.png'}"]},
            }],
        },
        "meta": {"name": "[name]"},
    }


def merge(base: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys on the first process: {"train.steps": 2} -> process[0].train.steps = 2."""
    out = copy.deepcopy(base)
    for dotted, value in overrides.items():
        node = out["config"]["process"][0]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def first_bucket_batch(dataset):
    """The first two items of the dataset's first bucket, collated: a fixed batch to measure a loss on."""
    from toolkit.data.dataset import collate_batch

    keys = dataset.bucket_keys
    return collate_batch([dataset[i] for i, key in enumerate(keys) if key == keys[0]][:2])


def fixed_inputs(model, batch: dict, seed: int = 0):
    """Denoiser inputs and flow-matching target of a two-item `batch` at timesteps 0.3 and 0.7 with seeded noise."""
    import torch

    from toolkit.train import flow_matching

    encoded = model.encode_batch(batch)
    x0 = model.clean_latents(encoded)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return flow_matching.inputs_and_target(model, encoded, noise, torch.tensor([0.3, 0.7]), 1.0)


def assert_same_tensors(a: Path, b: Path) -> dict:
    """Two safetensors files hold the same keys and bit-identical tensors; returns the first file's tensors."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:2]}"
    return first
