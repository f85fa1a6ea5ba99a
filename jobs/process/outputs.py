"""Everything a run writes under `<training_folder>/<name>/`: config copy, LoRA files, samples, logs.

Only the main process writes (callers pass the Runtime and this class checks), and every file is written
atomically so a crash never leaves a half-written LoRA where a finished one is expected.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from toolkit.checkpoint import atomic_write_bytes, prune_step_files, step_file_name
from toolkit.config.loader import write_resolved_config
from toolkit.errors import UserError
from toolkit.lora import lora_state_dict, save_lora
from toolkit.sampling import SampleRequest, contact_sheet, load_control, sample_file_name

log = logging.getLogger(__name__)


class RunOutputs:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        self.sample_dir = self.folder / "samples"
        self.log_dir = self.folder / "logs"

    def check_writable(self) -> None:
        """Fail before any model loads when the output folder cannot be created or written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".write-test-"):
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

    def save_step(self, transformer, lora_config, cfg, step: int, rt) -> Path | None:
        path = self.folder / step_file_name(self.name, step)
        if rt.is_main:
            save_lora(path, lora_state_dict(transformer), lora_config, cfg.save.dtype, self._metadata(cfg, step))
            # Old files go only after the new one is complete.
            prune_step_files(self.folder, self.name, cfg.save.max_step_saves_to_keep, protect=[path])
            log.info("saved %s", path)
        return path

    def save_final(self, transformer, lora_config, cfg, step: int, rt) -> Path:
        path = self.folder / f"{self.name}.safetensors"
        if rt.is_main:
            save_lora(path, lora_state_dict(transformer), lora_config, cfg.save.dtype, self._metadata(cfg, step))
        rt.wait()
        return path

    # -- samples ----------------------------------------------------------------------------------------------
    def write_samples(self, step: int, rendered: Sequence[tuple[SampleRequest, Image.Image]]) -> Path:
        rows = []
        for request, image in rendered:
            _write_png(self.sample_dir / sample_file_name(step, request.index), image)
            rows.append((load_control(request.ctrl_img, request.width, request.height), image, request.prompt))
        sheet_path = self.sample_dir / f"{step:09d}_sheet.png"
        _write_png(sheet_path, contact_sheet(rows))
        log.info("samples of step %d: %s", step, sheet_path)
        return sheet_path


def _write_png(path: Path, image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["RunOutputs"]
