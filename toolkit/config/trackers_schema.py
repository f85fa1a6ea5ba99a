"""The `trackers` section of a training process: experiment trackers that receive the same scalars as TensorBoard;
re-exported by ``schema.py``, whose docstring describes the field metadata."""

from dataclasses import dataclass, field
from typing import Optional

from toolkit.config.fields import _meta, NON_EMPTY

__all__ = ["TrackersConfig"]


@dataclass(kw_only=True)
class TrackersConfig:
    """Weights & Biases and MLflow, through accelerate's trackers, on the main process only (TensorBoard is always
    written)."""

    use_wandb: bool = field(default=False, metadata=_meta(
        "Also log every scalar to Weights & Biases (ai-toolkit's logging.use_wandb); the key comes from `wandb "
        "login` or WANDB_API_KEY, WANDB_MODE=offline logs without a network. Needs `pip install -r "
        "requirements-trackers.txt`."))
    use_mlflow: bool = field(default=False, metadata=_meta(
        "Also log every scalar to MLflow (run parameters: the resolved config, secrets redacted). Needs `pip install "
        "-r requirements-trackers.txt`."))
    project_name: Optional[str] = field(default=None, metadata=_meta(
        "W&B project / MLflow experiment; null uses config.name (ai-toolkit's logging.project_name).", NON_EMPTY))
    run_name: Optional[str] = field(default=None, metadata=_meta(
        "Name of the tracked run; null uses the run folder's name (ai-toolkit's logging.run_name).", NON_EMPTY))
    mlflow_tracking_uri: Optional[str] = field(default=None, metadata=_meta(
        "Where MLflow stores runs (a server URL, or file:/path for a local folder store); null uses "
        "MLFLOW_TRACKING_URI, else a folder store in the run folder (<run folder>/mlruns).", NON_EMPTY,
        aliases=("tracking_uri",)))
