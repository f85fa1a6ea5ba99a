"""8-bit frozen base weights (optimum-quanto) and low-VRAM loading of the FLUX Kontext transformer.

Rules, and why:
- Only Linear weights are quantized (quanto leaves norms alone without activation quantization). TRANSFORMER_EXCLUDE
  keeps the layers that touch the latents and the text directly in full precision: excluding proj_out, x_embedder
  and context_embedder cut qint8 output error 5x for +1.8 % bytes (FACTS.md); norm_out.linear is the final
  modulation of proj_out's input and is tiny.
- quanto's ``freeze()`` and every ``load_state_dict`` re-create the weight Parameters with requires_grad=True, and the
  next backward then crashes inside quanto or trains the base. ``quantize_frozen`` switches it off after freezing and
  ``keep_base_frozen`` adds a load_state_dict post-hook that switches it off after any later state load.
- The LoRA is added on top by peft (it wraps quanto's QLinear) and trained in fp32; it is never fused: ``fuse_lora``
  on a quanto model silently drops the LoRA.
- low_vram: the transformer is built on the meta device and filled one block at a time from the checkpoint files;
  each block is quantized on the CPU and then moved to the device, so the device never holds the full-precision
  transformer (and the CPU holds one full-precision block at a time). The normal path quantizes on the device,
  which is faster but needs the full-precision model there first. Both give the same quantized weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from toolkit.adapters.lora import is_adapter_name

log = logging.getLogger(__name__)

QTYPES = ("qfloat8", "qint8")
TRANSFORMER_EXCLUDE = ("proj_out", "x_embedder", "context_embedder", "norm_out.linear")
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def quantize_frozen(module: torch.nn.Module, qtype: str, exclude: Sequence[str] = (),
                    include: Optional[Sequence[str]] = None) -> None:
    """Quantize the Linear weights of `module` (names matched by fnmatch, as quanto does) and freeze them."""
    from optimum import quanto

    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    quanto.quantize(module, weights=getattr(quanto, qtype), include=list(include) if include else None,
                    exclude=list(exclude) or None)
    quanto.freeze(module)
    module.requires_grad_(False)  # freeze() turns requires_grad back on (FACTS.md)
    release_checkpoint_memory(module)


@torch.no_grad()
def release_checkpoint_memory(module: torch.nn.Module) -> None:
    """Copy the full-precision tensors left after quantizing (biases, norms, excluded layers) into memory of their
    own. Loaded tensors point into the checkpoint file's memory map, and while any of them lives, every page of the
    file that quantizing read stays resident: on a CPU that is the whole full-precision model again."""
    for mod in module.modules():
        for param in mod.parameters(recurse=False):
            if type(param.data) is torch.Tensor:  # quantized weights are quanto tensors with fresh storage
                param.data = param.data.clone()
        for name, buffer in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, buffer.clone())


def unsafe_qint8_layers(module: torch.nn.Module) -> list[str]:
    """Linear layers whose in_features is not a multiple of 8: qint8 with bf16/fp16 activations crashes on them."""
    return [name for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % 8]


def safe_exclude(module: torch.nn.Module, qtype: str, dtype: torch.dtype,
                 always: Sequence[str] = TRANSFORMER_EXCLUDE) -> list[str]:
    """`always`, plus the layers qint8 cannot run in half precision."""
    exclude = list(always)
    if qtype == "qint8" and dtype != torch.float32:
        unsafe = [n for n in unsafe_qint8_layers(module) if n not in exclude]
        if unsafe:
            log.warning("qint8 with %s: keeping %d layers with in_features not a multiple of 8 unquantized (%s)",
                        dtype, len(unsafe), ", ".join(unsafe[:3]))
        exclude += unsafe
    return exclude


def keep_base_frozen(module: torch.nn.Module) -> None:
    """After any load_state_dict reaching `module` (also through a parent), freeze every non-LoRA parameter again."""

    def refreeze(mod: torch.nn.Module, _incompatible) -> None:
        for name, param in mod.named_parameters():
            if not is_adapter_name(name):
                param.requires_grad_(False)

    module.register_load_state_dict_post_hook(refreeze)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the base weights as stored (quantized data + scales, full-precision rest); LoRA not counted."""
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if not is_adapter_name(k))


# -- low-VRAM loading --------------------------------------------------------------------------------------------
def transformer_folder(name_or_path: str) -> Path:
    """The local `transformer/` folder of a diffusers model folder or Hub id (downloads only that folder)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return local / "transformer"
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["transformer/*"])) / "transformer"


def _weight_files(folder: Path) -> dict[str, Path]:
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


def _units(model: torch.nn.Module) -> Iterator[str]:
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


def load_transformer_blockwise(name_or_path: str, dtype: torch.dtype, device: torch.device,
                               qtype: Optional[str], folder: Optional[str] = None, model_class: Optional[type] = None,
                               always_exclude: Sequence[str] = TRANSFORMER_EXCLUDE) -> torch.nn.Module:
    """The FLUX transformer built block by block: read a block on the CPU, quantize it there (qtype set), move it to
    `device`. Peak device memory is the quantized model; peak CPU memory one full-precision block plus the rest.
    `model_class` (default FluxTransformer2DModel) and `always_exclude` let another FLUX generation load the same
    way (FLUX.2: Flux2Transformer2DModel, whose blocks are also top-level ModuleLists)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from optimum import quanto

    model_class = model_class or FluxTransformer2DModel
    folder = Path(folder) if folder else transformer_folder(name_or_path)  # folder: model.transformer_path
    config = model_class.load_config(str(folder))
    with init_empty_weights():
        model = model_class.from_config(config)
    if qtype not in (None, *QTYPES):
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    exclude = safe_exclude(model, qtype, dtype, always_exclude) if qtype else []
    files = _weight_files(folder)
    for unit in _units(model):
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


__all__ = ["QTYPES", "TRANSFORMER_EXCLUDE", "keep_base_frozen", "load_transformer_blockwise", "quantize_frozen",
           "release_checkpoint_memory", "safe_exclude", "unsafe_qint8_layers", "weight_bytes"]
