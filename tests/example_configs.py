"""Shipped example configs pointed at the test fixtures, to run a few steps of each recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO, assert_same_tensors, merge, write_config

EXAMPLES = REPO / "config" / "examples"


def example_config(name: str, folder: Path, model_dir: Path, data_dir: Path, steps: int = 3,
                   **overrides: Any) -> Path:
    """config/examples/<name>.yaml with its model, data and output paths moved to the test folders, `steps` steps,
    no samples and one save at the end; `overrides` are dotted keys of the first process (tests.helpers.merge)."""
    text = (EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8")
    text = text.replace('"models/tiny-flux-kontext"', f'"{model_dir}"').replace('"data/demo/', f'"{data_dir}/')
    raw = yaml.safe_load(text)
    cfg = merge(raw, {"training_folder": str(folder / "output"), "train.steps": steps, "save.save_every": 1000,
                      "sample.prompts": [], "log_every": 1, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / f"{name}.yaml", cfg)


def copy_run_back_to(run_dir: Path, copy_dir: Path, step: int) -> Path:
    """A copy of a finished run folder as it was after the training state of `step`: later states and the final
    file removed, so running the same config there resumes from `step`."""
    import shutil

    shutil.copytree(run_dir, copy_dir)
    for state in (copy_dir / "state").iterdir():
        if state.name.isdigit() and int(state.name) > step:
            shutil.rmtree(state)
    (copy_dir / f"{copy_dir.name}.safetensors").unlink()
    shutil.rmtree(copy_dir / "logs")
    return copy_dir


def resume_from_copy(name: str, run_dir: Path, folder: Path, model_dir: Path, data_dir: Path, steps: int, step: int,
                     **overrides: Any) -> Path:
    """Put a copy of the finished `run_dir` back to the state of `step` under `folder`, run example `name` with the
    same settings there (so it resumes) and return the copy's run folder."""
    import run

    resumed = copy_run_back_to(run_dir, folder / "output" / run_dir.name, step=step)
    assert run.main([str(example_config(name, folder, model_dir, data_dir, steps=steps, **overrides))]) == 0
    return resumed


def assert_same_final_lora(run_dir: Path, other_dir: Path) -> dict:
    """The final LoRA files of two run folders hold bit-identical tensors; returns the first one's."""
    return assert_same_tensors(run_dir / f"{run_dir.name}.safetensors", other_dir / f"{other_dir.name}.safetensors")


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar (the last value written for a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}
