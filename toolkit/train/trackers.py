"""Experiment trackers besides TensorBoard (process ``trackers``): Weights & Biases and MLflow through accelerate's
tracker classes (accelerate.tracking.WandBTracker / MLflowTracker), started on the main process only.

The packages are optional (requirements-trackers.txt): ``missing_packages`` names the pip command before anything
loads, ``start_trackers`` opens the runs and stores the resolved config (secrets already redacted by the caller, and
every value passed through toolkit.redact once more) as run parameters.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from toolkit.redact import redact_mapping

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements-trackers.txt"
# option -> (module it imports, PyPI package)
PACKAGES = {"use_wandb": ("wandb", "wandb"), "use_mlflow": ("mlflow", "mlflow-skinny")}

__all__ = ["flatten", "missing_packages", "start_trackers"]


def missing_packages(cfg: Any, key_prefix: str = "config.process[0].trackers") -> list[str]:
    """One problem per enabled tracker whose package is not installed, naming the pip command."""
    problems = []
    for option, (module, package) in PACKAGES.items():
        if getattr(cfg, option) and importlib.util.find_spec(module) is None:
            problems.append(f"{key_prefix}.{option}: the {package} package is not installed; run `pip install -r "
                            f"{REQUIREMENTS_FILE}` (or turn {option} off)")
    return problems


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 1e-4, ...} of scalars (lists and None as text), what trackers take as params."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}."))  # datasets.0.folder_path
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start_trackers(cfg: Any, project: str, run_name: str, run_folder: Path, params: Mapping[str, Any]) -> list:
    """Started accelerate trackers for `cfg` (TrackersConfig), each with `params` stored; [] when none is on. Call on
    the main process only (the caller's TrainingMonitor is disabled elsewhere)."""
    project, run_name = cfg.project_name or project, cfg.run_name or run_name
    params = redact_mapping(dict(params))
    trackers = []
    if cfg.use_wandb:
        from accelerate.tracking import WandBTracker

        trackers.append(WandBTracker(project, name=run_name, dir=str(run_folder)))
    if cfg.use_mlflow:
        from accelerate.tracking import MLflowTracker

        _set_mlflow_uri(cfg.mlflow_tracking_uri, run_folder)
        trackers.append(MLflowTracker(experiment_name=project, run_name=run_name))
    for tracker in trackers:
        tracker.start()
        tracker.store_init_configuration(params)
        log.info("logging scalars to %s (project %s, run %s)", tracker.name, project, run_name)
    return trackers


def _set_mlflow_uri(uri: Optional[str], run_folder: Path) -> None:
    """trackers.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a folder store in the run folder."""
    import mlflow

    if uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if uri is None:
        uri = (run_folder / "mlruns").absolute().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 refuses its folder store unless asked for; a local folder is what this option chose.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
