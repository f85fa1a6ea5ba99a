"""`train.compile: true`: torch.compile of the transformer's repeated blocks (regional compilation).

Each block is compiled in place (``nn.Module.compile``, through diffusers' ``compile_repeated_blocks``), so module
names, state dicts and saved LoRA keys are unchanged (no ``_orig_mod.`` prefix) and DDP still wraps the same module.
Blocks of one class share their compiled code. Shapes: the first bucket compiles static; a new token count
recompiles once with dynamic shapes (torch's automatic dynamic); torch._dynamo's recompile limit (8 per code object)
bounds the cache, after which a block runs eagerly. Validation and sampling (no grad, other shapes) compile their own
graphs the first time they run.
"""

from __future__ import annotations

import logging
import shutil
from typing import Optional

import torch

from toolkit.errors import ConfigError

log = logging.getLogger(__name__)

_COMPILERS = ("c++", "g++", "gcc", "clang++", "clang")
# Keyword arguments of torch.compile for every block (tests swap in a fast backend).
COMPILE_OPTIONS: dict = {}


def compile_problem(device: torch.device) -> Optional[str]:
    """Why train.compile cannot work here, or None. Inductor builds C++ kernels on CPU (Triton on CUDA)."""
    if device.type == "cpu" and not any(shutil.which(c) for c in _COMPILERS):
        return "train.compile: torch.compile (inductor) needs a C++ compiler on CPU and none is on PATH; " \
               "install gcc or set train.compile: false"
    return None


def check_compile(device: torch.device) -> None:
    problem = compile_problem(device)
    if problem:
        raise ConfigError(problem)


def compile_blocks(module: torch.nn.Module) -> None:
    """Compile `module`'s repeated blocks in place (the module must name them: diffusers' `_repeated_blocks`)."""
    if not getattr(module, "_repeated_blocks", None) or not callable(getattr(module, "compile_repeated_blocks", None)):
        raise ConfigError(f"train.compile: {type(module).__name__} does not declare its repeated blocks "
                          "(_repeated_blocks); set train.compile: false")
    module.compile_repeated_blocks(**COMPILE_OPTIONS)
    log.info("train.compile: %s's repeated blocks compile on first use (each new bucket shape recompiles once)",
             type(module).__name__)
