"""Full fine-tuning and training stages at the config level: what may combine, and how a later process of a job
starts from an earlier one's output.

A job's `config.process` entries run in order. A process may set `model.transformer_path` to a transformer folder,
or to the reference `[process:N]`: the final transformer folder of the earlier full fine-tune `config.process[N]`.
References are checked when the config loads (earlier index, a full fine-tune, distinct run folders) and resolved
just before the later process starts (`resolve_model`), from the folder the earlier process really wrote (which
`--fresh` may have versioned as `<name>_v2`). Duck-typed on the schema's dataclasses: the schema imports this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from toolkit.errors import ConfigError

REFERENCE = re.compile(r"^\[process:(\d+)\]$")


def is_training(process: Any) -> bool:
    return getattr(process, "type", None) == "sd_trainer"


def is_full_finetune(process: Any) -> bool:
    """Full fine-tune: `network: null` or `train.full_finetune: true` (the transformer's own weights train)."""
    return is_training(process) and (process.network is None or process.train.full_finetune)


def run_name(process: Any, job_name: str) -> str:
    """The run folder name (and file prefix) of a training process."""
    return process.name or job_name


def full_finetune_problems(process: Any, path: str) -> list[str]:
    """Settings a full fine-tune cannot honour, each as `key.path: message`."""
    if not is_full_finetune(process):
        return []
    problems: list[str] = []
    model, train = process.model, process.train
    if process.network is not None and process.network != type(process.network)():
        problems.append(f"{path}.network: a full fine-tune (train.full_finetune: true) trains the transformer's own "
                        "weights, not a LoRA; set network: null or remove the network section")
    if model.quantize:
        problems.append(f"{path}.model.quantize: a full fine-tune trains the transformer's own weights, which cannot "
                        "be 8-bit quantized (quantized weights are frozen); set model.quantize: false, or train a "
                        "LoRA (network) on the quantized model")
    if not train.train_unet:
        problems.append(f"{path}.train.train_unet: false with a full fine-tune would train nothing; set it to true")
    if process.save.push_to_hub:
        problems.append(f"{path}.save.push_to_hub: the Hub upload publishes LoRA files; a full fine-tune's "
                        "transformer folder is not uploaded yet: set it to false and upload <run folder>/transformer "
                        "yourself (huggingface-cli upload)")
    if process.save.format != "diffusers":
        problems.append(f"{path}.save.format: {process.save.format!r} is a LoRA key layout; a full fine-tune saves a "
                        "diffusers transformer folder; set save.format: diffusers")
    for index, dataset in enumerate(process.datasets):
        if dataset.network_weight != 1:
            problems.append(f"{path}.datasets[{index}].network_weight: is the LoRA's strength; a full fine-tune has "
                            "no LoRA; remove it or use loss_multiplier to weight the dataset")
    return problems


def stage_problems(job_name: str, processes: Sequence[Any]) -> list[str]:
    """Cross-process problems: `[process:N]` references, and training processes that would share a run folder."""
    problems: list[str] = []
    folders: dict[tuple[str, str], int] = {}
    for index, process in enumerate(processes):
        path = f"config.process[{index}]"
        if getattr(process, "model", None) is None:  # a caption process: no model to hand on
            continue
        problems += _reference_problems(process.model.transformer_path, index, processes, path)
        if is_training(process):
            key = (os.path.normpath(process.training_folder), run_name(process, job_name))
            if key in folders:
                problems.append(f"{path}.name: this process would write into the run folder of config.process"
                                f"[{folders[key]}] ({os.path.join(*key)}); give each training process its own name "
                                "(e.g. name: '[name]_stage2') or training_folder")
            folders.setdefault(key, index)
    return problems


def _reference_problems(value: Optional[str], index: int, processes: Sequence[Any], path: str) -> list[str]:
    key = f"{path}.model.transformer_path"
    if value is None or not value.startswith("[process"):
        return []
    match = REFERENCE.match(value)
    if match is None:
        return [f"{key}: {value!r} is not a reference; write '[process:N]' with N the index of an earlier process"]
    source = int(match.group(1))
    if source >= index:
        return [f"{key}: {value!r} must name an earlier process (config.process[0..{index - 1}]): processes run in "
                "order, so a later one has no output yet" if index else
                f"{key}: {value!r} in the first process: there is no earlier process to start from"]
    if not is_full_finetune(processes[source]):
        return [f"{key}: config.process[{source}] is not a full fine-tune (it writes a LoRA, not a transformer "
                "folder); set network: null or train.full_finetune: true there, or give a transformer folder path"]
    return []


def resolve_model(model_cfg: Any, outputs: Sequence[Optional[Path]], index: int) -> Any:
    """`model_cfg` with a `[process:N]` transformer_path replaced by the folder process N wrote (`outputs[N]`, the
    results of the processes run so far), and any transformer_path checked; raises ConfigError before loading."""
    value = model_cfg.transformer_path
    if value is None:
        return model_cfg
    key = f"config.process[{index}].model.transformer_path"
    match = REFERENCE.match(value)
    if match is not None:
        source = int(match.group(1))
        if source >= len(outputs) or outputs[source] is None:
            raise ConfigError(f"{key}: {value} has not run yet in this job (run the whole config, not one process)")
        value = str(outputs[source])
    problems = folder_problems(Path(value), key)
    if problems:
        raise ConfigError("\n".join(problems))
    return dataclasses.replace(model_cfg, transformer_path=value)


def folder_problems(folder: Path, key: str) -> list[str]:
    """Why `folder` is not a diffusers transformer folder (config.json and safetensors weights), if it is not."""
    if not folder.is_dir():
        return [f"{key}: {folder} is not a folder"]
    if not (folder / "config.json").is_file():
        return [f"{key}: {folder} has no config.json (not a diffusers transformer folder)"]
    if not any(folder.glob("*.safetensors")):
        return [f"{key}: {folder} has no .safetensors weights"]
    return []


__all__ = ["REFERENCE", "folder_problems", "full_finetune_problems", "is_full_finetune", "is_training",
           "resolve_model", "run_name", "stage_problems"]
