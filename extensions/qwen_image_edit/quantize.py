"""8-bit frozen Qwen-Image transformer / Qwen2.5-VL weights (optimum-quanto), as the FLUX extension does it.

The FACTS.md traps apply unchanged: quanto's freeze() and every load_state_dict turn requires_grad back on, so both
are followed by switching it off; a LoRA is never fused into quantized weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from toolkit.adapters.lora import is_adapter_name
from toolkit.errors import ArchitectureError

QTYPES = ("qfloat8", "qint8")
# Small layers where quantization error hurts most (input/output projections, modulation of the output norm).
TRANSFORMER_EXCLUDE = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.*")


def quantize_frozen(module: torch.nn.Module, qtype: str, exclude: Sequence[str] = ()) -> None:
    """Quantize the Linear weights of `module` except `exclude` (fnmatch names) and keep them frozen for good."""
    from optimum import quanto

    if qtype not in QTYPES:
        raise ArchitectureError(f"model.qtype must be one of {QTYPES}, got {qtype!r}")
    quanto.quantize(module, weights=getattr(quanto, qtype), exclude=list(exclude) or None)
    quanto.freeze(module)
    module.requires_grad_(False)
    keep_frozen(module)


def keep_frozen(module: torch.nn.Module) -> None:
    """After any state load into `module` (accelerate's load_state on resume), switch requires_grad off again."""
    def refreeze(mod: torch.nn.Module, _incompatible) -> None:
        for name, param in mod.named_parameters():
            if not is_adapter_name(name):
                param.requires_grad_(False)

    module.register_load_state_dict_post_hook(refreeze)
