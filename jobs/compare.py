"""`python run.py compare RUN_FOLDER`: every checkpoint of a training run side by side, and its validation loss.

RUN_FOLDER is `<training_folder>/<name>/` (config.yaml, `<name>_<step:09d>.safetensors`, `<name>.safetensors`).
Writes to RUN_FOLDER/compare/ (or --out):
- grid.png: rows = the run's sample prompts, columns = control | base (step 0) | each checkpoint by step;
  every cell also as samples/step_<step:09d>_<prompt:02d>.png with its parameters in PNG text chunks;
- metrics.csv, plots/<metric>.png and metrics.png when the dataset has held-out pairs (val_folder_path /
  val_control_path): per checkpoint the flow-matching loss at fixed timesteps and noise (toolkit.train.validation)
  and the edit metrics (toolkit.train.edit_eval: each held-out control rendered and compared with its target), the
  same problem for every checkpoint; `best` (--best METRIC) names the checkpoint with the best value.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from toolkit.dtypes import compute_dtype
from jobs.process.GenerateProcess import thumbnail, write_png
from toolkit.state.atomic import atomic_write_bytes, atomic_write_text
from toolkit.state.checkpoint import list_step_files
from toolkit.config.loader import load_job_config
from toolkit.config.schema import TrainProcessConfig
from toolkit.dist import resolve_device
from toolkit.errors import UserError
from toolkit.render.inference import LoraRenderer, batch_key, get_renderer, plan_batches
from toolkit.adapters.lora import read_lora_metadata
from toolkit.render.plot import metric_plots
from toolkit.render.sampling import build_requests, contact_sheet, load_control
from toolkit.train.edit_eval import EditEval
from toolkit.train.metric_names import HIGHER_IS_BETTER, best_step
from toolkit.train.validation import ValidationSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Optional[Path]  # None: the base model, which is what every LoRA starts from (B = 0)

    @property
    def title(self) -> str:
        return "base" if self.path is None else f"step {self.step}"


@dataclass
class CompareResult:
    checkpoints: list[Checkpoint]
    grid: Optional[Path] = None
    csv: Optional[Path] = None
    plot: Optional[Path] = None
    val_loss: dict[int, float] = field(default_factory=dict)  # step -> loss
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> {val_loss, psnr, ssim, keep_...}
    plots: list[Path] = field(default_factory=list)  # one PNG per metric
    best: Optional[tuple[Checkpoint, float]] = None  # the checkpoint with the best value of the --best metric


def load_run(folder: Path) -> tuple[str, TrainProcessConfig]:
    """The run name and training process of a training output folder, from the config.yaml it saved."""
    config = Path(folder) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{folder} is not a training output folder (no config.yaml in it)")
    job = load_job_config(config)
    process = next((p for p in job.config.process if isinstance(p, TrainProcessConfig)), None)
    if process is None:
        raise UserError(f"{config} has no sd_trainer process")
    return job.config.name, process


def find_checkpoints(folder: Path, name: str) -> list[Checkpoint]:
    """The base model (step 0), then every saved step file and the final file, by step."""
    found = {step: path for step, path in list_step_files(folder, name)}
    final = Path(folder) / f"{name}.safetensors"
    if final.is_file():
        step = read_lora_metadata(final).get("kontext_trainer.step")
        found[int(step) if step is not None else max(found, default=0) + 1] = final
    if not found:
        raise UserError(f"{folder}: no checkpoints ({name}_<step>.safetensors or {name}.safetensors)")
    return [Checkpoint(0, None)] + [Checkpoint(step, path) for step, path in sorted(found.items())]


def compare_run(folder: Path, out: Optional[Path] = None, device: str = "auto", sample_steps: Optional[int] = None,
                batch_size: int = 1, grid: bool = True, val: bool = True, val_folder: Optional[str] = None,
                val_control: Optional[str] = None, best: Optional[str] = None,
                metric_steps: Optional[int] = None) -> CompareResult:
    folder = Path(folder)
    name, process = load_run(folder)
    checkpoints = find_checkpoints(folder, name)
    out = Path(out) if out is not None else folder / "compare"
    s = process.sample
    requests = build_requests(s.prompts, seed=s.seed, walk_seed=s.walk_seed, width=s.width, height=s.height,
                              guidance_scale=s.guidance_scale, steps=sample_steps or s.sample_steps,
                              key_path=f"{folder / 'config.yaml'}: sample.prompts") if grid else []
    text_only = [r for r in requests if r.ctrl_img is None]
    if text_only:  # the grid's first column is the control image
        log.warning("compare: skipping %d sample prompt(s) without --ctrl_img (the grid compares edits of a control "
                    "image), e.g. %r", len(text_only), text_only[0].prompt)
        requests = [r for r in requests if r.ctrl_img is not None]
    datasets = process.datasets
    if val_folder or val_control:
        datasets = [replace(datasets[0], val_folder_path=val_folder, val_control_path=val_control)]
    validation = ValidationSet.from_datasets(datasets, process.trigger_word, process.train.seed,
                                             process.train.guidance) if val else None
    if best is not None and validation is None:
        raise UserError(f"--best {best}: the run has no held-out pairs to measure (set datasets[].val_folder_path / "
                        "val_control_path, or pass --val-folder/--val-control)")
    if not requests and validation is None:
        raise UserError("nothing to compare: the run has no sample prompts and no held-out pairs "
                        "(set datasets[].val_folder_path / val_control_path, or pass --val-folder/--val-control)")
    log.info("comparing %d columns of %s (the base model and %d checkpoint%s): %d prompts, %s held-out items",
             len(checkpoints), name, len(checkpoints) - 1, "" if len(checkpoints) == 2 else "s", len(requests),
             len(validation) if validation else "no")
    dev = torch.device(resolve_device(device))
    renderer = get_renderer(process.model.arch).load(process.model, dev, compute_dtype(process.train.dtype, dev))
    result = CompareResult(checkpoints)
    steps = s.metric_steps if metric_steps is None else metric_steps
    edits = EditEval.from_validation(validation, steps=steps, seed=s.seed, guidance_scale=s.guidance_scale,
                                     device=dev) if validation is not None and steps > 0 else None
    cells = _evaluate(renderer, checkpoints, requests, (validation, edits), batch_size, out, result)
    if requests:
        rows = [(thumbnail(load_control(r.ctrl_img, r.width, r.height)), *cells[r.index], r.prompt) for r in requests]
        result.grid = out / "grid.png"
        write_png(result.grid, contact_sheet(rows, column_titles=["control"] + [c.title for c in checkpoints]),
                  {"run": name, "columns": ", ".join(c.title for c in checkpoints)})
    if result.scores:
        result.csv, result.plot, result.plots = _write_scores(out, checkpoints, result.scores)
    log.info("compare: %s", ", ".join(str(p) for p in (result.grid, result.csv, result.plot) if p))
    if best is not None:
        step, value = best_step(result.scores, best)
        result.best = (next(c for c in checkpoints if c.step == step), value)
        log.info("best checkpoint by %s (%s is better): %s, %s = %.5g", best,
                 "higher" if HIGHER_IS_BETTER[best] else "lower", result.best[0].path or "the base model", best, value)
    return result


def _evaluate(renderer: LoraRenderer, checkpoints: list[Checkpoint], requests, held_out: tuple, batch_size: int,
              out: Path, result: CompareResult) -> dict[int, list]:
    """Render every request and measure the validation loss and the edit metrics with each checkpoint; returns
    request -> thumbnails."""
    validation, edits = held_out
    controls = [load_control(r.ctrl_img, r.width, r.height) for r in requests]
    batches = plan_batches([batch_key(r, c.size) for r, c in zip(requests, controls)], batch_size)
    cells: dict[int, list] = {r.index: [] for r in requests}
    for checkpoint in tqdm(checkpoints, desc="columns", unit="column", dynamic_ncols=True):  # the base is one
        adapter = None if checkpoint.path is None else f"step_{checkpoint.step}"
        if adapter is not None:
            renderer.add_lora(checkpoint.path, adapter)
        renderer.use_lora(adapter)
        for batch in batches:
            chosen = [requests[i] for i in batch]
            for request, image in zip(chosen, renderer.render(chosen, [controls[i] for i in batch])):
                write_png(out / "samples" / f"step_{checkpoint.step:09d}_{request.index:02d}.png", image,
                          {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                           "guidance_scale": request.guidance_scale, "width": request.width,
                           "height": request.height, "control_image": str(request.ctrl_img),
                           "lora": None if checkpoint.path is None else str(checkpoint.path),
                           "step": checkpoint.step})
                cells[request.index].append(thumbnail(image))
        if validation is not None:
            scores = result.scores.setdefault(checkpoint.step, {})
            scores["val_loss"] = result.val_loss[checkpoint.step] = validation.loss(renderer.model)
            if edits is not None:
                scores.update(EditEval.summary(edits.score(renderer.model, range(len(edits)))))
            log.info("%s: %s", checkpoint.title, ", ".join(f"{k} {v:.5g}" for k, v in scores.items()))
        if adapter is not None:
            renderer.remove_lora(adapter)
    return cells


def _write_scores(out: Path, checkpoints: list[Checkpoint], scores: dict[int, dict[str, float]]
                  ) -> tuple[Path, Path, list[Path]]:
    """metrics.csv (step, checkpoint, one column per metric), plots/<metric>.png, metrics.png (all metrics)."""
    metrics = [m for m in HIGHER_IS_BETTER if any(m in row for row in scores.values())]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "checkpoint", *metrics])
    for c in checkpoints:
        row = scores[c.step]
        writer.writerow([c.step, c.path.name if c.path else "base", *(f"{row[m]:.6g}" if m in row else ""
                                                                       for m in metrics)])
    csv_path, combined_path = out / "metrics.csv", out / "metrics.png"
    atomic_write_text(csv_path, buf.getvalue())
    singles, combined = metric_plots([c.step for c in checkpoints], scores, metrics)
    paths = []
    for metric, png in singles.items():
        paths.append(out / "plots" / f"{metric}.png")
        atomic_write_bytes(paths[-1], png)
    atomic_write_bytes(combined_path, combined)
    return csv_path, combined_path, paths


__all__ = ["Checkpoint", "CompareResult", "compare_run", "find_checkpoints", "load_run"]
