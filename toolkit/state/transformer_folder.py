"""Full fine-tune outputs: diffusers-format transformer folders, written atomically, with step folders rotated.

    <run folder>/transformer/                 final weights (config.json + diffusion_pytorch_model*.safetensors)
    <run folder>/transformer_<step:09d>/      step checkpoints, the newest save.max_step_saves_to_keep kept

Each loads with `FluxTransformer2DModel.from_pretrained(folder)` (or the architecture's class). diffusers'
`save_pretrained` cannot be given a state dict, and under FSDP the consolidated one exists only as a dict on the main
process, so the folder is written here the way save_pretrained writes it: the model's config, then the weights
split into safetensors shards with diffusers' file names and index. Everything goes into `.<name>.<random>.tmp/`
first and is renamed into place, so a kill never leaves a half-written folder under a final name.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from toolkit.state import atomic

log = logging.getLogger(__name__)

FINAL_NAME = "transformer"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' SAFETENSORS_WEIGHTS_NAME, sharded
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
INFO_NAME = "training.json"
MAX_SHARD_SIZE = "10GB"  # save_pretrained's default
_STEP_NAME = re.compile(rf"^{FINAL_NAME}_(\d{{9}})$")


def step_folder_name(step: int) -> str:
    return f"{FINAL_NAME}_{step:09d}"


def list_step_folders(run_folder: Path) -> list[tuple[int, Path]]:
    """Step transformer folders under their final names, oldest first."""
    run_folder = Path(run_folder)
    if not run_folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_folder.iterdir() if (m := _STEP_NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def prune_step_folders(run_folder: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest `keep` step folders; `protect` (the one just written) always stays."""
    folders = [p for _, p in list_step_folders(run_folder)]
    doomed = [p for p in (folders[:-keep] if keep > 0 else folders) if p.resolve() != Path(protect).resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.debug("removed old transformer checkpoint %s", p)
    return doomed


def module_state_dict(rt: Any, wrapped: torch.nn.Module, module: torch.nn.Module, copy: bool = False
                      ) -> Optional[dict]:
    """`module`'s full state dict, taken from the wrapped training module it sits in (DDP, FSDP).

    Every process must call it (under FSDP it gathers the shards); the main process gets the dict (CPU tensors under
    FSDP), the others None. Without FSDP the tensors share the live weights' storage: `copy` gives CPU copies, for
    weights that are about to change (EMA weights swapped back out)."""
    full = rt.full_state_dict(wrapped)
    if not rt.is_main:
        return None
    root = rt.unwrap(wrapped)
    prefix = next((name for name, m in root.named_modules() if m is module), None)
    if prefix is None:
        raise RuntimeError("the trained module is not inside the wrapped training module")
    start = prefix + "."
    mine = {key[len(start):]: value for key, value in full.items() if key.startswith(start)} if prefix else dict(full)
    return {key: value.detach().to("cpu", copy=True) for key, value in mine.items()} if copy else mine


def save_transformer_folder(folder: Path, config_owner: Any, state_dict: Mapping[str, torch.Tensor],
                            dtype: torch.dtype, info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a diffusers model folder atomically: `config_owner.save_config` (a diffusers ModelMixin), the weights
    cast to `dtype` in safetensors shards, and `info` as training.json (main process only)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        config_owner.save_config(str(tmp))
        _write_weights(tmp, state_dict, dtype)
        if info is not None:
            (tmp / INFO_NAME).write_text(json.dumps(dict(info), indent=2, sort_keys=True), encoding="utf-8")
        atomic.fsync_paths([*tmp.iterdir(), tmp])
        atomic.swap_in_folder(tmp, folder)  # an older save of the same name is moved aside, then deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_temporary(run_folder: Path) -> None:
    """Delete what interrupted folder saves left behind."""
    for leftover in list(Path(run_folder).glob(f".{FINAL_NAME}*.tmp")) + list(Path(run_folder).glob(
            f".{FINAL_NAME}*.old")):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_weights(folder: Path, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    split = split_torch_state_dict_into_shards(dict(state_dict), filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: _cast(state_dict[name], dtype) for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Floating weights take the save dtype; integer buffers (none in FLUX, but possible) keep theirs.
    target = dtype if tensor.is_floating_point() else tensor.dtype
    out = tensor.detach().to("cpu", target).contiguous()
    # safetensors refuses tensors that share storage (e.g. views of one flat buffer): copy when nothing did yet.
    shared = out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    return out.clone() if shared else out


__all__ = ["FINAL_NAME", "INFO_NAME", "list_step_folders", "module_state_dict", "prune_step_folders",
           "remove_temporary", "save_transformer_folder", "step_folder_name"]
