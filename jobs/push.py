"""Push a finished training run to the Hugging Face Hub: at the end of training (`save.push_to_hub: true`) and as
`python run.py push RUN_FOLDER` (a retry, or a run trained without push_to_hub).

RUN_FOLDER/config.yaml (the resolved, redacted config the run saved) gives the settings; the model card is written
to RUN_FOLDER/README.md, then toolkit.publish.hub.upload_plan's files go up in one commit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from jobs.compare import load_run
from toolkit.state import train_state
from toolkit.state.atomic import atomic_write_text
from toolkit.config.schema import TrainProcessConfig
from toolkit.errors import UserError
from toolkit.publish.hub import (CARD_FILE, HubError, check_hub_access, latest_samples, retry_hint, upload, upload_plan,
                         uploads_sample_images)
from toolkit.publish.model_card import RunFacts, hub_base_model, model_card

log = logging.getLogger(__name__)


def _dataset_size(process: TrainProcessConfig) -> Optional[int]:
    from toolkit.data.pairs import discover_pairs

    try:
        return len(discover_pairs(process.datasets))
    except UserError:  # the data moved since training: the card says "unknown"
        return None


def _world_size(folder: Path) -> int:
    state = train_state.find_latest_state(folder)
    return int(train_state.read_info(state).get("world_size", 1)) if state is not None else 1


def write_card(folder: Path, name: str, process: TrainProcessConfig, repo_id: str,
               dataset_size: Optional[int] = None) -> Path:
    """Write RUN_FOLDER/README.md, the model card the push uploads."""
    base = process.model.name_or_path
    if hub_base_model(base) == base:
        log.info("model.name_or_path %r is not a folder here: the card names it as the base model's Hub id (if it "
                 "was a local folder, run the push from the folder the training ran in)", base)
    samples = latest_samples(folder)
    facts = RunFacts(name=name, repo_id=repo_id, weight_name=f"{name}.safetensors", samples=samples,
                     sample_images_uploaded=uploads_sample_images(samples),
                     dataset_size=dataset_size if dataset_size is not None else _dataset_size(process),
                     world_size=_world_size(folder))
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, model_card(process, facts))
    return path


def push_run(folder: Path, repo_id: Optional[str] = None, private: Optional[bool] = None,
             dataset_size: Optional[int] = None, dry_run: bool = False) -> list[tuple[Path, str]]:
    """Write the model card and upload the run (unless dry_run); returns the upload plan."""
    folder = Path(folder)
    name, process = load_run(folder)
    repo_id = repo_id or process.save.hf_repo_id
    if not repo_id:
        raise UserError(f"no repository to push to: give --repo-id namespace/name (save.hf_repo_id is not set in "
                        f"{folder / 'config.yaml'})")
    private = process.save.hf_private if private is None else private
    plan = upload_plan(folder, name)  # first: fails on an unfinished run before anything is written
    write_card(folder, name, process, repo_id, dataset_size)
    for src, dst in plan:
        log.info("%s %s -> %s:%s", "would upload" if dry_run else "uploading", src, repo_id, dst)
    if dry_run:
        return plan
    check_hub_access(repo_id)
    url = upload(plan, repo_id, private, commit_message=f"{name}: LoRA after {process.train.steps} steps")
    log.info("pushed %s to %s (%s)", name, url, "private" if private else "public")
    return plan


def push_after_training(folder: Path, final: Path, dataset_size: Optional[int]) -> None:
    """The end-of-training push (main process only). A failure keeps the saved LoRA and says how to retry."""
    try:
        push_run(folder, dataset_size=dataset_size)
    except Exception as exc:  # any failure (network, permissions, disk): the LoRA is safe, the user must know
        raise HubError(f"the upload to the Hugging Face Hub failed ({type(exc).__name__}: {exc}). The trained LoRA "
                       f"is saved: {final}; {retry_hint(folder)}") from exc


__all__ = ["push_after_training", "push_run", "write_card"]
