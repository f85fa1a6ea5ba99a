"""LoRA on a diffusers transformer through peft, and the .safetensors layout diffusers and ComfyUI load.

Files hold `transformer.<module>.lora_A.weight` / `lora_B.weight` plus two kinds of header metadata:
`lora_adapter_metadata` (the peft LoraConfig diffusers reads) and `kontext_trainer.*` training facts (step, base
model, config name, the trained rank and alpha).

The scale alpha / rank is folded into lora_B, and the metadata then says lora_alpha == r: every loader computes
B @ A * 1, the trained update. ComfyUI, kohya and ai-toolkit ignore the metadata JSON and read a LoRA without
`.alpha` tensors at scale 1, so a file keeping alpha != rank only in the metadata would load at rank/alpha times
its strength there. `.alpha` tensors are no way out: diffusers' load_lora_adapter refuses a file that has both
them and the metadata ("Both `network_alphas` and `metadata` cannot be specified"). Ecosystem keys (`modelspec.*` of the
SAI model spec 1.0.1, and kohya's `ss_*`) let ComfyUI, Civitai and kohya tools show what the file is. Secrets never
go in: the caller passes only what it wants recorded, and every value goes through redact_text.
"""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from toolkit.state.atomic import atomic_write_bytes
from toolkit.dtypes import torch_dtype
from toolkit.redact import redact_text

ADAPTER_NAME = "default"
PREFIX = "transformer"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
TRAINING_METADATA_PREFIX = "kontext_trainer."

ADAPTER_NAME_TAGS = ("lora_", "lokr_")  # parameter names of the adapters we train (peft LoRA, peft LoKr)


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict name belongs to a trained adapter rather than the frozen base."""
    return any(tag in name for tag in ADAPTER_NAME_TAGS)


def make_lora_config(rank: int, alpha: float, target_modules: Union[str, Sequence[str]],
                     dropout: float = 0.0) -> LoraConfig:
    """peft config for the transformer; gaussian init of A and zero B, so training starts from the base model."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets)


def add_lora(transformer: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, inject the LoRA and return its parameters, made fp32 whatever the base dtype."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"LoRA target modules {config.target_modules!r} matched no layer of the transformer")
    for p in params:
        # A bf16 base makes bf16 LoRA weights; optimizer updates of 1e-4 vanish in bf16, so train in fp32.
        p.data = p.data.float()
    return params


def lora_state_dict(transformer: torch.nn.Module, state_dict: Optional[Mapping[str, torch.Tensor]] = None
                    ) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed like diffusers files (`transformer.` prefix, no adapter name), detached on CPU; taken from
    `state_dict` (the transformer's, e.g. consolidated from FSDP shards) when given."""
    state = get_peft_model_state_dict(transformer, state_dict=None if state_dict is None else dict(state_dict),
                                      adapter_name=ADAPTER_NAME)
    return {f"{PREFIX}.{k}": v.detach().to("cpu") for k, v in state.items()}


def load_lora_state_dict(transformer: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put tensors saved by save_lora back into the injected adapter; every key must land."""
    stripped = {k[len(PREFIX) + 1:]: v for k, v in state.items() if k.startswith(PREFIX + ".")}
    result = set_peft_model_state_dict(transformer, stripped, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA keys do not fit this transformer: {unexpected[:5]}")


def adapter_metadata(config: LoraConfig) -> dict:
    """The LoraConfig as diffusers expects it under `transformer.` keys (sets become sorted lists)."""
    raw = config.to_dict()
    clean = {}
    for key, value in raw.items():
        if isinstance(value, set):
            value = sorted(value)
        clean[f"{PREFIX}.{key}"] = value
    return clean


def fold_scale(state: Mapping[str, torch.Tensor], config: LoraConfig
               ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The same update with the scale alpha / r multiplied into every lora_B and a config whose lora_alpha is r."""
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise ValueError("fold_scale: per-module ranks/alphas and rsLoRA are not produced by this trainer")
    scale = float(config.lora_alpha) / config.r
    folded = copy.deepcopy(config)
    folded.lora_alpha = config.r
    if scale == 1.0:
        return dict(state), folded
    out = {k: (v.float() * scale if k.endswith(".lora_B.weight") else v) for k, v in state.items()}
    return out, folded


def ecosystem_metadata(*, title: str, architecture: str, implementation: str, base_model_version: str, rank: int,
                       alpha: float, steps: int, resolution: int, trigger_phrase: Optional[str] = None
                       ) -> dict[str, str]:
    """modelspec.* (SAI model spec) and kohya ss_* keys; `architecture` is the base's, e.g. "flux-1-dev"."""
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": implementation, "modelspec.title": title,
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
            "modelspec.resolution": f"{resolution}x{resolution}",
            "ss_output_name": title, "ss_base_model_version": base_model_version, "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}", "ss_steps": str(steps), "ss_resolution": f"({resolution}, {resolution})"}
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    return meta


Converter = Callable[[dict, dict], tuple[dict, dict]]


def save_lora(path: Path, state: Mapping[str, torch.Tensor], config: LoraConfig, dtype: str,
              training_metadata: Optional[Mapping[str, object]] = None,
              extra_metadata: Optional[Mapping[str, str]] = None, convert: Optional[Converter] = None) -> Path:
    """Write the LoRA atomically: a crash mid-write never leaves a truncated file under `path`.

    A LoraConfig's scale is folded into lora_B first (see the module docstring). `extra_metadata` keys are written
    as given (ecosystem keys); `convert(tensors, header)` may change the layout (see toolkit.adapters.lora_convert)
    before writing."""
    if isinstance(config, LoraConfig):
        state, config = fold_scale(state, config)
    tensors = {k: v.detach().to("cpu", torch_dtype(dtype)).contiguous() for k, v in state.items()}
    header = {"format": "pt",
              LORA_METADATA_KEY: json.dumps(adapter_metadata(config), indent=2, sort_keys=True, default=str)}
    for key, value in (extra_metadata or {}).items():
        header[key] = redact_text(str(value))
    for key, value in (training_metadata or {}).items():
        header[TRAINING_METADATA_PREFIX + key] = redact_text(str(value))
    if convert is not None:
        tensors, header = convert(tensors, header)
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=header))
    return Path(path)


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a saved LoRA."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_only_lora_trains(module: torch.nn.Module, params: list) -> None:
    """The frozen base must stay frozen: quanto's freeze() and state loads switch requires_grad back on (FACTS.md).
    Call again after loading any state into the model."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    base = [name for name in trainable if not is_adapter_name(name)]
    if base or len(trainable) != len(params):
        raise RuntimeError(f"only LoRA weights may train, but {len(base)} base parameters require grad (e.g. "
                           f"{base[:3]}); {len(trainable)} trainable, {len(params)} given to the optimizer")
