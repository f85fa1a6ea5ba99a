"""`type: generate` processes: every prompt on every control image, with the base model and with each LoRA.

Writes `<output_folder>/<name>/`: one PNG per image and column (`<control>_p<prompt>_<column>.png`, generation
parameters in its text chunks) and contact sheets with the columns control | base | LoRA... per row.
All inputs (model location, LoRA files, control images, prompt flags) are checked before the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from toolkit.dtypes import compute_dtype
from jobs.process.outputs import RunOutputs
from toolkit.train import stages
from toolkit.arch import get_architecture
from toolkit.state.atomic import atomic_write_bytes
from toolkit.config.schema import GenerateConfig, GenerateProcessConfig
from toolkit.data.images import is_image_file, read_image_size
from toolkit.dist import resolve_device
from toolkit.errors import ConfigError, UserError
from toolkit.render.inference import LoraRenderer, batch_key, get_renderer, plan_batches
from toolkit.render.pngmeta import png_bytes
from toolkit.render.sampling import SampleRequest, contact_sheet, fit_to_area, load_control, parse_prompt_flag_lists

log = logging.getLogger(__name__)

DEFAULT_AREA = 1024 * 1024  # FLUX Kontext's native pixel count, used when width/height are not set
ROWS_PER_SHEET = 24
THUMB = 256  # contact sheet cells; full images are written separately


@dataclass(frozen=True)
class Column:
    """One column of the contact sheet: the base model (lora None) or one LoRA at a scale."""

    title: str
    lora: Optional[Path] = None
    scale: float = 1.0


@dataclass(frozen=True)
class Item:
    """One row: a prompt on a control image, and the file-name stem of its images."""

    request: SampleRequest
    label: str


def columns_of(cfg: GenerateProcessConfig) -> list[Column]:
    columns = [Column("base")] if cfg.generate.include_base else []
    missing = [lora.path for lora in cfg.loras if not Path(lora.path).is_file()]
    if missing:
        raise ConfigError("LoRA file(s) not found:\n  " + "\n  ".join(missing))
    return columns + [Column(lora.name or Path(lora.path).stem, Path(lora.path), lora.scale) for lora in cfg.loras]


def control_images(path: Path) -> list[Path]:
    """The image itself, or the images of a folder (sorted by name; hidden files skipped)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
        if not found:
            raise ConfigError(f"control folder {path} has no .jpg/.jpeg/.png/.webp images")
        return found
    if not path.is_file():
        raise ConfigError(f"control image {path} does not exist")
    return [path]


def build_items(gen: GenerateConfig, key_path: str = "generate.prompts") -> list[Item]:
    """Every prompt on each of its control images, flags resolved against the generate defaults."""
    items, problems = [], []
    for k, raw in enumerate(gen.prompts):
        prompt, all_flags = parse_prompt_flag_lists(raw)
        flags = {name: values[-1] for name, values in all_flags.items()}
        where = f"{key_path}[{k}]"
        ctrls = all_flags.get("ctrl_img", [])
        ctrl = ctrls[0] if ctrls else gen.ctrl_img
        # Several --ctrl_img: one image conditioned on all of them (a LoRA trained with several control folders).
        extra = tuple(Path(c).expanduser() for c in ctrls[1:])
        if extra and not all(path.is_file() for path in (Path(ctrl).expanduser(), *extra)):
            problems.append(f"{where}: with several --ctrl_img each must be an existing image file, not a folder")
            continue
        if not ctrl:
            problems.append(f"{where}: no control image; add --ctrl_img PATH or set generate.ctrl_img")
            continue
        try:
            paths = control_images(Path(ctrl).expanduser())
            seed, steps = int(flags.get("seed", gen.seed)), int(flags.get("steps", gen.sample_steps))
            guidance = float(flags.get("cfg", gen.guidance_scale))
            size = (int(flags["w"]), int(flags["h"])) if "w" in flags and "h" in flags else \
                (gen.width, gen.height) if gen.width else None
        except (UserError, ValueError, KeyError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        if ("w" in flags) != ("h" in flags):
            problems.append(f"{where}: give --w and --h together")
            continue
        if size is not None and (size[0] % 16 or size[1] % 16):
            problems.append(f"{where}: width and height must be multiples of 16, got {size[0]}x{size[1]}")
            continue
        for path in paths:
            w, h = size or fit_to_area(*read_image_size(path), DEFAULT_AREA)
            request = SampleRequest(index=len(items), prompt=prompt, ctrl_img=path, seed=seed, width=w, height=h,
                                    guidance_scale=guidance, steps=steps, extra_ctrl_imgs=extra)
            label = f"{path.stem}_p{k:02d}"
            if any(item.label == label for item in items):  # a.png and a.jpg in one folder
                label = f"{label}_{len(items):03d}"
            items.append(Item(request, label))
    if problems:
        raise ConfigError("generate prompts have problems:\n  " + "\n  ".join(problems))
    return items


def thumbnail(img: Image.Image) -> Image.Image:
    return ImageOps.contain(img.convert("RGB"), (THUMB, THUMB)) if max(img.size) > THUMB else img.convert("RGB")


def write_png(path: Path, image: Image.Image, params: dict) -> None:
    atomic_write_bytes(path, png_bytes(image, params))


def write_sheets(folder: Path, rows: list[tuple], titles: list[str], stem: str = "contact_sheet") -> list[Path]:
    """Contact sheets of at most ROWS_PER_SHEET rows: `<stem>.png`, or `<stem>_01.png`... when there are more."""
    chunks = [rows[i:i + ROWS_PER_SHEET] for i in range(0, len(rows), ROWS_PER_SHEET)]
    paths = []
    for n, chunk in enumerate(chunks, start=1):
        path = folder / (f"{stem}.png" if len(chunks) == 1 else f"{stem}_{n:02d}.png")
        write_png(path, contact_sheet(chunk, column_titles=titles), {"columns": " | ".join(titles)})
        paths.append(path)
    return paths


class GenerateProcess:
    """One `generate` entry of `config.process`."""

    def __init__(self, cfg: GenerateProcessConfig, job_name: str, job_config=None, config_file=None, *,
                 index: int = 0, fresh: bool = False) -> None:
        self.cfg = cfg
        self.name = job_name
        self.arch_cls = get_architecture(cfg.model.arch)
        self.renderer_cls = get_renderer(cfg.model.arch)
        self.index = index  # this process's place in config.process, for model.transformer_path '[process:N]'
        # `fresh` (run.py --fresh) is for training runs; a generate process always writes into its output folder
        self.model_cfg = cfg.model

    def preflight(self, upstream: Sequence[Path] = ()) -> tuple[list[Item], list[Column], RunOutputs]:
        problems = self.arch_cls.check_source(self.cfg.model.name_or_path)
        if problems:
            raise ConfigError("\n".join(problems))
        self.model_cfg = stages.resolve_model(self.cfg.model, list(upstream), self.index)
        columns = columns_of(self.cfg)
        items = build_items(self.cfg.generate)
        outputs = RunOutputs(Path(self.cfg.output_folder) / self.name, self.name)
        outputs.check_writable()
        return items, columns, outputs

    def run(self, upstream: Sequence[Path] = ()) -> Path:
        items, columns, outputs = self.preflight(upstream)
        device = torch.device(resolve_device(self.cfg.device))
        renderer = self.renderer_cls.load(self.model_cfg, device, compute_dtype(self.cfg.dtype, device, key="dtype"))
        for column in columns:
            if column.lora is not None:
                renderer.add_lora(column.lora, column.title)
        rows = self.render_all(renderer, items, columns, outputs.folder)
        titles = ["control"] + [c.title + (f" x{c.scale:g}" if c.scale != 1 else "") for c in columns]
        sheets = write_sheets(outputs.folder, rows, titles)
        log.info("generated %d images in %s; contact sheet: %s", len(items) * len(columns), outputs.folder, sheets[0])
        return outputs.folder

    def render_all(self, renderer: LoraRenderer, items: list[Item], columns: list[Column], folder: Path
                   ) -> list[tuple]:
        """Render batch by batch (each batch once per column, so adapters switch, not controls); returns the
        contact-sheet rows (control, column images..., caption) as thumbnails."""
        sizes = [fit_to_area(*read_image_size(i.request.ctrl_img), i.request.width * i.request.height) for i in items]
        keys = [batch_key(i.request, size) for i, size in zip(items, sizes)]
        cells: dict[tuple[int, int], Image.Image] = {}
        controls_small: dict[int, Image.Image] = {}
        batches = plan_batches(keys, self.cfg.generate.batch_size)
        with tqdm(total=len(batches) * len(columns), desc="generate", unit="batch", dynamic_ncols=True) as bar:
            for batch in batches:
                requests = [items[i].request for i in batch]
                controls = [load_control(r.ctrl_img, r.width, r.height) for r in requests]
                controls_small.update({i: thumbnail(c) for i, c in zip(batch, controls)})
                for c, column in enumerate(columns):
                    renderer.use_lora(None if column.lora is None else column.title, column.scale)
                    for i, image in zip(batch, renderer.render(requests, controls)):
                        write_png(folder / f"{items[i].label}_{column.title}.png", image,
                                  self._params(items[i].request, column))
                        cells[(i, c)] = thumbnail(image)
                    bar.update(1)
        return [(controls_small[i], *(cells[(i, c)] for c in range(len(columns))),
                 f"{item.label}: {item.request.prompt}") for i, item in enumerate(items)]

    def _params(self, request: SampleRequest, column: Column) -> dict:
        return {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                "guidance_scale": request.guidance_scale, "width": request.width, "height": request.height,
                "control_image": str(request.ctrl_img), "base_model": self.cfg.model.name_or_path,
                "lora": None if column.lora is None else str(column.lora),
                "lora_scale": None if column.lora is None else column.scale, "column": column.title}


__all__ = ["Column", "GenerateProcess", "Item", "build_items", "columns_of", "control_images", "write_sheets"]
