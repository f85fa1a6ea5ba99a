"""Full fine-tuning in the train loop: which parameters train, the check that they (and only they) do, and what a
checkpoint can hold when they are sharded.

The trained module is the architecture's transformer; every other component (VAE, text encoders) stays frozen.
Weights train in the dtype they were loaded in (train.dtype: fp32 on CPU, bf16 on a GPU unless set to fp32).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from toolkit.adapters.network import make_adapter_config
from toolkit.adapters.lora import add_lora, check_only_lora_trains

log = logging.getLogger(__name__)


def add_trainable(transformer: torch.nn.Module, network: Any, default_targets: Any) -> tuple[list, Any]:
    """The parameters the optimizer trains, and the adapter config (None for a full fine-tune, network None)."""
    if network is None:
        return make_trainable(transformer), None
    lora_config = make_adapter_config(network, default_targets)  # LoRA or LoKr
    return add_lora(transformer, lora_config), lora_config


def check_trainable(transformer: torch.nn.Module, params: list, full: bool) -> None:
    """Exactly the intended parameters train (call again after loading any state into the model)."""
    (check_all_train if full else check_only_lora_trains)(transformer, params)


def make_trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unfreeze every parameter of `module` (the transformer); returns them for the optimizer."""
    module.requires_grad_(True)
    return list(module.parameters())


def check_all_train(module: torch.nn.Module, params: list) -> None:
    """A full fine-tune must train the whole transformer, and the optimizer must hold exactly those parameters."""
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    ids = {id(p) for p in module.parameters()}
    if frozen or len(params) != len(ids) or any(id(p) not in ids for p in params):
        raise RuntimeError(f"a full fine-tune trains every transformer weight, but {len(frozen)} are frozen (e.g. "
                           f"{frozen[:3]}); {len(params)} parameters given to the optimizer, {len(ids)} in the model")


def states_writable(rt: Any) -> bool:
    """Training states (toolkit.state.train_state) hold this process's parameters and optimizer state. Under FSDP with
    more than one process those are shards: then only the consolidated weights are written (warned here)."""
    if not (rt.is_sharded and rt.world_size > 1):
        return True
    if rt.is_main:
        log.warning("FSDP with %d processes: training states (optimizer, RNG, data position) are not written, only "
                    "the weights; to continue a stopped full fine-tune, start a new run from its newest "
                    "transformer_<step> folder with model.transformer_path (the optimizer starts fresh)",
                    rt.world_size)
    return False


__all__ = ["add_trainable", "check_all_train", "check_trainable", "make_trainable", "states_writable"]
