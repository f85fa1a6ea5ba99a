"""Transformers whose checkpoint already holds quantized weights: FP8 (float8_e4m3fn / float8_e5m2, optionally with
a per-tensor scale) and bitsandbytes 4-bit (NF4 / FP4), the downloads that fit 12-24 GB cards.

What is detected, and how (``detect``, reading only config.json and the safetensors headers, never a weight):
- ``quantization_config`` in the transformer's config.json with ``quant_method: bitsandbytes``: a bitsandbytes
  export (diffusers ``BitsAndBytesConfig`` + ``save_pretrained``). diffusers loads those itself, straight into
  ``Linear4bit`` modules; it needs a GPU (its quantizer refuses to run without one), so ``require_device`` turns a
  CPU run into a UserError before anything loads.
- any float8 tensor in the safetensors files: an FP8 export. Its Linear weights are kept in float8, as stored; a
  per-tensor scale is read from ``<layer>.scale_weight`` (ComfyUI's "scaled fp8" name) or ``<layer>.weight_scale``
  (compressed-tensors / llm-compressor), and the true weight is ``float8 * scale``. Activation scales
  (``scale_input`` / ``input_scale``) and ComfyUI's ``scaled_fp8`` marker are ignored: compute is in full precision.
  A ``quantization_config`` with ``quant_method`` fp8 / float8 means the same; other methods are refused by name.

FP8 compute: ``Float8Linear`` upcasts its weight for the one matmul that uses it and drops it again, on any device
(CPU included: there are no fp8 matmul kernels there). diffusers' layerwise casting hooks do the same for the
forward, but they have no scale and autograd would keep every upcast weight alive until backward; our function saves
the float8 weight instead and upcasts again in backward, so parameter memory stays fp8-sized during training too.
The model is built on the meta device and filled one block at a time, so the full-precision transformer never
exists. peft wraps Float8Linear like any Linear (its ``compute_dtype`` tells peft the dtype for the LoRA weights);
the saved LoRA holds only ``lora_A`` / ``lora_B`` tensors and loads in the full-precision pipeline.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from toolkit.quant.blockwise import block_units, weight_files
from toolkit.errors import UserError

log = logging.getLogger(__name__)

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_SUFFIXES = ("scale_weight", "weight_scale")
IGNORED_SUFFIXES = ("scale_input", "input_scale")
MARKER_KEYS = ("scaled_fp8",)
FP8_METHODS = ("fp8", "float8")  # a quantization_config naming FP8: the weights are read from the files as below


@dataclass(frozen=True)
class Prequantized:
    """What a transformer folder holds: kind "fp8" or "bnb4" (or "bnb8"), with a human description."""

    kind: str
    detail: str

    @property
    def needs_gpu(self) -> bool:
        return self.kind.startswith("bnb")


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def detect(folder: Path) -> Optional[Prequantized]:
    """The pre-quantized format of a diffusers transformer folder, or None for a full-precision one."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    qconfig = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config")
    if qconfig:
        method = qconfig.get("quant_method")
        if method == "bitsandbytes" and qconfig.get("load_in_4bit"):
            return Prequantized("bnb4", f"bitsandbytes 4-bit {qconfig.get('bnb_4bit_quant_type', 'fp4')}")
        if method == "bitsandbytes" and qconfig.get("load_in_8bit"):
            return Prequantized("bnb8", "bitsandbytes 8-bit")
        if method not in FP8_METHODS:
            raise UserError(f"{config_path}: quantization_config.quant_method {method!r} is not supported; "
                            "pre-quantized transformers load when they hold float8 weights or a bitsandbytes 4-bit "
                            "export")
    try:
        files = sorted(set(weight_files(folder).values()))
    except FileNotFoundError:
        return None
    dtypes, scaled = set(), False
    for path in files:
        for key, info in _header(path).items():
            if key != "__metadata__" and info["dtype"] in FP8_DTYPES:
                dtypes.add(info["dtype"])
            scaled |= key.rpartition(".")[2] in SCALE_SUFFIXES
    if not dtypes:
        return None
    names = ", ".join(str(FP8_DTYPES[d]).removeprefix("torch.") for d in sorted(dtypes))
    return Prequantized("fp8", names + (" with per-tensor scales" if scaled else ""))


def require_device(found: Prequantized, folder: Path, device: torch.device) -> None:
    """A UserError before loading when the format cannot run on `device`."""
    if found.needs_gpu and device.type != "cuda":
        raise UserError(f"{folder}: the transformer is a {found.detail} export, which needs a CUDA GPU (bitsandbytes' "
                        f"kernels); this run's device is {device}. Use an FP8 or full-precision transformer on "
                        "this machine, or train on a GPU")


class _UpcastLinear(torch.autograd.Function):
    """y = x @ (w8 * s)^T + b with the float8 weight saved for backward instead of its upcast copy."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return torch.nn.functional.linear(x, _upcast(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        if ctx.needs_input_grad[1]:  # a full fine-tune (network: null) made the stored float8 weights trainable
            raise UserError("a pre-quantized (float8) transformer cannot be fully fine-tuned: its weights are frozen "
                            "as stored; train a LoRA on it, or fine-tune the full-precision model")
        grad_x = grad @ _upcast(weight, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _upcast(weight: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    full = weight.to(dtype)
    return full.mul_(scale.to(dtype)) if scale is not None else full


class Float8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in float8 (with an optional per-tensor scale) and upcast per call."""

    def __init__(self, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 compute_dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # not Linear.__init__: it would allocate a full-precision weight
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", None if scale is None else scale.float().reshape(()))
        self.compute_dtype = compute_dtype  # peft makes the LoRA weights in this dtype (not in float8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _UpcastLinear.apply(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={self.weight.dtype}, scaled={self.weight_scale is not None}"


def _read_raw(files: dict[str, Path], prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    keys = [k for k in files if k.startswith(prefix + ".")]
    state = {}
    for path in sorted({files[k] for k in keys}):
        with safe_open(str(path), framework="pt") as f:
            state.update({k[len(prefix) + 1:]: f.get_tensor(k) for k in keys if files[k] == path})
    return state


def _fill_unit(model: torch.nn.Module, unit: str, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Float8Linear for every Linear of `unit` stored in float8; every other tensor cast to `dtype` (scaled first)."""
    scales = {k.rpartition(".")[0]: state.pop(k) for k in list(state) if k.rpartition(".")[2] in SCALE_SUFFIXES}
    for key in [k for k in state if k.rpartition(".")[2] in IGNORED_SUFFIXES]:
        del state[key]
    for name, module in list(model.get_submodule(unit).named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if isinstance(module, torch.nn.Linear) and weight is not None and weight.dtype in FP8_DTYPES.values():
            prefix = f"{name}." if name else ""
            state.pop(prefix + "weight")
            new = Float8Linear(weight, scales.pop(name, None), state.pop(prefix + "bias", None), dtype)
            model.set_submodule(f"{unit}.{name}" if name else unit, new)
    for key, tensor in state.items():
        if tensor.is_floating_point():
            scale = scales.pop(key.rpartition(".")[0], None) if tensor.dtype in FP8_DTYPES.values() else None
            state[key] = _upcast(tensor, scale, dtype)
    model.get_submodule(unit).load_state_dict(state, strict=False, assign=True)


def load_fp8_transformer(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The FLUX transformer of an FP8 folder, float8 Linear weights kept as stored, built unit by unit."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(str(folder))
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    files = {k: v for k, v in weight_files(folder).items() if k not in MARKER_KEYS}
    for unit in block_units(model):
        _fill_unit(model, unit, _read_raw(files, unit), dtype)
        model.get_submodule(unit).requires_grad_(False).to(device)
    leftover = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if leftover:
        raise UserError(f"{folder}: the checkpoint has no weights for {leftover[:5]}")
    model.requires_grad_(False)
    model.eval()
    count = sum(isinstance(m, Float8Linear) for m in model.modules())
    log.info("FP8 transformer from %s: %d Linear layers kept in float8, computing in %s", folder, count, dtype)
    return model


def load_bnb_transformer(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes export, loaded by diffusers from its quantization_config (needs a GPU)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(folder), dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model


__all__ = ["FP8_DTYPES", "Float8Linear", "Prequantized", "detect", "load_bnb_transformer", "load_fp8_transformer",
           "require_device"]
