"""Low-VRAM loading of a diffusers transformer: built on the meta device and filled one block at a time from its
checkpoint files; each block is quantized on the CPU and then moved to the device, so the device never holds the
full-precision transformer (and the CPU holds one full-precision block at a time). The normal path quantizes on the
device, which is faster but needs the full-precision model there first. Both give the same quantized weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from toolkit.quant.frozen import QTYPES, release_checkpoint_memory, safe_exclude

log = logging.getLogger(__name__)

_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def transformer_folder(name_or_path: str) -> Path:
    """The local `transformer/` folder of a diffusers model folder or Hub id (downloads only that folder)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return local / "transformer"
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["transformer/*"])) / "transformer"


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (single file or sharded with an index)."""
    index = folder / f"{_WEIGHTS_NAME}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / _WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no {_WEIGHTS_NAME} nor its .index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def block_units(model: torch.nn.Module) -> Iterator[str]:
    """Names of the load units: top-level children, with block lists split into their blocks."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            yield from (f"{name}.{i}" for i in range(len(child)))
        else:
            yield name


def _read_unit(files: dict[str, Path], prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors under `prefix.`, keys relative to it, floating ones cast to `dtype` (like diffusers)."""
    from safetensors import safe_open

    keys = [k for k in files if k.startswith(prefix + ".")]
    state = {}
    for path in sorted({files[k] for k in keys}):
        with safe_open(str(path), framework="pt") as f:
            for key in (k for k in keys if files[k] == path):
                tensor = f.get_tensor(key)
                state[key[len(prefix) + 1:]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def load_transformer_blockwise(model_class: type, name_or_path: str, dtype: torch.dtype, device: torch.device,
                               qtype: Optional[str], exclude: Sequence[str] = (),
                               folder: Optional[str] = None) -> torch.nn.Module:
    """A diffusers transformer (`model_class`) built block by block: read a block on the CPU, quantize it there
    (qtype set; `exclude` stays full precision, plus what safe_exclude adds), move it to `device`. Peak device memory
    is the quantized model; peak CPU memory one full-precision block plus the rest."""
    from accelerate import init_empty_weights
    from optimum import quanto

    folder = Path(folder) if folder else transformer_folder(name_or_path)  # folder: model.transformer_path
    config = model_class.load_config(str(folder))
    with init_empty_weights():
        model = model_class.from_config(config)
    if qtype not in (None, *QTYPES):
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    exclude = safe_exclude(model, qtype, dtype, always=exclude) if qtype else []
    files = weight_files(folder)
    for unit in block_units(model):
        state = _read_unit(files, unit, dtype)
        model.get_submodule(unit).load_state_dict(state, strict=True, assign=True)
        if qtype:
            # Through the root, so names (and exclude patterns) are the full ones, exactly as in the normal path.
            quanto.quantize(model, weights=getattr(quanto, qtype), include=[unit, unit + ".*"], exclude=exclude)
            quanto.freeze(model.get_submodule(unit))  # looked up again: a quantized Linear unit is a new module
            release_checkpoint_memory(model.get_submodule(unit))
        model.get_submodule(unit).requires_grad_(False).to(device)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"{folder}: the checkpoint has no weights for {leftover[:5]}")
    model.requires_grad_(False)
    model.eval()
    log.info("transformer loaded block by block%s onto %s", f" and quantized ({qtype})" if qtype else "", device)
    return model


__all__ = ["block_units", "load_transformer_blockwise", "transformer_folder", "weight_files"]
