"""The training state: everything an exact resume needs, saved atomically, checked before it is trusted.

Layout, one folder per saved step, under the run folder:

    state/<step:09d>/
      lora.safetensors   the trainable parameters in fp32 under their own parameter names (the user-facing LoRA file
                         may be float16, so resume never reads it)
      ema.safetensors    the EMA of the trainable parameters and its counters, with train.ema_config (toolkit.train.ema)
      optimizer.pt       optimizer.state_dict()
      scheduler.pt       lr_scheduler.state_dict()
      rng_rank<r>.pt     rank r's RNGs: python, numpy, torch CPU, CUDA (when present), the trainer's noise generator
      trainer.json       step, data position, world size, config hash and the hashed config (secrets redacted)
      COMPLETE           written last: size and sha256 of every other file

A state is written into `state/.<step>.<random>.tmp/` and renamed into place, so a kill at any moment leaves either
no folder or a complete one under the final name; temporary folders never match the name pattern. Loading trusts
nothing: the COMPLETE manifest must match every file, weights are safetensors and everything else is read with
`torch.load(weights_only=True)` (RNG states are stored as tensors and plain lists so that works).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from toolkit.state import atomic
from toolkit.state.config_change import config_diff, only_more_steps, with_new_defaults
from toolkit.errors import UserError
from toolkit.redact import redact_mapping

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_DIR = "state"
COMPLETE = "COMPLETE"
TRAINER_FILE = "trainer.json"
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
_STATE_NAME = re.compile(r"^\d{9}$")

# Config keys that do not change the trained weights: changing them between a run and its resume is fine.
UNHASHED_KEYS = (
    "type", "training_folder", "device", "log_every", "performance_log_every", "sample",
    "save.save_every", "save.max_step_saves_to_keep", "save.dtype", "save.format", "save.push_to_hub",
    "save.hf_repo_id", "save.hf_private", "train.ema_config.ema_on_cpu",
    "train.resume_from", "train.disable_sampling", "train.skip_first_sample", "train.distributed_training",
    "train.gradient_checkpointing", "train.cache_text_embeddings", "train.num_workers", "train.compile",
    "train.max_nonfinite_steps", "train.ddp_timeout_seconds", "datasets[].max_image_pixels",
    "model.low_vram", "trackers",
    "datasets[].cache_latents", "datasets[].cache_latents_to_disk", "datasets[].cache_dir",
    "datasets[].val_folder_path", "datasets[].val_control_path",
)


class StateError(UserError):
    """A training state cannot be used as asked; the message says what to do."""


class ConfigChangedError(StateError):
    """The run folder's newest state was saved with another training config (`step`: that state's step)."""
    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def state_root(run_folder: Path) -> Path:
    return Path(run_folder) / STATE_DIR


# -- config hash ------------------------------------------------------------------------------------------------
def _drop(tree: Any, path: Sequence[str]) -> None:
    head, rest = path[0], path[1:]
    if head.endswith("[]"):
        for item in tree.get(head[:-2]) or []:
            if isinstance(item, dict):
                _drop(item, rest)
    elif not rest:
        tree.pop(head, None)
    elif isinstance(tree.get(head), dict):
        _drop(tree[head], rest)


def training_config(process_cfg: Any) -> dict:
    """The part of a process config that decides the trained weights (UNHASHED_KEYS removed, secrets redacted)."""
    tree = dataclasses.asdict(process_cfg)
    for key in UNHASHED_KEYS:
        _drop(tree, key.split("."))
    return redact_mapping(json.loads(json.dumps(tree, default=str)))


def config_hash(training_cfg: Mapping) -> str:
    return hashlib.sha256(json.dumps(training_cfg, sort_keys=True).encode()).hexdigest()[:16]


# -- random number generators -----------------------------------------------------------------------------------
def capture_rng(generator: Optional[torch.Generator]) -> dict:
    """Every RNG of this process, as tensors and plain lists (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: _all would touch every GPU
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: Mapping, generator: Optional[torch.Generator]) -> None:
    """Put back what capture_rng saved. A noise generator saved on another device type (CPU state, CUDA run) does
    not fit: it is left as seeded, with a warning (the device is not part of the config hash)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        try:
            generator.set_state(state["generator"])
        except RuntimeError as exc:
            log.warning("the saved noise generator does not fit this device (%s): noise differs from an "
                        "uninterrupted run", exc)


def rescale_lr(scheduler: Any, optimizer: Any, lr: float) -> bool:
    """After loading a state saved with another base lr (a forced resume with train.lr changed): keep the schedule's
    progress, at the configured lr. Returns whether anything changed."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
    old = list(getattr(inner, "base_lrs", []))
    if all(base == lr for base in old):
        return False
    for group, base in zip(optimizer.param_groups, old):
        group["lr"] = group["lr"] * lr / base if base else lr
        group["initial_lr"] = lr
    inner.base_lrs = [lr] * len(old)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return True


# -- data position ----------------------------------------------------------------------------------------------
def data_position(consumed_batches: int, batches_per_epoch: int) -> dict[str, int]:
    """Sampler state after `consumed_batches` global batches: {"epoch", "batches_done"} (BucketBatchSampler)."""
    epoch, offset = divmod(int(consumed_batches), int(batches_per_epoch))
    return {"epoch": epoch, "batches_done": offset}


# -- saving -----------------------------------------------------------------------------------------------------
def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_state(run_folder: Path, step: int, *, trainable: Mapping[str, torch.Tensor], optimizer: Mapping,
               scheduler: Mapping, rng: Sequence[Mapping], info: Mapping[str, Any],
               extra_files: Optional[Mapping[str, bytes]] = None) -> Path:
    """Write the state of `step` atomically (main only); `rng[r]` is rank r's capture_rng(); extra_files: name->bytes."""
    root = state_root(run_folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step:09d}"
    tmp = root / f".{step:09d}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would make states unreadable to the user's group
    try:
        files = {LORA_FILE: safetensors_save({k: v.detach().to("cpu", torch.float32).contiguous()
                                              for k, v in trainable.items()}),
                 OPTIMIZER_FILE: _torch_bytes(dict(optimizer)), SCHEDULER_FILE: _torch_bytes(dict(scheduler))}
        files.update({rng_file(r): _torch_bytes(dict(state)) for r, state in enumerate(rng)}, **(extra_files or {}))
        files[TRAINER_FILE] = json.dumps({"format_version": FORMAT_VERSION, "step": step, **info}, indent=2,
                                         sort_keys=True).encode()
        for name, data in files.items():
            atomic.atomic_write_bytes(tmp / name, data)
        manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                    for name, data in files.items()}
        atomic.atomic_write_bytes(tmp / COMPLETE, json.dumps(manifest, indent=2, sort_keys=True).encode())
        atomic.fsync_paths([tmp])
        atomic.swap_in_folder(tmp, final)  # a stale or damaged state of the same step is moved aside, never mixed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_states(run_folder: Path) -> list[tuple[int, Path]]:
    """State folders under their final names (complete or damaged), oldest first; temporary ones never match."""
    root = state_root(run_folder)
    if not root.is_dir():
        return []
    return sorted((int(p.name), p) for p in root.iterdir() if _STATE_NAME.match(p.name) and p.is_dir())


def remove_temporary(run_folder: Path) -> None:
    """Delete what interrupted saves left behind (`.<step>.*.tmp` / `.old` folders)."""
    root = state_root(run_folder)
    for leftover in root.glob(".*.tmp") if root.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".*.old") if root.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


def prune_states(run_folder: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest max(keep, 1) states; `protect` (the one just written) always stays. Each doomed
    state is first renamed to a temporary name (atomic), so a kill mid-prune never leaves a half-deleted state under
    a final name; remove_temporary deletes what such a kill left."""
    states = [p for _, p in list_states(run_folder)]
    doomed = [p for p in states[:-max(1, keep)] if p.resolve() != Path(protect).resolve()]
    for p in doomed:
        trash = p.parent / f".{p.name}.{secrets.token_hex(4)}.old"
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.debug("removed old training state %s", p)
    return doomed


# -- checking and finding ---------------------------------------------------------------------------------------
def check_state(path: Path) -> Optional[str]:
    """None when `path` is a complete, intact state; else why it is not."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        manifest = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {COMPLETE} marker (the save was interrupted)"
    except (OSError, ValueError) as exc:
        return f"unreadable {COMPLETE} marker ({exc})"
    required = {LORA_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_FILE, rng_file(0)}
    if not isinstance(manifest, dict) or not required <= set(manifest):
        return f"{COMPLETE} does not list {sorted(required - set(manifest or {}))}"
    for name, expected in manifest.items():
        file = path / Path(name).name
        try:
            data = file.read_bytes()
        except OSError as exc:
            return f"{name}: cannot read ({exc.strerror or exc})"
        if len(data) != expected.get("bytes") or hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            return f"{name}: size or checksum differs from {COMPLETE} (truncated or corrupt)"
    return None


def find_latest_state(run_folder: Path) -> Optional[Path]:
    """The newest complete, intact state; damaged ones are reported by name and skipped."""
    for step, path in reversed(list_states(run_folder)):
        problem = check_state(path)
        if problem is None:
            return path
        log.warning("training state %s is unusable (%s); trying the next older one", path, problem)
    return None


def read_info(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_FILE).read_text(encoding="utf-8"))


def is_finished(path: Path) -> bool:
    """The state ends a finished run (its step is its train.steps): the run's final LoRA is of this step."""
    info = read_info(path)
    return info.get("step") == ((info.get("config") or {}).get("train") or {}).get("steps")


# -- deciding where to resume from ------------------------------------------------------------------------------
def plan_resume(run_folder: Path, resume_from: Optional[str], training_cfg: Mapping,
                existing_outputs: Sequence[Path] = (), default_of: Any = None) -> Optional[Path]:
    """The state to resume from, or None to start at step 0. Reads files only (no model), so it runs before loading.

    `resume_from` None: the newest complete state of the run folder, whose config hash must match; "latest": the
    same, accepting a changed config with a warning; a path: that state folder, unless the run folder has states of
    its own (re-running a run that started from a path must continue, not restart; --fresh gives a new folder).
    `existing_outputs` are LoRA files already in the run folder: starting at step 0 over them without a state is
    refused."""
    if resume_from not in (None, "latest"):
        path = Path(resume_from).expanduser()
        own = find_latest_state(run_folder)
        if own is not None:  # e.g. a run started from elsewhere that has saved since: continue it, never restart it
            log.warning("train.resume_from %s is not used: this run has training states of its own, continuing from "
                        "%s (to start from %s instead, run with --fresh)", path, own, path)
            _check_config(own, training_cfg, True, default_of)
            return own
        problem = check_state(path)
        if problem is not None:
            raise StateError(f"train.resume_from: {path} is not a usable training state ({problem}); give a state "
                             f"folder such as <run folder>/{STATE_DIR}/000001000, or 'latest'")
        _check_config(path, training_cfg, True, default_of)
        return path
    latest = find_latest_state(run_folder)
    if latest is None:
        if resume_from == "latest":
            log.warning("train.resume_from is 'latest' but %s holds no complete training state: starting at step 0",
                        run_folder)
        elif existing_outputs:
            raise StateError(f"{run_folder} already holds LoRA files ({Path(existing_outputs[0]).name}, ...) but no "
                             "usable training state to resume from; run with --fresh to train into a new folder "
                             "(the old one is kept), or move the old files away")
        return None
    _check_config(latest, training_cfg, resume_from == "latest", default_of)
    return latest


def _check_config(path: Path, training_cfg: Mapping, forced: bool, default_of: Any = None) -> None:
    """default_of (config_change.field_defaults): options a saved config lacks are unchanged at their defaults."""
    info = read_info(path)
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise StateError(f"training state {path} was written by a newer version of this trainer (format "
                         f"{info.get('format_version')}); update the trainer or start over with --fresh")
    if info.get("config_hash") == config_hash(training_cfg):
        return
    saved = with_new_defaults(info.get("config", {}), dict(training_cfg), default_of or (lambda _: dataclasses.MISSING))
    changes = config_diff(saved, dict(training_cfg))
    if default_of and not changes:
        log.info("%s: the options added since it was saved are at their defaults; resuming", path)
        return
    changes = changes or ["(the saved config differs)"]
    if only_more_steps(saved, dict(training_cfg)):  # extending a run needs no permission
        log.info("continuing %s for longer (%s)", path, changes[0])
        return
    listed = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
    if forced:
        log.warning("resuming from %s although the training config changed since it was saved:\n  %s", path, listed)
        return
    raise ConfigChangedError(f"the config changed since the training state {path} was saved:\n  {listed}\nTo start "
                             "over with the new config, run with --fresh (a new folder; this run is kept). To "
                             "continue this run with the changed config, set train.resume_from: latest (or a state "
                             "folder). Or undo the change.", int(info.get("step", 0)))


# -- loading ----------------------------------------------------------------------------------------------------
@dataclass
class LoadedState:
    path: Path
    info: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: Optional[dict]  # this rank's RNGs; None when the state was saved by fewer ranks


def load_state(path: Path, rank: int) -> LoadedState:
    """Read a checked state (check_state first); only safetensors and weights_only torch.load."""
    path = Path(path)

    def torch_file(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=True)

    try:
        rng_path = path / rng_file(rank)
        return LoadedState(path=path, info=read_info(path),
                           trainable=safetensors_load((path / LORA_FILE).read_bytes()),
                           optimizer=torch_file(OPTIMIZER_FILE), scheduler=torch_file(SCHEDULER_FILE),
                           rng=torch_file(rng_path.name) if rng_path.is_file() else None)
    except Exception as exc:  # any failure to decode means the files cannot be trusted
        raise StateError(f"training state {path} cannot be loaded ({type(exc).__name__}: {exc}); remove it to "
                         "resume from an older state, or start over with --fresh") from exc


def copy_trainable(named: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy saved values into the live parameters in place (the optimizer and DDP keep their references)."""
    if set(named) != set(tensors):
        missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
        raise StateError(f"training state {path} does not fit this model's LoRA (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); was network or model changed? Start over with --fresh")
    with torch.no_grad():
        for name, param in named.items():
            if tuple(param.shape) != tuple(tensors[name].shape):
                raise StateError(f"training state {path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                 f"{tuple(param.shape)}; start over with --fresh")
            param.copy_(tensors[name])


__all__ = ["CheckpointSaveError", "LoadedState", "StateError", "UNHASHED_KEYS", "capture_rng", "check_state",
           "config_diff", "config_hash", "copy_trainable", "data_position", "find_latest_state", "list_states",
           "load_state", "plan_resume", "prune_states", "read_info", "remove_temporary", "rescale_lr",
           "restore_rng", "save_state", "state_root", "training_config"]
