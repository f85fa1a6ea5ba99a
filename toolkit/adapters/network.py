"""The adapter a run trains (network.type lora or lokr): its peft config, its file layout, and starting it from an
existing file (network.pretrained_lora).

A pretrained file is checked before any model loads (exists, is safetensors, holds adapter weights of the run's
kind) and loaded right after the adapter is injected, on every rank, before data-parallel wrapping. Its update is
kept exactly: a file saved with another alpha gets its scale multiplied into B (LoRA) or w2 (LoKr). Rank and module
mismatches are errors that name both shapes or the modules. Resume loads the training state afterwards, so a
resumed run continues from its trained weights, not from the pretrained ones.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
from peft import LoKrConfig, LoraConfig
from safetensors import SafetensorError, safe_open

from toolkit.adapters import lokr
from toolkit.errors import ConfigError, UserError
from toolkit.adapters.lora import LORA_METADATA_KEY, PREFIX, load_lora_state_dict, lora_state_dict, make_lora_config
from toolkit.adapters.lora_convert import LoraConventions, _module_scales, detect_format, read_lora, to_diffusers

AdapterConfig = Union[LoraConfig, LoKrConfig]
LOKR_METADATA_KEY = "lokr_adapter_metadata"  # the peft LoKrConfig (diffusers' loader must not mistake it for LoRA)
_A, _B = ".lora_A.weight", ".lora_B.weight"
KEY = "network.pretrained_lora"


def make_adapter_config(network, default_targets) -> AdapterConfig:
    """peft config of `network` (a NetworkConfig); target_modules null uses the architecture's default."""
    targets = network.target_modules or default_targets
    if network.type == "lokr":
        return lokr.make_lokr_config(network.linear, network.linear_alpha, targets, network.lokr_factor,
                                     network.lokr_full_rank)
    return make_lora_config(network.linear, network.linear_alpha, targets, network.dropout)


def adapter_scale(config: AdapterConfig) -> float:
    """The factor peft multiplies the adapter's product by (alpha / r)."""
    alpha = config.alpha if isinstance(config, LoKrConfig) else config.lora_alpha
    return float(alpha) / config.r


# -- files --------------------------------------------------------------------------------------------------------
def lokr_converter(config: LoKrConfig, layout: str):
    """A save_lora `convert` hook writing LoKr tensors in ComfyUI's layout (toolkit.adapters.lokr)."""
    return functools.partial(_lokr_convert, rank=config.r, alpha=float(config.alpha), layout=layout)


def _lokr_convert(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], *, rank: int, alpha: float,
                  layout: str) -> tuple[dict, dict]:
    state = {k[len(PREFIX) + 1:]: v for k, v in tensors.items()}
    header = dict(header)
    header[LOKR_METADATA_KEY] = header.pop(LORA_METADATA_KEY)
    return lokr.to_file(state, rank, alpha, layout), header


def file_kind(keys) -> Optional[str]:
    """"lora" or "lokr" from a file's tensor names; None when it holds neither."""
    keys = list(keys)
    if lokr.is_lokr_state(keys):
        return "lokr"
    if detect_format(keys) is not None:
        return "lora"
    return None


def check_pretrained_file(path: Optional[str], network_type: str) -> None:
    """Before any model loads: the file exists, is safetensors, and holds adapter weights of the run's kind."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{KEY}: {path} does not exist or is not a file")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{KEY}: {path} is not a readable .safetensors file ({exc})") from exc
    kind = file_kind(keys)
    if kind is None:
        raise ConfigError(f"{KEY}: {path} holds no LoRA or LoKr weights (expected transformer.*.lora_A/B.weight, "
                          f"lora_unet_*.lora_down/up.weight or *.lokr_w1/lokr_w2 keys; found e.g. {keys[:3]})")
    if kind != network_type:
        raise ConfigError(f"{KEY}: {path} is a {kind} file but network.type is {network_type!r}; set "
                          f"network.type: {kind} (with the file's rank) or pick a {network_type} file")


def load_pretrained(transformer: torch.nn.Module, path: str, config: AdapterConfig,
                    conventions: Optional[LoraConventions]) -> int:
    """Put the file's adapter into the injected one (same update); returns how many tensors were loaded."""
    source = f"{KEY} {path}"
    state, header = read_lora(Path(path))
    expected = lora_state_dict(transformer)
    if isinstance(config, LoKrConfig):
        ours = {k[len(PREFIX) + 1:]: v for k, v in expected.items()}
        tensors = {f"{PREFIX}.{k}": v for k, v in lokr.from_file(state, ours, adapter_scale(config), source).items()}
    else:
        tensors = _lora_from_file(state, header, expected, adapter_scale(config), conventions, source)
    load_lora_state_dict(transformer, tensors)
    return len(tensors)


def _lora_from_file(state: Mapping[str, torch.Tensor], header: Mapping[str, str],
                    expected: Mapping[str, torch.Tensor], scale: float, conventions: Optional[LoraConventions],
                    source: str) -> dict[str, torch.Tensor]:
    fmt = detect_format(state)
    if fmt == "comfy":
        if conventions is None:
            raise UserError(f"{source}: a kohya/ComfyUI LoRA, but this architecture has no known kohya names")
        state, header = to_diffusers(state, header, conventions)
    elif fmt is None:
        raise UserError(f"{source}: not a LoRA layout this trainer reads (transformer.*.lora_A/B.weight or "
                        "lora_unet_*.lora_down/up.weight)")
    theirs = _module_scales(state, header)
    ours = {k[len(PREFIX) + 1:-len(_A)] for k in expected if k.endswith(_A)}
    extra, missing = sorted(set(theirs) - ours), sorted(ours - set(theirs))
    if extra or missing:
        raise UserError(lokr._module_mismatch(source, extra, missing))
    out = {}
    for module, file_scale in sorted(theirs.items()):
        a_key, b_key = f"{PREFIX}.{module}{_A}", f"{PREFIX}.{module}{_B}"
        a, b = state[a_key], state[b_key]
        if a.shape != expected[a_key].shape or b.shape != expected[b_key].shape:
            raise UserError(f"{source}: LoRA shapes of {module} do not match this network: the file has lora_A "
                            f"{tuple(a.shape)}, lora_B {tuple(b.shape)} (rank {a.shape[0]}); network.linear gives "
                            f"lora_A {tuple(expected[a_key].shape)}, lora_B {tuple(expected[b_key].shape)} "
                            f"(rank {expected[a_key].shape[0]})")
        out[a_key] = a
        out[b_key] = b if abs(file_scale - scale) <= 1e-9 * abs(scale) else (b.float() * (file_scale / scale))
    return out


__all__ = ["AdapterConfig", "LOKR_METADATA_KEY", "adapter_scale", "adapters_disabled", "check_pretrained_file", "file_kind",
           "load_pretrained", "lokr_converter", "make_adapter_config"]


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` as the base model: every peft adapter layer in it passes its input through the frozen base layer
    only. peft's layer switch also turns off requires_grad of the adapter weights; it is put back as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ConfigError("train.diff_output_preservation needs a LoRA or LoKr to switch off; this run has none")
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)
