"""Publishing a finished run to the Hugging Face Hub: the access check done before training, the upload plan
(which local files go where in the repository) and the upload itself.

The check runs before any model loads, so a missing token, an offline machine or a read-only token stops the run
in seconds instead of after hours of training. The upload is one commit (`create_repo` + `create_commit`), made
by the main process only, after the LoRA is already saved locally: a failed upload loses nothing and says how to
retry (`python run.py push RUN_FOLDER`). The token is never logged, written or put into the model card.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from toolkit.errors import UserError

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
SAMPLE_DIR = "samples"
#: The latest round's individual sample images are uploaded (and shown as the card's gallery) only when they
#: weigh at most this much together; the contact sheet is always uploaded.
SAMPLE_IMAGES_MAX_BYTES = 8 * 1024 * 1024
_TOKEN_HELP = ("put HF_TOKEN=hf_... (a token with write access, from https://huggingface.co/settings/tokens) in the "
               "environment or in a .env file next to run.py, or run `hf auth login`")


class HubError(UserError):
    """The Hub cannot be used as the config asks; the message says what to do."""


@dataclass(frozen=True)
class HubAccess:
    """What the access check found: the account the token belongs to (the token itself is not kept here)."""

    user: str
    repo_id: str


def retry_hint(run_folder: Path) -> str:
    return f"upload it again with: python run.py push {run_folder}"


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def find_token() -> Optional[str]:
    """The token huggingface_hub would use: HF_TOKEN / HUGGING_FACE_HUB_TOKEN, else the `hf auth login` file."""
    from huggingface_hub import get_token

    return get_token()


def token_problem(whoami: Mapping[str, Any], repo_id: str) -> Optional[str]:
    """Why the token described by `whoami` (HfApi.whoami's answer) cannot write to `repo_id`, or None.

    Read tokens cannot write; a fine-grained token needs `repo.write` on the namespace (or on the repository);
    the namespace must be the token's user or one of its organisations. Unknown answer shapes are let through:
    the upload itself is the final judge."""
    user = str(whoami.get("name", ""))
    namespace = repo_id.split("/", 1)[0]
    orgs = {str(org.get("name")) for org in whoami.get("orgs", []) if isinstance(org, Mapping)}
    if namespace != user and namespace not in orgs:
        owners = ", ".join([user, *sorted(orgs)])
        return (f"the token belongs to {user!r}, which cannot create repositories under {namespace!r} (its "
                f"namespaces: {owners}); change save.hf_repo_id or use a token of that account")
    token = whoami.get("auth", {}).get("accessToken", {}) if isinstance(whoami.get("auth"), Mapping) else {}
    role = token.get("role") if isinstance(token, Mapping) else None
    if role == "read":
        return "the token is read-only; create a token with write access at https://huggingface.co/settings/tokens"
    if role == "fineGrained":
        grants = token.get("fineGrained", {})
        scoped = grants.get("scoped", [])
        if isinstance(scoped, list) and "repo.write" not in grants.get("global", []) and not any(
                str(entry.get("entity", {}).get("name")) in (namespace, repo_id)
                and "repo.write" in entry.get("permissions", []) for entry in scoped if isinstance(entry, Mapping)):
            return (f"the fine-grained token has no 'repo.write' permission on {namespace!r}; add it at "
                    "https://huggingface.co/settings/tokens")
    return None


def check_hub_access(repo_id: str) -> HubAccess:
    """Fail fast (HubError) when the end-of-training upload to `repo_id` could not work: no token, offline mode,
    no network, an invalid token, or one that cannot write there. Calls the Hub once (whoami)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    where = "save.push_to_hub"
    token = find_token()
    if not token:
        raise HubError(f"{where}: no Hugging Face token found: {_TOKEN_HELP}; or set save.push_to_hub: false")
    if _offline():
        raise HubError(f"{where}: HF_HUB_OFFLINE is set, so the Hub cannot be reached for the upload at the end of "
                       "training: unset HF_HUB_OFFLINE, or set save.push_to_hub: false and upload later with "
                       "python run.py push RUN_FOLDER")
    try:
        info = HfApi().whoami(token=token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(f"{where}: the Hugging Face token was rejected (401 Unauthorized); {_TOKEN_HELP}") from None
        raise HubError(f"{where}: the Hub answered {status} when checking the token; try again later or set "
                       "save.push_to_hub: false") from None
    except Exception as exc:  # network errors come from several libraries (httpx, requests, socket)
        raise HubError(f"{where}: cannot reach the Hugging Face Hub to check the token ({type(exc).__name__}: "
                       f"{exc}); check the network or proxy, or set save.push_to_hub: false") from None
    problem = token_problem(info, repo_id)
    if problem:
        raise HubError(f"{where}: cannot upload to {repo_id}: {problem}")
    log.info("Hub upload to %s checked: token of %s can write there", repo_id, info.get("name"))
    return HubAccess(user=str(info.get("name", "")), repo_id=repo_id)


# -- what goes up -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Samples:
    """The newest sampling round of a run: its step, contact sheet and per-prompt images (prompt index -> file)."""

    step: int
    sheet: Optional[Path]
    images: dict[int, Path]

    @property
    def images_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.images.values())


def latest_samples(run_folder: Path) -> Optional[Samples]:
    """The newest step with a contact sheet or sample images under RUN_FOLDER/samples (`<step>_<index>.png`,
    `<step>_sheet.png`), or None when the run never sampled."""
    rounds: dict[int, dict[str, Path]] = {}
    for path in sorted((Path(run_folder) / SAMPLE_DIR).glob("*.png")):
        step, _, kind = path.stem.partition("_")
        if step.isdigit() and (kind == "sheet" or kind.isdigit()):
            rounds.setdefault(int(step), {})[kind] = path
    if not rounds:
        return None
    step = max(rounds)
    files = rounds[step]
    return Samples(step=step, sheet=files.get("sheet"),
                   images={int(kind): path for kind, path in files.items() if kind != "sheet"})


def uploads_sample_images(samples: Optional[Samples], max_bytes: int = SAMPLE_IMAGES_MAX_BYTES) -> bool:
    return samples is not None and bool(samples.images) and samples.images_bytes <= max_bytes


def upload_plan(run_folder: Path, name: str, max_sample_bytes: int = SAMPLE_IMAGES_MAX_BYTES
                ) -> list[tuple[Path, str]]:
    """(local file, path in the repository) for everything a push of a finished run uploads: the final LoRA, the
    model card (RUN_FOLDER/README.md, written by the push just before), the latest contact sheet and, when small,
    the latest sample images. Reads the folder, changes nothing."""
    folder = Path(run_folder)
    lora = folder / f"{name}.safetensors"
    if not lora.is_file():
        raise HubError(f"{folder} has no final LoRA ({lora.name}): only a finished run can be pushed")
    plan = [(lora, lora.name), (folder / CARD_FILE, CARD_FILE)]
    samples = latest_samples(folder)
    if samples is not None and samples.sheet is not None:
        plan.append((samples.sheet, f"{SAMPLE_DIR}/{samples.sheet.name}"))
    if uploads_sample_images(samples, max_sample_bytes):
        plan += [(path, f"{SAMPLE_DIR}/{path.name}") for _, path in sorted(samples.images.items())]
    return plan


def upload(plan: list[tuple[Path, str]], repo_id: str, private: bool, commit_message: str) -> str:
    """Create the repository when missing and upload the plan as one commit; returns the repository URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if _offline():
        raise HubError("HF_HUB_OFFLINE is set: unset it to upload")
    api = HfApi(token=find_token())
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=dst, path_or_fileobj=str(src)) for src, dst in plan]
    api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    return str(url)


__all__ = ["CARD_FILE", "HubAccess", "HubError", "SAMPLE_IMAGES_MAX_BYTES", "Samples", "check_hub_access",
           "find_token", "latest_samples", "retry_hint", "token_problem", "upload", "upload_plan",
           "uploads_sample_images"]
