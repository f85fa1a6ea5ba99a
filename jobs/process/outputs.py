"""Everything a run writes under `<training_folder>/<name>/`: config copy, LoRA files (a full fine-tune: transformer
folders, toolkit.state.transformer_folder), training states, samples, logs.

Only the main process writes (callers pass the Runtime and this class checks), and every file is written
atomically so a crash never leaves a half-written LoRA where a finished one is expected.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from toolkit.state import train_state
from toolkit.state import transformer_folder
from toolkit.state.atomic import atomic_write_bytes, swap_in_folder
from toolkit.state.checkpoint import list_step_files, prune_step_files, step_file_name
from toolkit.config.loader import write_resolved_config
from toolkit.dtypes import torch_dtype
from toolkit.errors import UserError
from toolkit.adapters import lokr
from toolkit.adapters.network import lokr_converter
from toolkit.adapters.lora import ecosystem_metadata, lora_state_dict, save_lora
from toolkit.adapters.lora_convert import find_conventions, to_comfy
from toolkit.render.pngmeta import png_bytes
from toolkit.render.sampling import SampleRequest, contact_sheet, load_controls, sample_file_name

log = logging.getLogger(__name__)


class RunOutputs:
    def __init__(self, folder: Path, name: str, full_finetune: bool = False) -> None:
        self.folder = Path(folder)
        self.name = name
        self.full_finetune = full_finetune  # weights are transformer folders instead of LoRA files
        self.sample_dir = self.folder / "samples"
        self.log_dir = self.folder / "logs"
        self.kept: list[Path] = []  # finished LoRAs kept as step files (keep_final): rotation never removes them

    def check_writable(self) -> None:
        """Fail before any model loads when the output folder cannot be created or written. Creates nothing: the
        nearest existing folder on its path must take a file (a failed start leaves no empty run folder behind)."""
        existing = self.folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"training_folder: cannot write to {self.folder}: {existing} is not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise UserError(f"training_folder: cannot write to {self.folder}: {exc.strerror or exc}") from exc

    def prepare(self, job_config) -> None:
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(job_config, self.folder / "config.yaml")

    # -- LoRA files -------------------------------------------------------------------------------------------
    def _metadata(self, cfg, step: int) -> dict:
        return {"step": step, "base_model": cfg.model.name_or_path, "arch": cfg.model.arch, "name": self.name,
                "rank": cfg.network.linear, "alpha": cfg.network.linear_alpha,
                "trigger_word": cfg.trigger_word or "",
                "resolution": ",".join(str(r) for d in cfg.datasets for r in d.resolution)}

    def _save(self, path: Path, transformer, lora_config, cfg, step: int, weights=None) -> None:
        """One LoRA file in the layout save.format asks for, with ecosystem metadata when the architecture has it."""
        conventions = find_conventions(cfg.model.arch)
        extra = convert = None
        if conventions is not None:
            extra = ecosystem_metadata(
                title=self.name, architecture=conventions.modelspec_architecture,
                implementation=conventions.modelspec_implementation,
                base_model_version=conventions.base_model_version, rank=cfg.network.linear,
                alpha=cfg.network.linear_alpha, steps=step,
                resolution=max(r for d in cfg.datasets for r in d.resolution), trigger_phrase=cfg.trigger_word)
        if cfg.network.type == "lokr":  # ComfyUI's lokr keys; save.format picks transformer.* or lycoris_* names
            convert = lokr_converter(lora_config, cfg.save.format)
            extra = {**(extra or {}), **lokr.ecosystem_metadata(cfg.network.lokr_factor, cfg.network.lokr_full_rank,
                                                                cfg.save.format)}
        elif cfg.save.format == "comfy":
            if conventions is None:
                raise UserError(f"save.format comfy: no ComfyUI key layout known for model.arch {cfg.model.arch!r}")
            convert = functools.partial(to_comfy, conventions=conventions)
        save_lora(path, lora_state_dict(transformer, weights), lora_config, cfg.save.dtype, self._metadata(cfg, step),
                  extra_metadata=extra, convert=convert)

    @property
    def final_path(self) -> Path:
        if self.full_finetune:
            return self.folder / transformer_folder.FINAL_NAME
        return self.folder / f"{self.name}.safetensors"

    def lora_files(self) -> list[Path]:
        """Weights of this run already in the folder (step checkpoints and the final file or folder)."""
        if self.full_finetune:
            files = [p for _, p in transformer_folder.list_step_folders(self.folder)]
        else:
            files = [p for _, p in list_step_files(self.folder, self.name)]
        return files + ([self.final_path] if self.final_path.exists() else [])

    def _save_folder(self, path: Path, transformer, weights, cfg, step: int) -> None:
        info = {"step": step, "base_model": cfg.model.name_or_path, "arch": cfg.model.arch, "name": self.name,
                "trigger_word": cfg.trigger_word or ""}
        transformer_folder.save_transformer_folder(path, transformer, weights,
                                                   torch_dtype(cfg.save.dtype), info)
        log.info("saved %s", path)

    def save_step(self, transformer, lora_config, cfg, step: int, rt, weights=None) -> Path | None:
        """The step LoRA (a full fine-tune: the step transformer folder of `weights`, the transformer's state dict
        from module_state_dict); old ones are pruned by save_state, once the training state of this step is
        complete."""
        if self.full_finetune:
            path = self.folder / transformer_folder.step_folder_name(step)
            if rt.is_main:
                self._save_folder(path, transformer, weights, cfg, step)
            return path
        path = self.folder / step_file_name(self.name, step)
        if rt.is_main:
            self._save(path, transformer, lora_config, cfg, step, weights)
            log.info("saved %s", path)
        return path

    def keep_final(self, step: int, steps: int) -> Path | None:
        """A finished run continued for longer (train.steps raised to `steps`): copy its final LoRA (or transformer
        folder) of `step` to the step name before training overwrites it."""
        if not self.final_path.exists():
            return None
        if self.full_finetune:
            kept = self.folder / transformer_folder.step_folder_name(step)
            if not kept.exists():
                tmp = self.folder / f".{kept.name}.keep.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(self.final_path, tmp)
                swap_in_folder(tmp, kept)
        else:
            kept = self.folder / step_file_name(self.name, step)
            if not kept.exists():
                atomic_write_bytes(kept, self.final_path.read_bytes())
        self.kept.append(kept)
        log.info("train.steps raised to %d: continuing from step %d; the finished %s of step %d is kept as %s "
                 "before %s is overwritten", steps, step, "LoRA" if not self.full_finetune else "transformer", step,
                 kept.name, self.final_path.name)
        return kept

    def save_state(self, step: int, write_state: bool = True, **state) -> Path | None:
        """The training state of `step` (toolkit.state.train_state.save_state arguments); none with write_state
        false (multi-process FSDP)."""
        if not write_state:
            return None
        path = train_state.save_state(self.folder, step, **state)
        log.info("saved training state %s", path)
        return path

    def prune(self, step: int, keep: int, step_lora: bool, states: bool = True) -> None:
        """Rotation, once the checkpoint of `step` is complete: old training states (when this run writes them) and,
        when this step wrote a step LoRA (or transformer folder), old ones beyond `keep`; the newest always stays."""
        if states:
            train_state.prune_states(self.folder, keep, protect=train_state.state_root(self.folder) / f"{step:09d}")
        if step_lora and self.full_finetune:
            transformer_folder.prune_step_folders(self.folder, keep,
                                                  protect=self.folder / transformer_folder.step_folder_name(step))
        elif step_lora:
            prune_step_files(self.folder, self.name, keep,
                             protect=[self.folder / step_file_name(self.name, step), *self.kept])

    def save_final(self, transformer, lora_config, cfg, step: int, rt, wrapped=None) -> Path:
        """Every process calls it; a full fine-tune, or any run under FSDP, gathers the transformer's weights from
        `wrapped` (FSDP: a collective consolidating the shards on the main process)."""
        path = self.final_path
        weights = None
        if self.full_finetune or rt.is_sharded:
            weights = transformer_folder.module_state_dict(rt, wrapped, transformer)
        if rt.is_main and self.full_finetune:
            self._save_folder(path, transformer, weights, cfg, step)
        elif rt.is_main:
            self._save(path, transformer, lora_config, cfg, step, weights)
        rt.wait()
        return path

    # -- samples ----------------------------------------------------------------------------------------------
    def write_samples(self, step: int, rendered: Sequence[tuple[SampleRequest, Image.Image]],
                      base_model: str = "") -> Path:
        """Each sample as a PNG with its generation parameters (as `generate` writes them), and a contact sheet
        with column titles (control(s), the sample of this step) and each row's prompt and seed."""
        rows, lora = [], self._lora_of(step)
        for request, image in rendered:
            params = {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                      "guidance_scale": request.guidance_scale, "width": image.width, "height": image.height,
                      "control_image": str(request.ctrl_img), "base_model": base_model, "training_step": step,
                      "lora": lora}
            atomic_write_bytes(self.sample_dir / sample_file_name(step, request.index), png_bytes(image, params))
            rows.append((*load_controls(request), image, f"{request.prompt} (seed {request.seed})"))
        controls = max((len(row) - 2 for row in rows), default=1)
        titles = ["control" if controls == 1 else f"control {i + 1}" for i in range(controls)]
        sheet_path = self.sample_dir / f"{step:09d}_sheet.png"
        sheet = contact_sheet(rows, column_titles=[*titles, f"{self.name}, step {step}"])
        atomic_write_bytes(sheet_path, png_bytes(sheet, {"prompt": f"{self.name}: samples of step {step}",
                                                         "training_step": step, "lora": lora}))
        log.info("samples of step %d: %s", step, sheet_path)
        return sheet_path

    def _lora_of(self, step: int) -> str | None:
        """The weights a sample of `step` was rendered with: the step's saved file, else the run at that step."""
        if step == 0:
            return None  # before training: the LoRA is freshly initialised (a no-op)
        saved = self.folder / (transformer_folder.step_folder_name(step) if self.full_finetune
                               else step_file_name(self.name, step))
        return str(saved) if saved.exists() else f"{self.name} at step {step} (not saved)"


__all__ = ["RunOutputs"]
